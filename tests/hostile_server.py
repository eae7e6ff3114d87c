"""A hostile OpenAI-compatible server on 127.0.0.1: hundreds of good answers, and one poisoned answer among them.

Why: the audit's counts must stay exact whatever an endpoint sends (issue #15). A fault injector that only sends
5xx and resets (tests/scripted_server.py) misses the answers that look like completions but are not: wrong types,
missing content, hostile strings, answers that never end. This server is a ScriptedServer (same sockets, uvicorn,
scripts and schedules; see that module) that poisons chosen arrivals with one named mode::

    from hostile_server import HostileServer       # tests/ is on sys.path under pytest

    server = HostileServer(completions={"A": [...]}, default="A",
                           poison={"mode": "model_int", "at": [7], "prompts": ["hi"]}).start()
    server.set_poison({"mode": "trickle", "rate": 0.01, "seed": 3})   # replace the poison between runs
    p = server.add_poison({"mode": "reset", "at": [0], "prompts": ["other"]})  # one more, for another prompt
    server.poisoned, p.poisoned                    # how many answers were poisoned so far (all, that spec's)

Poison spec: ``mode`` (one of MODES), then which arrivals of the completion paths get it: ``at`` (0-based arrival
numbers, counted over the requests the spec applies to) and/or ``rate`` with ``seed`` (a seeded draw per arrival);
``prompts`` limits it to requests for these prompt texts (to spare the capability probe of `detaudit run`, or to
let runs of different prompts share one server at the same time, each with a spec of its own). Every other request
gets its normal scripted answer; a poisoned one never uses a schedule slot. ``hold_s`` (default 8) bounds the
modes that stall, so a server never outlives its test by much.

Modes. The expected row is for one poisoned answer in `detaudit run --retries 0` (tests/test_hostile.py, where the
stream variant differs it is given after "/"); "ok" means the answer is legitimately usable. Reasons are the
`error_reason` vocabulary of samples.parquet (docs/schema.md).

================== ================================================ ===============================================
mode               what is sent                                     expected row
================== ================================================ ===============================================
**wrong types**
model_int          ``"model": 123``                                 malformed:model
prompt_tokens_str  ``usage.prompt_tokens: "8"``                     malformed:usage.prompt_tokens
usage_huge         ``usage.prompt_tokens: 10**30`` (beyond int64)   malformed:usage.prompt_tokens
token_id_huge      a token id of 2**40 (beyond int32)               malformed:choices.token_ids
token_id_float     a token id of 1000.5                             malformed:choices.token_ids
token_id_bool      a token id of ``true``                           malformed:choices.token_ids
finish_reason_dict ``finish_reason: {"type": "stop"}``              malformed:choices.finish_reason
surrogate_token    a lone surrogate ``"\ud800"`` as a token string  malformed:choices.logprobs.content.token
surrogate_content  a lone surrogate escape ending the content       malformed:choices.message.content / .delta.
bytes_over_255     a token's ``bytes: [300]``                       malformed:choices.logprobs.content.bytes
logprob_str        a logprob as the string ``"-0.05"``              malformed:choices.logprobs.content.logprob
logprob_nan        a bare ``NaN`` literal as a logprob (not JSON)   malformed:json
logprob_infinity   a bare ``-Infinity`` literal (not JSON)          malformed:json
top_logprobs_dict  ``top_logprobs: {"a": -1.0}``, not a list        malformed:choices.logprobs.content.top_logprobs
content_list       content ``[{"type": "text", "text": ...}]``      malformed:choices.message.content / .delta.
content_int        ``content: 42``                                  malformed:choices.message.content
fingerprint_object ``system_fingerprint: {"id": "fp"}``             malformed:system_fingerprint
choices_object     ``choices: {"0": {...}}``, not a list            malformed:choices
**not a completion**
content_null       ``content: null``, no logprobs, nothing else     no_content
refusal            ``content: null``, ``refusal: "I can't ..."``    refusal
tool_calls         ``content: null``, one ``tool_calls`` entry      tool_calls
empty_stream       (stream) ``data: [DONE]`` and nothing before     empty_stream
zero_choices       ``choices: []`` (streams: in every chunk)        choice_index / empty_stream
index_1_first      two choices, the first ``index: 1``, other text  ok: the choice with index 0 is the answer
only_index_1       one choice, ``index: 1``                         choice_index
duplicate_index    two choices with ``index: 0``                    choice_index
error_200          HTTP 200 with an OpenAI error object             server_error
error_event        (stream) one chunk, then an error event          server_error
not_openai         ``{"hello": "world"}``                           not_openai
array_body         the completion wrapped in a JSON array           not_openai
**wire abuse**
trickle            the body one byte every 0.5 s (for hold_s)       deadline
keepalive          SSE comments (whole: spaces) for hold_s first    deadline
huge               10 MiB of content (streams: in the first chunk)  too_large
truncated_json     200 with JSON cut short (streams: in an event)   malformed:json
empty_body         200 with an empty body                           malformed:json / truncated_stream
html_200           200 with a ``text/html`` page                    malformed:json
reset              the connection closed in the middle of the body  broken
gzip_lie           ``Content-Encoding: gzip`` on a plain body       broken
truncated_stream   (stream) half the chunks, a clean close, no DONE truncated_stream
json_bomb          100,000 nested arrays                            malformed:json
redirect           307 to a closed port                             http:307
**hostile strings**
osc_fingerprint    OSC set-title sequence in ``system_fingerprint`` ok, shown escaped
csi_fingerprint    CSI clear-screen and C1 CSI in the fingerprint   ok, shown escaped
osc_models         /v1/models lists one model, named with OSC/CSI   ok, shown escaped
osc_error          HTTP 500, the message holds OSC/CSI/C1/BEL/CR    http:500; on every request: exit 2, escaped
bidi_token         the last token in U+202E ... U+202C              ok (a fork), shown escaped
c1_token           the last token gains C1 CSI, BEL and a lone CR   ok (a fork), shown escaped
mention_token      the last token becomes ``@everyone``             ok (a fork)
**secrets**
echo_auth          HTTP 500 echoing the Authorization header        http:500; on every request: exit 2; scrubbed
**legitimately fine**
duplicate_keys     ``choices``/``model`` twice, the good ones last  ok
extra_fields       unknown fields of odd types at every level       ok
nulls              ``system_fingerprint: null``, ``usage: null``    ok
================== ================================================ ===============================================

Standalone: ``python tests/hostile_server.py --script script.json`` (the script holds HostileServer keyword
arguments, ``poison`` included) prints ``READY <base_url>``, like scripted_server.py.
"""

from __future__ import annotations

import copy
import json
import random
import threading
from collections.abc import Callable
from typing import Any

from scripted_server import ScriptedServer, _Answer, _err, _json, _raw, _reset_mid_body, _slow_send, _Token, main

HOSTILE_MODEL = "\x1b]0;pwned\x07model\x1b[2J"
HUGE_BYTES = 10 * 2**20
TRICKLE_S = 0.5
KEEPALIVE_S = 0.25
NEST = 100_000

Obj = dict[str, Any]
Mutate = Callable[[Obj, int], None]  # (answer or stream chunk, chunk number) -> None, in place


# ---------------------------------------------------------------------------- JSON mutations


def _choices(obj: Obj) -> list[Obj]:
    choices = obj.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _message(choice: Obj) -> Obj:
    msg = choice.get("message", choice.get("delta"))
    return msg if isinstance(msg, dict) else {}


def _lp_entries(obj: Obj) -> list[Obj]:
    out: list[Obj] = []
    for c in _choices(obj):
        lp = c.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            out += lp["content"]
    return out


def _set_usage(field: str, value: Any) -> Mutate:
    def mutate(obj: Obj, i: int) -> None:
        if isinstance(obj.get("usage"), dict):
            obj["usage"][field] = value

    return mutate


def _set_head(field: str, value: Any) -> Mutate:
    def mutate(obj: Obj, i: int) -> None:
        obj[field] = value

    return mutate


def _finish_dict(obj: Obj, i: int) -> None:
    for c in _choices(obj):
        if c.get("finish_reason"):
            c["finish_reason"] = {"type": c["finish_reason"]}


def _surrogate_token(obj: Obj, i: int) -> None:
    for e in _lp_entries(obj)[:1]:
        e["token"] = "\ud800"


def _content(fn: Callable[[str], Any]) -> Mutate:
    """Replace the first non-empty content string (the whole message, or the first chunk that carries text)."""

    def mutate(obj: Obj, i: int) -> None:
        for c in _choices(obj):
            msg = _message(c)
            if isinstance(msg.get("content"), str) and msg["content"] and i == 0:
                msg["content"] = fn(msg["content"])

    return mutate


def _logprob_str(obj: Obj, i: int) -> None:
    for e in _lp_entries(obj)[:1]:
        e["logprob"] = str(e["logprob"])


def _top_dict(obj: Obj, i: int) -> None:
    for e in _lp_entries(obj):
        e["top_logprobs"] = {"a": -1.0}


def _choices_object(obj: Obj, i: int) -> None:
    if isinstance(obj.get("choices"), list) and obj["choices"]:
        obj["choices"] = {"0": obj["choices"][0]}


def _not_content(extra: Callable[[Obj, int], None] | None = None) -> Mutate:
    """Content null and no logprobs or token ids: the shape of a refusal or a tool call, or of nothing at all."""

    def mutate(obj: Obj, i: int) -> None:
        for c in _choices(obj):
            msg = _message(c)
            if "content" in msg:
                msg["content"] = None
            c["logprobs"] = None
            c.pop("token_ids", None)
            if extra is not None:
                extra(c, i)

    return mutate


def _refusal(choice: Obj, i: int) -> None:
    if i == 0:
        _message(choice)["refusal"] = "I can't help with that."


def _tool_call(choice: Obj, i: int) -> None:
    if i == 0:
        call = {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Queens"}'},
        }
        _message(choice)["tool_calls"] = [call]
    if choice.get("finish_reason"):
        choice["finish_reason"] = "tool_calls"


def _zero_choices(obj: Obj, i: int) -> None:
    if "choices" in obj:
        obj["choices"] = []


def _index_1_first(obj: Obj, i: int) -> None:
    if _choices(obj):
        other = copy.deepcopy(obj["choices"][0])
        other["index"] = 1
        msg = _message(other)
        if isinstance(msg.get("content"), str) and msg["content"]:
            msg["content"] = "a different answer"
        obj["choices"] = [other, *obj["choices"]]


def _only_index_1(obj: Obj, i: int) -> None:
    for c in _choices(obj):
        c["index"] = 1


def _duplicate_index(obj: Obj, i: int) -> None:
    if _choices(obj):
        obj["choices"] = [obj["choices"][0], copy.deepcopy(obj["choices"][0])]


def _extra_fields(obj: Obj, i: int) -> None:
    obj["service_tier"] = {"tier": ["default", None, 3]}
    obj["x_hostile"] = [[], {}, 1e300, -0.0, "\u2028"]
    for c in _choices(obj):
        c["stop_reason"] = None
        c["x_choice"] = {"nested": [True, False]}
        _message(c)["annotations"] = []
    for e in _lp_entries(obj):
        e["x_entry"] = None


def _nulls(obj: Obj, i: int) -> None:
    obj["system_fingerprint"] = None
    if "usage" in obj:
        obj["usage"] = None


def _huge(obj: Obj, i: int) -> None:
    if i == 0:
        for c in _choices(obj):
            msg = _message(c)
            msg["content"] = (msg.get("content") or "") + "x" * HUGE_BYTES


# ---------------------------------------------------------------------------- token edits (stream and whole alike)


def _tok(t: _Token, **change: Any) -> _Token:
    text = change.get("text", t.text)
    bytes_ = change.get("bytes", list(text.encode()) if "text" in change else t.bytes)
    return _Token(text, change.get("id", t.id), bytes_, change.get("logprob", t.logprob))


def _first(**change: Any) -> Callable[[list[_Token]], list[_Token]]:
    return lambda toks: [_tok(toks[0], **change), *toks[1:]]


def _last_text(fn: Callable[[str], str]) -> Callable[[list[_Token]], list[_Token]]:
    return lambda toks: [*toks[:-1], _tok(toks[-1], text=fn(toks[-1].text))]


# ---------------------------------------------------------------------------- the mode table

_MUTATE: dict[str, Mutate] = {
    "model_int": _set_head("model", 123),
    "prompt_tokens_str": _set_usage("prompt_tokens", "8"),
    "usage_huge": _set_usage("prompt_tokens", 10**30),
    "finish_reason_dict": _finish_dict,
    "surrogate_token": _surrogate_token,
    "surrogate_content": _content(lambda s: s + "\ud800"),
    "logprob_str": _logprob_str,
    "top_logprobs_dict": _top_dict,
    "content_list": _content(lambda s: [{"type": "text", "text": s}]),
    "content_int": _content(lambda s: 42),
    "fingerprint_object": _set_head("system_fingerprint", {"id": "fp"}),
    "choices_object": _choices_object,
    "content_null": _not_content(),
    "refusal": _not_content(_refusal),
    "tool_calls": _not_content(_tool_call),
    "zero_choices": _zero_choices,
    "index_1_first": _index_1_first,
    "only_index_1": _only_index_1,
    "duplicate_index": _duplicate_index,
    "huge": _huge,
    "osc_fingerprint": _set_head("system_fingerprint", "\x1b]0;pwned\x07fp_hostile"),
    "csi_fingerprint": _set_head("system_fingerprint", "fp\x1b[2J\x1b[1;1H\x9b31mred"),
    "duplicate_keys": lambda obj, i: None,  # the encoder adds the bad twins
    "extra_fields": _extra_fields,
    "nulls": _nulls,
}
_TOKENS: dict[str, Callable[[list[_Token]], list[_Token]]] = {
    "token_id_huge": _first(id=2**40),
    "token_id_float": _first(id=1000.5),
    "token_id_bool": _first(id=True),
    "bytes_over_255": _first(bytes=[300]),
    "logprob_nan": _first(logprob=float("nan")),  # json.dumps writes NaN and -Infinity as bare literals
    "logprob_infinity": _first(logprob=float("-inf")),
    "bidi_token": _last_text(lambda s: "\u202e" + s + "\u202c"),
    "c1_token": _last_text(lambda s: s + "\x9b2J\x07\rX"),
    "mention_token": _last_text(lambda s: " @everyone"),
}
# Modes that write the whole answer themselves (status line, headers, timing); handled in _wire().
_WIRE = (
    "empty_stream",
    "error_200",
    "error_event",
    "not_openai",
    "array_body",
    "trickle",
    "keepalive",
    "truncated_json",
    "empty_body",
    "html_200",
    "reset",
    "gzip_lie",
    "truncated_stream",
    "json_bomb",
    "redirect",
    "osc_error",
    "echo_auth",
)
# Modes that change the server rather than one answer: set_poison applies them.
SERVER_MODES = ("osc_models",)
MODES: tuple[str, ...] = (*_MUTATE, *_TOKENS, *_WIRE, *SERVER_MODES)
STREAM_ONLY = frozenset({"empty_stream", "error_event", "truncated_stream"})


class Poison:
    """One poison spec and what it did: which arrivals of which prompts get which mode."""

    def __init__(self, spec: dict[str, Any]) -> None:
        p = dict(spec)
        self.mode = p.pop("mode")
        if self.mode not in MODES:
            raise ValueError(f"unknown poison mode {self.mode!r}")
        self.at = set(p.pop("at", []))
        self.rate = float(p.pop("rate", 0.0))
        self.rng = random.Random(p.pop("seed", 0))
        prompts = p.pop("prompts", None)
        self.prompts = None if prompts is None else set(prompts)
        if p:
            raise ValueError(f"unknown poison options: {sorted(p)}")
        self.arrivals = 0
        self.poisoned = 0

    def draw(self) -> bool:
        """Whether the next arrival of a matching request is poisoned (the caller holds the server's lock)."""
        n = self.arrivals
        self.arrivals += 1
        hit = n in self.at or (self.rate > 0 and self.rng.random() < self.rate)
        self.poisoned += hit
        return hit


class HostileServer(ScriptedServer):
    """A ScriptedServer that poisons chosen arrivals with one mode (see the module docstring)."""

    def __init__(self, *, poison: dict[str, Any] | None = None, hold_s: float = 8.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hold_s = hold_s
        self._good_models = list(self.models)
        self._poison_lock = threading.Lock()
        self._poisons: list[Poison] = []
        self.set_poison(poison)

    def set_poison(self, spec: dict[str, Any] | None) -> Poison | None:
        """Poison from now on as `spec` says, and only so (None: no poison); arrivals are counted afresh."""
        with self._poison_lock:
            self._poisons = []
            self.models = list(self._good_models)
        return None if spec is None else self.add_poison(spec)

    def add_poison(self, spec: dict[str, Any]) -> Poison:
        """Poison as `spec` says too, e.g. another prompt's arrivals (the first spec whose prompts match decides)."""
        poison = Poison(spec)
        with self._poison_lock:
            self._poisons.append(poison)
            if poison.mode in SERVER_MODES:
                self.models = [HOSTILE_MODEL]
        return poison

    @property
    def poisoned(self) -> int:
        """How many answers were poisoned since the last set_poison."""
        return sum(p.poisoned for p in self._poisons)

    def _draw_poison(self, key: str) -> str | None:
        with self._poison_lock:
            for p in self._poisons:
                if p.mode not in SERVER_MODES and (p.prompts is None or key in p.prompts):
                    return p.mode if p.draw() else None
        return None

    async def _completion(self, api: str, req: dict[str, Any], send: Any, headers: dict[str, str]) -> None:
        key = self.prompt_key(api, req)
        mode = None if key is None else self._draw_poison(key)
        if mode is None or key is None:
            await super()._completion(api, req, send, headers)
            return
        if await self._refused(req, send):
            return
        ctx = await self.answer(api, req, key, advance=False)
        stream = bool(req.get("stream"))
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        if mode in _WIRE:
            await self._wire(mode, ctx, stream, include_usage, headers, send)
            return
        if mode in _TOKENS:
            ctx.tokens = _TOKENS[mode](ctx.tokens)
        mutate = _MUTATE.get(mode, lambda obj, i: None)
        encode = _duplicate_keys if mode == "duplicate_keys" else _encode
        if not stream:
            obj = ctx.full()
            mutate(obj, 0)
            await _raw(send, 200, encode(obj), "application/json")
            return
        await _start_sse(send)
        for i, chunk in enumerate(_chunks(ctx, include_usage)):
            mutate(chunk, i)
            await _body(send, b"data: " + encode(chunk) + b"\n\n")
        await _body(send, b"data: [DONE]\n\n", more=False)

    async def _wire(
        self, mode: str, ctx: _Answer, stream: bool, include_usage: bool, headers: dict[str, str], send: Any
    ) -> None:
        """The modes that abuse the status line, the headers, the framing or the timing of an answer."""
        chunks = _chunks(ctx, include_usage)
        sse = b"".join(b"data: " + _encode(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        body = sse if stream else _encode(ctx.full())
        ctype = "text/event-stream" if stream else "application/json"
        if mode in ("error_200", "not_openai", "array_body", "truncated_json", "json_bomb"):
            payload = {
                "error_200": _encode(_err("The server is overloaded", "server_error", None)),
                "not_openai": b'{"hello": "world"}',
                "array_body": b"[" + _encode(ctx.full() if not stream else chunks[0]) + b"]",
                "truncated_json": b'{"id": "cmpl-1", "choices": [{"index": 0, "message": {"content": "unterm',
                "json_bomb": b"[" * NEST + b"]" * NEST,
            }[mode]
            body = b"data: " + payload + b"\n\ndata: [DONE]\n\n" if stream else payload
            await _raw(send, 200, body, ctype)
        elif mode == "empty_stream":
            await _raw(send, 200, b"data: [DONE]\n\n", ctype)
        elif mode == "error_event":
            err = _encode(_err("The server is overloaded", "server_error", None))
            await _raw(send, 200, b"data: " + _encode(chunks[0]) + b"\n\ndata: " + err + b"\n\ndata: [DONE]\n\n", ctype)
        elif mode == "truncated_stream":
            await _raw(send, 200, b"".join(b"data: " + _encode(c) + b"\n\n" for c in chunks[: len(chunks) // 2]), ctype)
        elif mode == "empty_body":
            await _raw(send, 200, b"", ctype)
        elif mode == "html_200":
            await _raw(send, 200, b"<html><body><h1>Welcome to nginx!</h1></body></html>", "text/html")
        elif mode == "reset":
            if stream:
                await _start_sse(send)
                await _body(send, body[: len(body) // 2])  # and return: uvicorn drops the connection mid-body
            else:
                await _reset_mid_body(send, body)
        elif mode == "gzip_lie":
            await _raw(send, 200, body, ctype, {"content-encoding": "gzip"})
        elif mode == "redirect":
            await _raw(send, 307, b"", "text/plain", {"location": "http://127.0.0.1:9/v1/chat/completions"})
        elif mode == "osc_error":
            msg = "\x1b]0;pwned\x07overloaded\x1b[2J\x1b[1;1H\x9b31m\r"
            await _json(send, 500, _err(msg, "server_error", None))
        elif mode == "echo_auth":
            msg = f"invalid credentials: Authorization: {headers.get('authorization', '(none)')}"
            await _json(send, 500, _err(msg, "server_error", None))
        elif mode in ("trickle", "keepalive"):  # bytes that keep resetting an idle-read timer, for hold_s
            every = TRICKLE_S if mode == "trickle" else KEEPALIVE_S
            await _raw(_slow_send(send, mode, every, self.hold_s, stream), 200, body, ctype)


def _chunks(ctx: _Answer, include_usage: bool) -> list[Obj]:
    """The stream chunks of one answer, as ScriptedServer._stream sends them."""
    n = len(ctx.tokens)
    chunks = [ctx.chunk(i, i == n - 1) for i in range(n)] if n else [ctx.chunk(None, True)]
    return [*chunks, ctx.usage_chunk()] if include_usage else chunks


def _encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _duplicate_keys(obj: Obj) -> bytes:
    """The same object with bad twins of `choices` and `model` before the good keys (JSON: the last one wins)."""
    return b'{"choices": "garbage", "model": 7, ' + _encode(obj)[1:]


async def _start_sse(send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
        }
    )


async def _body(send: Any, data: bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


if __name__ == "__main__":
    main(server_class=HostileServer)
