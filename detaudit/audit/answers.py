"""The answer parser: a whole OpenAI answer, or a stream's chunks, -> one `Completion`, or a CallError with a reason.

Every answer is checked against its typed schema (answer_schema.py), and what the parser returns always fits the
samples table: vLLM's `token_ids`, "token_id:123" token strings and the `id` of each logprob entry (llama-server)
become ids, per-token `bytes` are kept, a missing logprob is NaN, alternatives are ordered best first. Logprobs are
read in either shape (chat `content` entries or the legacy completions lists) on either API. One `Completion` per
request, parsed the same way whichever API or transport produced it.

Over 400 lines, for a reason: it is the one place that decides what an answer means, for both APIs, whole or
streamed, in either logprobs shape; split, the shapes would drift apart again (issue #23).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

import orjson
from pydantic import ValidationError

from detaudit.audit.answer_schema import FLOAT32_MAX, INT32_MAX, SCHEMAS, validate
from detaudit.audit.completion import RAW_CHARS, Api, CallError, Completion, malformed, one_line, text_of

_TOKEN_ID_PREFIX = "token_id:"
_NAN = float("nan")


def _loads(data: bytes | bytearray) -> tuple[Any, bool]:
    """JSON -> (value, whether lone surrogates may be in its strings). orjson for speed; the stdlib only for the
    lone surrogate escapes orjson refuses but JSON allows (NaN and Infinity stay refused: they are not JSON)."""
    try:
        return orjson.loads(data), False
    except orjson.JSONDecodeError as e:
        if "surrogate" not in str(e):
            raise CallError(f"malformed JSON ({e})", retryable=True, reason="malformed:json") from None
    try:
        return json.loads(data, parse_constant=_refuse_constant), True
    except (ValueError, RecursionError) as e:
        raise CallError(f"malformed JSON ({e})", retryable=True, reason="malformed:json") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _server_error(obj: Mapping[str, Any], streamed: bool) -> CallError:
    err = obj["error"]
    msg = text_of(err.get("message") if isinstance(err, dict) else err)
    where = "error event in stream" if streamed else "server error in a 200 answer"
    return CallError(f"{where}: {msg}", retryable=True, reason="server_error")


def _not_openai(obj: Any, what: str) -> CallError:
    if not isinstance(obj, dict):
        return CallError(f"{what} is not a JSON object", retryable=True, reason="not_openai")
    keys = ", ".join(sorted(one_line(str(k), 40) for k in obj)[:6])
    return CallError(
        f"{what} is not an OpenAI completion (keys: {keys or 'none'})", retryable=True, reason="not_openai"
    )


def _pick_choice(choices: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The choice with index 0 (an entry without an index has its list position); None for an empty list. Any
    other index, or the same index twice, is not an answer to one n=1 request."""
    if not choices:
        return None
    indices = [c.get("index", pos) for pos, c in enumerate(choices)]
    if indices.count(0) != 1 or len(set(indices)) != len(indices):
        shown = one_line(", ".join(str(i)[:12] for i in indices[:8]))
        raise CallError(
            f"choice indices [{shown}] are not one choice with index 0", retryable=True, reason="choice_index"
        )
    return choices[indices.index(0)]


def _split_token(tok: str, where: str) -> tuple[str | None, int | None]:
    """vLLM's return_tokens_as_token_ids gives "token_id:123": an id, not a string."""
    if tok.startswith(_TOKEN_ID_PREFIX):
        digits = tok[len(_TOKEN_ID_PREFIX) :]
        if digits.isascii() and digits.isdigit():
            if len(digits.lstrip("0")) > 10 or int(digits) > INT32_MAX:
                raise malformed(where, f"token id {digits[:20]} is outside int32")
            return None, int(digits)
    return tok, None


def _floats(values: list[float | None]) -> list[float]:
    """Logprobs with a missing one (null) as NaN, as the samples table records it."""
    return [_NAN if v is None else v for v in values] if None in values else cast("list[float]", values)


def _top_rows(rows: list[list[Any]]) -> list[list[float | None]]:
    """The logprobs of completions top_logprobs rows, held to the same rule as every other logprob (one pass over
    all of them: this runs for every answer)."""
    flat = list(chain.from_iterable(rows))
    kinds = set(map(type, flat))
    if not kinds <= {float, int} or not all(-FLOAT32_MAX <= v <= FLOAT32_MAX for v in flat):
        raise malformed("choices.logprobs.top_logprobs", "a logprob must be a finite number within float32")
    return [[float(v) for v in r] for r in rows] if int in kinds else rows


def _check_text(value: str | None, where: str) -> None:
    """A string that came through the lone-surrogate JSON path must still be writable as UTF-8."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise malformed(where, "lone surrogate in a string") from None


@dataclass(frozen=True)
class _Shape:
    """Where one shape of per-token data keeps its fields, for the reasons that name them."""

    token: str
    top: str
    id: str
    top_id: str


_ENTRIES = _Shape(  # the chat shape: logprobs.content[] entries
    "choices.logprobs.content.token",
    "choices.logprobs.content.top_logprobs.token",
    "choices.logprobs.content.id",
    "choices.logprobs.content.top_logprobs.id",
)
_LISTS = _Shape("choices.logprobs.tokens", "choices.logprobs.top_logprobs", "", "")  # legacy: no ids


def _one_id(from_string: int | None, from_entry: int | None, where: str) -> int | None:
    """A token's id from its entry's `id` or its "token_id:" string; both present must agree."""
    if from_entry is None:
        return from_string
    if from_string is not None and from_string != from_entry:
        raise malformed(where, f"id {from_entry} but the token string says token_id:{from_string}")
    return from_entry


class _Acc:
    """Accumulates per-token data from one validated whole answer or from a stream's validated chunks."""

    def __init__(self, api: Api, streamed: bool) -> None:
        self.api, self.streamed = api, streamed
        self.text: list[str] = []
        self.strs: list[str | None] = []
        self.str_ids: list[int | None] = []
        self.bytes: list[bytes | None] = []
        self.logprobs: list[float] = []
        self.top_strs: list[list[str]] = []
        self.top_ids: list[list[int]] = []
        self.top_lps: list[list[float]] = []
        self.any_top = False
        self.any_bytes = False
        self.top_id_strings = False  # some alternative was a "token_id:" string, not a token's text
        self.shape = _ENTRIES if api == "chat" else _LISTS  # the shape per-token data came in (names its fields)
        self.choice_ids: list[int] | None = None
        self.finish: str | None = None
        self.model: str | None = None
        self.fingerprint: str | None = None
        self.usage: Mapping[str, Any] | None = None
        self.saw_choice = False
        self.saw_content = False
        self.lone_surrogates = False  # some JSON went through the stdlib path: check every kept string

    def add(self, ans: Mapping[str, Any], choice: Mapping[str, Any] | None, lone_surrogates: bool) -> None:
        self.lone_surrogates = self.lone_surrogates or lone_surrogates
        self.model = ans.get("model") or self.model
        self.fingerprint = ans.get("system_fingerprint") or self.fingerprint
        if ans.get("usage") is not None:
            self.usage = ans["usage"]
        if choice is not None:
            self.saw_choice = True
            self._choice(choice)

    def _choice(self, choice: Mapping[str, Any]) -> None:
        if self.api == "chat":
            msg = choice.get("delta" if self.streamed else "message") or {}
            if msg.get("refusal"):
                raise CallError(f"refusal: {one_line(msg['refusal'])}", retryable=False, reason="refusal")
            if msg.get("tool_calls") or msg.get("function_call") is not None:
                raise CallError("the answer is a tool call, not a completion", retryable=False, reason="tool_calls")
            content = msg.get("content")
        else:
            content = choice.get("text")
        lp = choice.get("logprobs")
        if lp is not None:
            self._logprobs(lp)
        if content is not None:
            self.text.append(content)
            self.saw_content = True
        elif not self.streamed:
            raise CallError("the answer holds no content", retryable=False, reason="no_content")
        ids = choice.get("token_ids")
        if ids is not None:
            self.choice_ids = (self.choice_ids or []) + ids
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]

    def _logprobs(self, lp: Mapping[str, Any]) -> None:
        """Per-token data in whichever shape came, on either API: chat-shaped entries (llama-server sends them on
        /v1/completions too) or the legacy parallel lists; both at once is not one answer."""
        content, tokens = lp.get("content"), lp.get("tokens")
        if content and tokens:
            raise malformed("choices.logprobs", "holds both content entries and a tokens list")
        if content:
            self._chat_logprobs(content)
        elif tokens is not None:
            self._completion_logprobs(lp)

    def _chat_logprobs(self, content: list[dict[str, Any]]) -> None:
        tops = [e.get("top_logprobs") or () for e in content]
        byts = [e.get("bytes") for e in content]
        self._add(
            [e["token"] for e in content],
            [e.get("id") for e in content],
            [e.get("logprob") for e in content],
            [None if b is None else bytes(b) for b in byts],
            [[t["token"] for t in r] for r in tops],
            [[t.get("id") for t in r] for r in tops],
            [[t.get("logprob") for t in r] for r in tops],
            _ENTRIES,
        )

    def _completion_logprobs(self, lp: Mapping[str, Any]) -> None:
        toks: list[str] = lp["tokens"]
        n = len(toks)
        lps = lp.get("token_logprobs")
        if lps is None:
            lps = [None] * n
        elif len(lps) != n:
            raise malformed("choices.logprobs.token_logprobs", f"{len(lps)} logprobs for {n} tokens")
        tops = lp.get("top_logprobs")
        if tops is None:
            tops = [None] * n
        elif len(tops) != n:
            raise malformed("choices.logprobs.top_logprobs", f"{len(tops)} rows for {n} tokens")
        rows = [r or {} for r in tops]
        self._add(
            toks,
            [None] * n,
            lps,
            [None] * n,
            [list(r) for r in rows],
            [[None] * len(r) for r in rows],
            _top_rows([list(r.values()) for r in rows]),
            _LISTS,
        )

    def _add(
        self,
        toks: list[str],
        ids: list[int | None],
        lps: list[float | None],
        byts: list[bytes | None],
        top_toks: list[list[str]],
        top_ids: list[list[int | None]],
        top_lps: list[list[float | None]],
        shape: _Shape,
    ) -> None:
        """Per-token data of one answer or chunk; types are already checked, only ids (an entry's `id` or a
        "token_id:" string), missing logprobs (NaN) and the order of the alternatives (best first) are left to
        settle."""
        n = len(toks)
        self.shape = shape
        if _TOKEN_ID_PREFIX in "\x00".join(toks):
            for tok, entry_id in zip(toks, ids, strict=True):
                s, i = _split_token(tok, shape.token)
                self.strs.append(s)
                self.str_ids.append(_one_id(i, entry_id, shape.id))
        else:
            self.strs.extend(toks)
            self.str_ids.extend(ids)
        self.logprobs.extend(_floats(lps))
        self.bytes.extend(byts)
        self.any_bytes = self.any_bytes or any(b is not None for b in byts)
        rows = [_floats(r) for r in top_lps] if any(None in r for r in top_lps) else cast("list[list[float]]", top_lps)
        self.any_top = self.any_top or any(rows)
        # The common shapes whole, with list operations only: plain strings, alternatives best first.
        plain = _TOKEN_ID_PREFIX not in "\x00".join(map("\x00".join, top_toks))
        if plain and not any(r[k] < r[k + 1] for r in rows for k in range(len(r) - 1)):
            self.top_strs.extend(top_toks)
            known = not any(None in r for r in top_ids)  # every alternative came with its id
            self.top_ids.extend(cast("list[list[int]]", top_ids) if known else [[] for _ in range(n)])
            self.top_lps.extend(rows)
            return
        for strs, entry_ids, row in zip(top_toks, top_ids, rows, strict=True):
            self._top(strs, entry_ids, row, shape)

    def _top(self, toks: list[str], entry_ids: list[int | None], lps: list[float], shape: _Shape) -> None:
        """One position's alternatives, best first; ids kept when every one came with its id."""
        strs, ids = [], []
        for tok, entry_id in zip(toks, entry_ids, strict=True):
            s, i = _split_token(tok, shape.top)
            strs.append(tok if s is None else s)
            self.top_id_strings = self.top_id_strings or s is None
            i = _one_id(i, entry_id, shape.top_id)
            if i is not None:
                ids.append(i)
        if any(lps[k] < lps[k + 1] for k in range(len(lps) - 1)):  # servers send best first; sort only if not
            order = sorted(range(len(lps)), key=lambda k: -lps[k] if lps[k] == lps[k] else float("inf"))
            strs, lps = [strs[k] for k in order], [lps[k] for k in order]
            ids = [ids[k] for k in order] if len(ids) == len(order) else ids
        self.top_strs.append(strs)
        self.top_ids.append(ids if len(ids) == len(toks) else [])
        self.top_lps.append(lps)

    def result(self) -> Completion:
        n = len(self.strs)
        out = Completion(
            text="".join(self.text), finish_reason=self.finish, model=self.model, system_fingerprint=self.fingerprint
        )
        if self.lone_surrogates:
            self._check_strings(out)
        if self.choice_ids is not None:
            out.token_ids = self.choice_ids
        elif n and all(i is not None for i in self.str_ids):
            out.token_ids = [i for i in self.str_ids if i is not None]
        if n and all(s is not None for s in self.strs):
            out.tokens = [s for s in self.strs if s is not None]
        if n:
            out.logprobs = self.logprobs
        if self.any_bytes and len(self.bytes) == n:
            out.token_bytes = self.bytes
        if self.any_top and len(self.top_lps) == n:
            out.top_logprobs = self.top_lps
            if all(self.top_ids[i] or not self.top_lps[i] for i in range(n)) and any(self.top_ids):
                out.top_token_ids = self.top_ids
            if out.top_token_ids is None or not self.top_id_strings:  # strings that are not "token_id:" stand-ins
                out.top_tokens = self.top_strs
        if out.token_ids is not None and n and len(out.token_ids) != n:
            # Ids and logprobs disagree on the length: keep the ids (the canonical record), drop per-token extras.
            out.tokens = out.token_bytes = out.logprobs = out.top_tokens = out.top_token_ids = out.top_logprobs = None
        if self.usage:
            out.prompt_tokens = self.usage.get("prompt_tokens")
            out.completion_tokens = self.usage.get("completion_tokens")
            out.cached_tokens = _cached_tokens(self.usage, out.prompt_tokens)
        return out

    def _check_strings(self, out: Completion) -> None:
        msg = "delta" if self.streamed else "message"
        _check_text(out.text, f"choices.{msg}.content" if self.api == "chat" else "choices.text")
        _check_text(out.model, "model")
        _check_text(out.system_fingerprint, "system_fingerprint")
        _check_text(out.finish_reason, "choices.finish_reason")
        for s in self.strs:
            _check_text(s, self.shape.token)
        for row in self.top_strs:
            for s in row:
                _check_text(s, self.shape.top)


def _cached_tokens(usage: Mapping[str, Any], prompt_tokens: int | None) -> int | None:
    """usage.prompt_tokens_details.cached_tokens (its type already checked): no more than the prompt's tokens, or
    the answer is not telling the truth about its cache. None when the server reports nothing."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None and prompt_tokens is not None and cached > prompt_tokens:
        raise malformed(
            "usage.prompt_tokens_details.cached_tokens", f"{cached} cached of {prompt_tokens} prompt tokens"
        )
    return cached


def _answer(data: bytes | bytearray, api: Api, streamed: bool) -> tuple[dict[str, Any], bool]:
    """One answer or stream event, checked by its schema -> (its fields, whether strings may hold lone surrogates).

    The common case is one pass of pydantic's JSON parser (no second object graph: the garbage collector's work
    dominates the cost otherwise); whatever it refuses is parsed again to say exactly why."""
    try:
        return SCHEMAS[api, streamed].validate_json(data), False
    except ValidationError:
        pass
    obj, lone_surrogates = _loads(data)
    what = "stream event" if streamed else "response"
    if not isinstance(obj, dict):
        raise _not_openai(obj, what)
    if obj.get("error") is not None and (streamed or "choices" not in obj):
        raise _server_error(obj, streamed)
    if "choices" not in obj:
        raise _not_openai(obj, what)
    return validate(api, streamed, obj), lone_surrogates


def parse_answer(data: bytes | bytearray, api: Api) -> Completion:
    """One whole (unstreamed) answer body -> Completion, or CallError with its reason."""
    ans, lone_surrogates = _answer(data, api, streamed=False)
    choice = _pick_choice(ans["choices"])
    if choice is None:
        raise CallError("the answer has no choices", retryable=True, reason="choice_index")
    acc = _Acc(api, streamed=False)
    acc.add(ans, choice, lone_surrogates)
    return acc.result()


class StreamParser:
    """The events of one SSE stream -> Completion. Feed it the stream's lines; `result()` at [DONE] or the end."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.acc = _Acc(api, streamed=True)
        self.done = False

    def line(self, line: bytes) -> bool:
        """Take one line of the stream; True once it was [DONE]. Comments, other SSE fields and empty data (a
        keep-alive) are skipped."""
        if not line.startswith(b"data:"):
            return False
        data = line[5:].strip()
        if not data:
            return False
        if data == b"[DONE]":
            self.done = True
            return True
        try:
            self.event(data)
        except CallError as e:
            e.raw = data[: RAW_CHARS * 2].decode("utf-8", "replace")
            raise
        return False

    def event(self, data: bytes) -> None:
        chunk, lone_surrogates = _answer(data, self.api, streamed=True)
        if chunk.get("error") is not None:
            raise _server_error(chunk, streamed=True)
        self.acc.add(chunk, _pick_choice(chunk["choices"]), lone_surrogates)

    def result(self) -> Completion:
        # Some servers (transformers serve) close a finished stream without [DONE]; a finish_reason still proves
        # the end was reached. Neither means the stream was cut.
        acc = self.acc
        if not self.done and acc.finish is None:
            raise CallError(
                "stream ended before [DONE] or a finish_reason (truncated)", retryable=True, reason="truncated_stream"
            )
        if not acc.saw_choice:
            raise CallError("stream ended without any choice data", retryable=True, reason="empty_stream")
        if not acc.saw_content:
            raise CallError("the streamed answer holds no content", retryable=False, reason="no_content")
        return acc.result()
