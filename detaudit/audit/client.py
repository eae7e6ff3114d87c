"""Async client for OpenAI-compatible endpoints: chat and completions, whole or streamed, with retries.

Why not the openai SDK: detaudit needs what the SDK hides or drops — vLLM's `token_ids` and "token_id:123" token
strings, per-token `bytes`, the exact failure of each attempt, Retry-After on every retryable answer, and a
connection pool sized to the arm's concurrency. One `Completion` per request, parsed the same way whichever API or
transport produced it. There is no response cache of any kind: every call is a fresh HTTP request.

Every answer is parsed strictly: it is checked against a typed schema (pydantic, strict: no bool for an int, no
string for a number, no NaN, ids in int32, bytes in 0..255), and what the parser returns always fits the samples
table; anything else is a CallError whose `reason` names the field (`malformed:choices.logprobs.content.bytes`).
An attempt is bounded in time (`timeout`: connect and the whole body) and in size (`max_response_bytes`).

Secrets: the API key and header values stay in this object's memory; every error message and every raw answer
kept for inspection passes the Scrubber.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from itertools import chain
from typing import Annotated, Any, Literal, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio
import httpx
import orjson
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

from detaudit.redact import Scrubber, redact_url, url_secrets
from detaudit.rundir.schema import DEFAULT_MAX_RESPONSE_BYTES

Api = Literal["chat", "completions"]
PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
MAX_RETRY_AFTER_S = 120.0
POOL_SIZE = 32  # connections per httpx pool (see OpenAIClient.__init__)
RAW_CHARS = 2048  # how much of a failed answer is kept (raw_answer)
ERROR_BODY_BYTES = 64 * 1024  # how much of a non-200 body is read: its message is at the start
_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = 3.4028234663852886e38
_TOKEN_ID_PREFIX = "token_id:"
_NAN = float("nan")


class CallError(Exception):
    """One failed attempt: why (`reason`, from the vocabulary of the samples' error_reason column), whether another
    attempt may succeed, the server's Retry-After if any, and the start of what the server sent (`raw`)."""

    def __init__(self, message: str, *, retryable: bool, reason: str, status: int | None = None,
                 retry_after: float | None = None, raw: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.retryable = retryable
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.raw = raw


def _malformed(field: str, why: str) -> CallError:
    return CallError(f"malformed answer: {field}: {_one_line(why)}", retryable=True, reason=f"malformed:{field}")


@dataclass
class Completion:
    """What one successful request returned, in the columns of the samples table (and only their types)."""

    text: str
    finish_reason: str | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    token_ids: list[int] | None = None
    tokens: list[str] | None = None
    token_bytes: list[bytes | None] | None = None
    logprobs: list[float] | None = None
    top_tokens: list[list[str]] | None = None
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def columns(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class CallResult:
    """A request after its retries: a Completion, or the reason it failed; never both, never neither."""

    completion: Completion | None
    error: str | None
    attempts: int
    started_at: datetime
    finished_at: datetime
    latency_s: float
    errors: list[str] = field(default_factory=list)
    error_reason: str | None = None  # the last attempt's CallError.reason
    raw_answer: str | None = None  # the last attempt's CallError.raw


# ---------------------------------------------------------------------------- the answer schema
# What an answer may hold, field by field, strictly: a number is an int or a float (never a bool or a string), a
# string is a string. Fields detaudit does not record are not checked. Bounds are those of the samples columns:
# ids and counts in int32, logprobs finite and within float32, bytes 0..255.

_Logprob = Annotated[float, Field(ge=-_FLOAT32_MAX, le=_FLOAT32_MAX, allow_inf_nan=False)]
_Id = Annotated[int, Field(ge=0, le=_INT32_MAX)]
_Byte = Annotated[int, Field(ge=0, le=255)]
_STRICT = ConfigDict(strict=True)


_T = TypeVar("_T")
# A list validated up to its first bad entry: an 8 MiB answer of bad entries would otherwise cost seconds of
# event-loop time collecting every error, of which only the first is reported.
_List = Annotated[list[_T], Field(fail_fast=True)]


@with_config(_STRICT)
class _Usage(TypedDict):
    prompt_tokens: NotRequired[_Id | None]
    completion_tokens: NotRequired[_Id | None]


@with_config(_STRICT)
class _ChatTop(TypedDict):
    token: str
    logprob: NotRequired[_Logprob | None]


@with_config(_STRICT)
class _ChatEntry(TypedDict):
    token: str
    logprob: NotRequired[_Logprob | None]
    bytes: NotRequired[_List[_Byte] | None]
    top_logprobs: NotRequired[_List[_ChatTop] | None]


@with_config(_STRICT)
class _ChatLogprobs(TypedDict):
    content: NotRequired[_List[_ChatEntry] | None]


@with_config(_STRICT)
class _Message(TypedDict):
    content: NotRequired[str | None]
    refusal: NotRequired[str | None]
    tool_calls: NotRequired[_List[Any] | None]
    function_call: NotRequired[Any]


@with_config(_STRICT)
class _ChatChoice(TypedDict):
    index: NotRequired[int]
    message: _Message
    logprobs: NotRequired[_ChatLogprobs | None]
    finish_reason: NotRequired[str | None]
    token_ids: NotRequired[_List[_Id] | None]


@with_config(_STRICT)
class _ChatChunkChoice(TypedDict):
    index: NotRequired[int]
    delta: NotRequired[_Message | None]
    logprobs: NotRequired[_ChatLogprobs | None]
    finish_reason: NotRequired[str | None]
    token_ids: NotRequired[_List[_Id] | None]


@with_config(_STRICT)
class _ComplLogprobs(TypedDict):
    tokens: NotRequired[_List[str] | None]
    token_logprobs: NotRequired[_List[_Logprob | None] | None]
    # token -> logprob; the values are checked by _top_rows (a dict cannot stop at its first bad entry)
    top_logprobs: NotRequired[_List[dict[str, Any] | None] | None]


@with_config(_STRICT)
class _ComplChoice(TypedDict):
    index: NotRequired[int]
    text: NotRequired[str | None]
    logprobs: NotRequired[_ComplLogprobs | None]
    finish_reason: NotRequired[str | None]
    token_ids: NotRequired[_List[_Id] | None]


@with_config(_STRICT)
class _ChatAnswer(TypedDict):
    model: NotRequired[str | None]
    system_fingerprint: NotRequired[str | None]
    usage: NotRequired[_Usage | None]
    choices: _List[_ChatChoice]


@with_config(_STRICT)
class _ChatChunk(TypedDict):
    error: NotRequired[Any]  # an error event that also carries choices
    model: NotRequired[str | None]
    system_fingerprint: NotRequired[str | None]
    usage: NotRequired[_Usage | None]
    choices: _List[_ChatChunkChoice]


@with_config(_STRICT)
class _ComplAnswer(TypedDict):
    error: NotRequired[Any]  # an error event that also carries choices (streams)
    model: NotRequired[str | None]
    system_fingerprint: NotRequired[str | None]
    usage: NotRequired[_Usage | None]
    choices: _List[_ComplChoice]


# (api, streamed) -> the validator of one whole answer or one stream chunk
_SCHEMAS: dict[tuple[str, bool], TypeAdapter[Any]] = {
    ("chat", False): TypeAdapter(_ChatAnswer),
    ("chat", True): TypeAdapter(_ChatChunk),
    ("completions", False): TypeAdapter(_ComplAnswer),
    ("completions", True): TypeAdapter(_ComplAnswer),
}


def _validate(api: Api, streamed: bool, obj: dict[str, Any]) -> dict[str, Any]:
    """The answer as checked by its schema, or a CallError naming the first bad field (dotted, no list indices)."""
    try:
        return _SCHEMAS[api, streamed].validate_python(obj)
    except ValidationError as e:
        first = e.errors(include_url=False, include_context=False, include_input=False)[0]
        raise _malformed(_field_path(first["loc"]), first["msg"]) from None


def _field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as the reason's field: dotted, list positions left out."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            continue
        parts.append(p)
        if parts == ["choices", "logprobs", "top_logprobs"]:
            break  # what follows is a completions top_logprobs key: a token, not a field
    return ".".join(parts)


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


def _one_line(text: str, limit: int = 200) -> str:
    """Server text for a message: one line, bounded, storable as UTF-8 (a lone surrogate becomes '?')."""
    head = text[: limit * 4]  # an 8 MiB error message is cut before it is worked on
    return " ".join(head.encode("utf-8", "replace").decode("utf-8").split())[:limit]


def _text_of(value: Any) -> str:
    """A value the server sent, as one bounded line: a string as it is, anything else as compact JSON (str() of a
    deeply nested list would recurse past Python's limit)."""
    if isinstance(value, str):
        return _one_line(value)
    try:
        return _one_line(orjson.dumps(value).decode())
    except orjson.JSONEncodeError:  # nested past orjson's limit, or a lone surrogate
        return f"({type(value).__name__})"


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _error_message(body: bytes, content_type: str) -> str:
    """The server's own error message when it sent one in OpenAI shape, else the start of the body: one line."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return _text_of(err["message"])
        if isinstance(err, str):
            return _one_line(err)
        if "detail" in obj:
            return _text_of(obj["detail"])
    text = _one_line(body.decode("utf-8", "replace"), 400)
    if "html" in content_type or text.lower().startswith(("<!doctype", "<html")):
        return "HTML error page" + (f" ({text[:80]})" if text else "")
    return text[:200] or "(empty body)"


def _server_error(obj: Mapping[str, Any], streamed: bool) -> CallError:
    err = obj["error"]
    msg = _text_of(err.get("message") if isinstance(err, dict) else err)
    where = "error event in stream" if streamed else "server error in a 200 answer"
    return CallError(f"{where}: {msg}", retryable=True, reason="server_error")


def _not_openai(obj: Any, what: str) -> CallError:
    if not isinstance(obj, dict):
        return CallError(f"{what} is not a JSON object", retryable=True, reason="not_openai")
    keys = ", ".join(sorted(_one_line(str(k), 40) for k in obj)[:6])
    return CallError(f"{what} is not an OpenAI completion (keys: {keys or 'none'})", retryable=True,
                     reason="not_openai")  # fmt: skip


def _pick_choice(choices: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The choice with index 0 (an entry without an index has its list position); None for an empty list. Any
    other index, or the same index twice, is not an answer to one n=1 request."""
    if not choices:
        return None
    indices = [c.get("index", pos) for pos, c in enumerate(choices)]
    if indices.count(0) != 1 or len(set(indices)) != len(indices):
        shown = _one_line(", ".join(str(i)[:12] for i in indices[:8]))
        raise CallError(f"choice indices [{shown}] are not one choice with index 0", retryable=True,
                        reason="choice_index")  # fmt: skip
    return choices[indices.index(0)]


def _split_token(tok: str, where: str) -> tuple[str | None, int | None]:
    """vLLM's return_tokens_as_token_ids gives "token_id:123": an id, not a string."""
    if tok.startswith(_TOKEN_ID_PREFIX):
        digits = tok[len(_TOKEN_ID_PREFIX) :]
        if digits.isascii() and digits.isdigit():
            if len(digits.lstrip("0")) > 10 or int(digits) > _INT32_MAX:
                raise _malformed(where, f"token id {digits[:20]} is outside int32")
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
    if not kinds <= {float, int} or not all(-_FLOAT32_MAX <= v <= _FLOAT32_MAX for v in flat):
        raise _malformed("choices.logprobs.top_logprobs", "a logprob must be a finite number within float32")
    return [[float(v) for v in r] for r in rows] if int in kinds else rows


def _check_text(value: str | None, where: str) -> None:
    """A string that came through the lone-surrogate JSON path must still be writable as UTF-8."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _malformed(where, "lone surrogate in a string") from None


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
                raise CallError(f"refusal: {_one_line(msg['refusal'])}", retryable=False, reason="refusal")
            if msg.get("tool_calls") or msg.get("function_call") is not None:
                raise CallError("the answer is a tool call, not a completion", retryable=False, reason="tool_calls")
            content = msg.get("content")
            lp = choice.get("logprobs")
            if lp is not None and lp.get("content"):
                self._chat_logprobs(lp["content"])
        else:
            content = choice.get("text")
            lp = choice.get("logprobs")
            if lp is not None and lp.get("tokens") is not None:
                self._completion_logprobs(lp)
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

    def _chat_logprobs(self, content: list[dict[str, Any]]) -> None:
        tops = [e.get("top_logprobs") or () for e in content]
        byts = [e.get("bytes") for e in content]
        self._add([e["token"] for e in content], [e.get("logprob") for e in content],
                  [None if b is None else bytes(b) for b in byts], [[t["token"] for t in r] for r in tops],
                  [[t.get("logprob") for t in r] for r in tops], "choices.logprobs.content")  # fmt: skip

    def _completion_logprobs(self, lp: Mapping[str, Any]) -> None:
        toks: list[str] = lp["tokens"]
        n = len(toks)
        lps = lp.get("token_logprobs")
        if lps is None:
            lps = [None] * n
        elif len(lps) != n:
            raise _malformed("choices.logprobs.token_logprobs", f"{len(lps)} logprobs for {n} tokens")
        tops = lp.get("top_logprobs")
        if tops is None:
            tops = [None] * n
        elif len(tops) != n:
            raise _malformed("choices.logprobs.top_logprobs", f"{len(tops)} rows for {n} tokens")
        rows = [r or {} for r in tops]
        self._add(toks, lps, [None] * n, [list(r) for r in rows], _top_rows([list(r.values()) for r in rows]),
                  "choices.logprobs")  # fmt: skip

    def _add(self, toks: list[str], lps: list[float | None], byts: list[bytes | None], top_toks: list[list[str]],
             top_lps: list[list[float | None]], where: str) -> None:  # fmt: skip
        """Per-token data of one answer or chunk; types are already checked, only "token_id:" strings, missing
        logprobs (NaN) and the order of the alternatives (best first) are left to settle."""
        n = len(toks)
        chat = self.api == "chat"
        if _TOKEN_ID_PREFIX in "\x00".join(toks):
            tok_field = f"{where}.token" if chat else f"{where}.tokens"
            for tok in toks:
                s, i = _split_token(tok, tok_field)
                self.strs.append(s)
                self.str_ids.append(i)
        else:
            self.strs.extend(toks)
            self.str_ids.extend([None] * n)
        self.logprobs.extend(_floats(lps))
        self.bytes.extend(byts)
        self.any_bytes = self.any_bytes or any(b is not None for b in byts)
        rows = [_floats(r) for r in top_lps] if any(None in r for r in top_lps) else cast("list[list[float]]", top_lps)
        self.any_top = self.any_top or any(rows)
        # The common shape whole, with list operations only: plain strings, alternatives best first.
        plain = _TOKEN_ID_PREFIX not in "\x00".join(map("\x00".join, top_toks))
        if plain and not any(r[k] < r[k + 1] for r in rows for k in range(len(r) - 1)):
            self.top_strs.extend(top_toks)
            self.top_ids.extend([[] for _ in range(n)])
            self.top_lps.extend(rows)
            return
        top_field = f"{where}.top_logprobs.token" if chat else f"{where}.top_logprobs"
        for strs, row in zip(top_toks, rows, strict=True):
            self._top(strs, row, top_field)

    def _top(self, toks: list[str], lps: list[float], where: str) -> None:
        """One position's alternatives, best first; ids kept when every one was a "token_id:" string."""
        strs, ids = [], []
        for tok in toks:
            s, i = _split_token(tok, where)
            strs.append(tok if s is None else s)
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
        out = Completion(text="".join(self.text), finish_reason=self.finish, model=self.model,
                         system_fingerprint=self.fingerprint)  # fmt: skip
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
            else:
                out.top_tokens = self.top_strs
        if out.token_ids is not None and n and len(out.token_ids) != n:
            # Ids and logprobs disagree on the length: keep the ids (the canonical record), drop per-token extras.
            out.tokens = out.token_bytes = out.logprobs = out.top_tokens = out.top_token_ids = out.top_logprobs = None
        if self.usage:
            out.prompt_tokens = self.usage.get("prompt_tokens")
            out.completion_tokens = self.usage.get("completion_tokens")
        return out

    def _check_strings(self, out: Completion) -> None:
        msg = "delta" if self.streamed else "message"
        _check_text(out.text, f"choices.{msg}.content" if self.api == "chat" else "choices.text")
        _check_text(out.model, "model")
        _check_text(out.system_fingerprint, "system_fingerprint")
        _check_text(out.finish_reason, "choices.finish_reason")
        where = "choices.logprobs.content" if self.api == "chat" else "choices.logprobs"
        for s in self.strs:
            _check_text(s, f"{where}.token" if self.api == "chat" else f"{where}.tokens")
        for row in self.top_strs:
            for s in row:
                _check_text(s, f"{where}.top_logprobs.token" if self.api == "chat" else f"{where}.top_logprobs")


def _answer(data: bytes | bytearray, api: Api, streamed: bool) -> tuple[dict[str, Any], bool]:
    """One answer or stream event, checked by its schema -> (its fields, whether strings may hold lone surrogates).

    The common case is one pass of pydantic's JSON parser (no second object graph: the garbage collector's work
    dominates the cost otherwise); whatever it refuses is parsed again to say exactly why."""
    try:
        return _SCHEMAS[api, streamed].validate_json(data), False
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
    return _validate(api, streamed, obj), lone_surrogates


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
            raise CallError("stream ended before [DONE] or a finish_reason (truncated)", retryable=True,
                            reason="truncated_stream")  # fmt: skip
        if not acc.saw_choice:
            raise CallError("stream ended without any choice data", retryable=True, reason="empty_stream")
        if not acc.saw_content:
            raise CallError("the streamed answer holds no content", retryable=False, reason="no_content")
        return acc.result()


class _Received:
    """What one attempt has received so far: the byte count and the start (for raw_answer)."""

    __slots__ = ("total", "head")

    def __init__(self) -> None:
        self.total = 0
        self.head = bytearray()

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = RAW_CHARS * 2 - len(self.head)  # some slack: a secret cut at the boundary is still scrubbed
        if room > 0:
            self.head += chunk[:room]


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One verified TLS context for all pools (building one per pool costs ~0.1 s each)."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


class OpenAIClient:
    """One connection pool to one endpoint. Use as `async with OpenAIClient(...) as c:`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        backoff_max: float = 20.0,
        max_connections: int = 64,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        scrubber: Scrubber | None = None,
    ) -> None:
        # A query on the base URL (Azure's api-version, a key parameter) goes on every request, not into the path.
        parts = urlsplit(base_url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        self.base_url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.scrubber = scrubber or Scrubber()
        self.scrubber.add(api_key)
        for s in url_secrets(base_url):
            self.scrubber.add(s)
        all_headers = {"Accept": "application/json"}
        if api_key:
            all_headers["Authorization"] = f"Bearer {api_key}"
        for k, v in (headers or {}).items():
            all_headers[k] = v
            self.scrubber.add(v)
        # httpx scans its whole pool on every request, so one pool of ~1000 connections costs more CPU than the
        # requests; several small pools, each used by a fixed set of workers, keep that scan short.
        n_pools = max(1, -(-max_connections // POOL_SIZE))
        per_pool = -(-max_connections // n_pools)
        verify = _ssl_context()
        # httpx's connect and idle-read limits stay; the deadline around each attempt (request()) bounds the whole.
        self._pools = [
            httpx.AsyncClient(
                verify=verify,
                base_url=self.base_url,
                params=query,
                headers=all_headers,
                timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
                limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
                follow_redirects=False,
            )
            for _ in range(n_pools)
        ]
        self._next_pool = 0

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()

    def _pool(self, slot: int | None) -> httpx.AsyncClient:
        if slot is None:
            slot = self._next_pool
            self._next_pool += 1
        return self._pools[slot % len(self._pools)]

    def _scrub(self, text: str) -> str:
        return self.scrubber.scrub(text)

    def _raw(self, data: bytes | bytearray | str | None) -> str | None:
        """The start of what the server sent, as text that is safe to store: decoded, scrubbed, bounded."""
        if not data:
            return None
        text = data if isinstance(data, str) else bytes(data[: RAW_CHARS * 2]).decode("utf-8", "replace")
        return self._scrub(text)[:RAW_CHARS]

    def _transport_error(self, e: Exception, raw: str | None) -> CallError:
        if isinstance(e, httpx.TimeoutException):
            kind = type(e).__name__
            return CallError(f"timeout ({kind}) after {self.timeout:g}s", retryable=True, reason="timeout", raw=raw)
        if isinstance(e, httpx.ConnectError):
            where = redact_url(self.base_url)
            return CallError(self._scrub(f"cannot connect to {where}: {_one_line(str(e)) or type(e).__name__}"),
                             retryable=True, reason="connect")  # fmt: skip
        if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return CallError(self._scrub(f"connection broken ({type(e).__name__}: {_one_line(str(e))})"),
                             retryable=True, reason="broken", raw=raw)  # fmt: skip
        return CallError(self._scrub(f"{type(e).__name__}: {_one_line(str(e))}"), retryable=True, reason="broken",
                         raw=raw)  # fmt: skip

    def _status_error(self, resp: httpx.Response, body: bytes) -> CallError:
        msg = self._scrub(f"HTTP {resp.status_code}: {_error_message(body, resp.headers.get('content-type', ''))}")
        return CallError(msg, retryable=resp.status_code in RETRYABLE_STATUS, reason=f"http:{resp.status_code}",
                         status=resp.status_code, retry_after=_retry_after(resp.headers),
                         raw=self._raw(body))  # fmt: skip

    def _too_large(self) -> CallError:
        return CallError(f"answer larger than {self.max_response_bytes} bytes (--max-response-bytes)",
                         retryable=False, reason="too_large")  # fmt: skip

    async def _read(self, resp: httpx.Response, got: _Received, limit: int, *, cut: bool = False) -> bytearray:
        """The body, read no further than `limit` bytes: past it, a too_large error (or, with `cut`, its start)."""
        declared = resp.headers.get("content-length", "")
        if not cut and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise self._too_large()
        buf = bytearray()
        async for chunk in resp.aiter_bytes():
            got.add(chunk)
            buf += chunk
            if len(buf) > limit:
                if cut:
                    return buf[:limit]
                raise self._too_large()
        return buf

    async def _send(self, api: Api, body: Mapping[str, Any], stream: bool, http: httpx.AsyncClient,
                    got: _Received) -> Completion:  # fmt: skip
        payload = {**body, "stream": True} if stream else dict(body)
        async with http.stream("POST", PATHS[api], json=payload) as resp:
            if resp.status_code != 200:
                raise self._status_error(resp, bytes(await self._read(resp, got, ERROR_BODY_BYTES, cut=True)))
            if stream:
                return await self._read_stream(resp, api, got)
            return parse_answer(await self._read(resp, got, self.max_response_bytes), api)

    async def _read_stream(self, resp: httpx.Response, api: Api, got: _Received) -> Completion:
        declared = resp.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_response_bytes:
            raise self._too_large()
        parser = StreamParser(api)
        pending = bytearray()
        async for chunk in resp.aiter_bytes():
            got.add(chunk)
            if got.total > self.max_response_bytes:
                raise self._too_large()
            pending += chunk
            end = pending.rfind(b"\n")
            if end < 0:
                continue
            lines = bytes(pending[:end]).splitlines()
            del pending[: end + 1]
            for line in lines:
                if parser.line(line):
                    return parser.result()
        for line in bytes(pending).splitlines():
            if parser.line(line):
                break
        return parser.result()

    async def request(self, api: Api, body: Mapping[str, Any], *, stream: bool = False,
                      slot: int | None = None) -> Completion:  # fmt: skip
        """One attempt, connect to the last byte within `timeout` s. Raises CallError. `slot` (e.g. a worker's
        number) picks the connection pool."""
        got = _Received()
        try:
            with anyio.fail_after(self.timeout):
                return await self._send(api, body, stream, self._pool(slot), got)
        except TimeoutError:
            msg = f"deadline: no whole answer within {self.timeout:g}s ({got.total} bytes received)"
            raise CallError(msg, retryable=True, reason="deadline", raw=self._raw(got.head)) from None
        except httpx.HTTPError as e:
            raise self._transport_error(e, self._raw(got.head)) from None
        except CallError as e:
            raw = self._raw(e.raw if e.raw is not None else got.head)
            raise CallError(_one_line(self._scrub(str(e)), 400), retryable=e.retryable, reason=e.reason,
                            status=e.status, retry_after=e.retry_after, raw=raw) from None  # fmt: skip

    async def list_models(self) -> list[str]:
        """Model ids from GET /models (one attempt, bounded like any other; callers turn failures into usage
        errors)."""
        got = _Received()
        try:
            with anyio.fail_after(self.timeout):
                async with self._pools[0].stream("GET", "/models") as resp:
                    if resp.status_code != 200:
                        raise self._status_error(resp, bytes(await self._read(resp, got, ERROR_BODY_BYTES, cut=True)))
                    body = await self._read(resp, got, self.max_response_bytes)
        except TimeoutError:
            raise CallError(f"/models did not answer within {self.timeout:g}s", retryable=True,
                            reason="deadline") from None  # fmt: skip
        except httpx.HTTPError as e:
            raise self._transport_error(e, self._raw(got.head)) from None
        try:
            data = orjson.loads(body).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            raise CallError("/models answer is not OpenAI JSON", retryable=False, reason="not_openai") from None
        if not isinstance(data, list):
            raise CallError("/models answer has no data list", retryable=False, reason="not_openai")
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def _delay(self, attempt: int, err: CallError) -> float:
        if err.retry_after is not None:
            return min(err.retry_after, MAX_RETRY_AFTER_S)
        base = min(self.backoff * (2 ** (attempt - 1)), self.backoff_max)
        return base * random.uniform(0.5, 1.0)

    async def call(self, api: Api, body: Mapping[str, Any], *, stream: bool = False,
                   slot: int | None = None) -> CallResult:  # fmt: skip
        """Up to 1 + retries attempts with exponential backoff (Retry-After wins); a failure is a result too."""
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        errors: list[str] = []
        attempt = 0
        while True:
            attempt += 1
            try:
                completion = await self.request(api, body, stream=stream, slot=slot)
            except CallError as e:
                errors.append(str(e))
                if not e.retryable or attempt > self.retries:
                    reason = str(e) if attempt == 1 else f"{e} (after {attempt} attempts)"
                    return CallResult(None, reason, attempt, started, datetime.now(timezone.utc),
                                      time.perf_counter() - t0, errors, e.reason, e.raw)  # fmt: skip
                await asyncio.sleep(self._delay(attempt, e))
                continue
            return CallResult(completion, None, attempt, started, datetime.now(timezone.utc),
                              time.perf_counter() - t0, errors)  # fmt: skip
