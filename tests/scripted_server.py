"""A scripted OpenAI-compatible server on 127.0.0.1 for end-to-end tests: real sockets, real JSON, known answers.

Every test that talks HTTP uses this server (or `transformers serve`), so its answers are exact and its faults are
reproducible. It is a raw ASGI app under uvicorn (no framework), so it can also misbehave on the wire: reset a
connection mid-body, truncate an SSE stream, hang past the client's timeout.

Scripting API
-------------
Completions are token lists, so forks sit at known positions::

    from scripted_server import ScriptedServer      # tests/ is on sys.path under pytest

    A = ["Richard", " Feynman", " was", " born", " in", " Queens", ",", " New", " York"]
    B = A[:7] + [" New", " York", " City"]
    server = ScriptedServer(
        models=["scripted-model"],                  # what /v1/models lists (first one answers if a request omits it)
        completions={"A": A, "B": B},               # name -> list of tokens (str, or dict, see below)
        schedules={"Tell me about Richard Feynman": [("A", 992), ("B", 8)]},
        default="A",                                # completion (or schedule) for prompts not in `schedules`
    ).start()                                       # or use the `scripted_server` pytest fixture (tests/conftest.py)
    server.base_url                                 # "http://127.0.0.1:PORT/v1"
    ...
    server.stop()

A prompt is keyed by its text: the completions API's `prompt`, or the chat API's last message `content`.

Schedules (value of `schedules[prompt]` or `default`):

* ``"A"`` -- always completion A.
* ``[("A", 992), ("B", 8)]`` -- exact counts by arrival order: the successful answers to that prompt walk a
  seeded permutation of 992 x A + 8 x B, so any 1000 consecutive successful answers hold exactly 992 A and 8 B,
  under any concurrency. The permutation repeats after 1000 (two arms of N=1000 each get 992/8). Requests that
  get an injected fault do not use a slot. ``server.reset_counts()`` restarts every schedule.
* ``["A", "A", "B"]`` (names, not pairs) -- in arrival order, cycled: the k-th successful answer to that prompt gets
  entry k mod len, not shuffled. Arms run one after another, so a serial arm of N gets the first N entries.
* ``{"cold": "A", "warm": "B"}`` -- cache-dependent: a request whose prompt the server's prefix cache holds (see
  ``cache`` below) gets B, any other A.
* ``{"serial": "A", "loaded": ["B", "C"]}`` -- load-dependent: a request that arrives while no other request is in
  flight gets A; one that arrives while others are in flight gets the loaded completions in turn (B, C, B, ...).
  Pair it with ``latency_s`` so requests overlap: a concurrency-1 arm then has 1 unique completion and a loaded
  arm more than one.

A token is a string, or a dict ``{"token": str, "id": int, "bytes": list[int] | None, "logprob": float}`` to pin
its id, its UTF-8 bytes (e.g. invalid UTF-8 fragments) or its logprob. Token ids otherwise come from a vocabulary
built in order of first appearance, starting at 1000: ``server.token_id(" Queens")``. Logprobs default to
``-0.05 * (1 + position % 7)``; top_logprobs list the chosen token first, then ``"<alt{j}>"`` tokens (ids 1..K).
Three more keys shape what a real server gets wrong (issue #23):

* ``"penalised": d`` -- the chosen token was not the top-1 (a repeat penalty at temperature 0, as llama-cpp-python
  applies by default): the top-k list holds the K alternatives, the best ``d`` above the chosen token (alternative j
  at ``logprob + d / j``), and the chosen token appended as a K+1-th entry.
* ``"shown": str`` -- the string the logprobs report for the token instead of its text (e.g. ``""`` for a token
  whose bytes a server decoded with ``errors="ignore"``); the answer's text keeps the real one.
* ``"merged": true`` -- the token has no logprobs entry (nor id in ``token_ids``) of its own: its string is
  prepended to the next entry's, as llama-server does with an incomplete UTF-8 character; usage still counts it.

What comes back (``capture``):

* ``"vllm"`` (default) -- logprobs/top_logprobs with `bytes` when asked; `return_token_ids` adds `token_ids` to
  each choice (and per-chunk deltas in streams); `return_tokens_as_token_ids` turns token strings into
  ``"token_id:123"``. Unknown request fields are ignored.
* ``"openai"`` -- logprobs with `bytes` but no ids; any field OpenAI does not know (`return_token_ids`, a made-up
  name, ...) gets a 400, as OpenAI does.
* ``"text"`` -- logprobs are ignored and come back as null (like `transformers serve`).
* ``"llama-server"`` -- like llama.cpp's `llama-server`: logprobs in the chat shape on both APIs (on
  /v1/completions too: ``logprobs.content[]``), every entry and every top_logprobs entry with its token ``id`` and
  ``bytes``; no ``token_ids`` switch.

Every capture but ``"openai"`` answers requests with unknown fields as if they were not there (vLLM, llama-server and
llama-cpp-python do): a seed in such a request may or may not be honoured.

Other options: ``api_key`` (requests without ``Authorization: Bearer <key>`` get 401), ``latency_s`` (delay per
request), ``system_fingerprint`` (None omits it; a list is cycled through, one value per answer), ``apis`` (subset
of ``("chat", "completions")``; the other path 404s), ``stream`` (False: a streaming request gets 400),
``drop_logprobs_after`` (answers after that many omit logprobs: "logprobs missing half-way"), ``record`` (how many
requests ``server.log`` keeps, default 2000), ``interrupted`` (names of completions answered as llama-cpp-python
answers a request it interrupts for another: the completion's tokens, then a normal ``[DONE]``, and no
``finish_reason`` anywhere; unstreamed, ``finish_reason`` is null).

A prefix cache (``cache=dict(...)``; None, the default, has none and reports nothing): a request hits when the same
prompt text (its first line a `detaudit run` cold nonce or not) came before with the same ``cache_salt``. Keys:
``report`` (default True: usage carries ``prompt_tokens_details.cached_tokens``, ``hit_tokens`` (default 4) of the
7 prompt tokens on a hit, else 0; False: it caches but says nothing), ``salt`` (default True: ``cache_salt``
separates cache entries, as vLLM's does; False: ignored), ``reset`` (default False: True serves vLLM's
``POST /reset_prefix_cache``, which empties the cache), ``value`` (report exactly this as cached_tokens on every
answer, whatever it is: a hostile server; with ``prompts``, only to requests for those prompt texts). The schedule
key of a prompt leaves a leading cold nonce line out.

Faults (``faults=dict(...)``), decided per arrival on the completion paths only (never /v1/models):

* ``rate`` (0..1) and ``seed``: a seeded draw per arrival picks whether a fault happens, and ``kinds`` which one.
* ``first``: a list of kinds given to the first arrivals in order, before the random draw applies.
* ``kinds`` (default all): ``"429"`` (with ``Retry-After: retry_after``), ``"500"``, ``"502"``, ``"503"``,
  ``"timeout"`` (sleeps ``hang_s`` before answering), ``"reset"`` (connection closed mid-body), ``"malformed"``
  (200 with broken JSON), ``"truncated_sse"`` (streams stop half-way without a finish_reason or ``[DONE]``; a
  non-streaming request gets a reset instead), ``"non_openai"`` (200 with ``{"hello": "world"}``), ``"html"`` (502
  HTML error page).
* Kinds given only by name (in ``first`` or ``kinds``, never in the default draw): ``"raw"`` (200 with the bytes of
  ``raw_body`` verbatim, a str or bytes, sent in 64 KiB pieces without a content-length; as an event stream when the
  request streams), ``"trickle"`` (the real answer one byte every ``trickle_s`` seconds, default 0.5, for at most
  ``hang_s``, then the rest at once), ``"keepalive"`` (the answer starts, then SSE keep-alive comments, or spaces for
  an unstreamed answer, every ``trickle_s`` for ``hang_s``, then the real answer).
* ``prompts``: only requests for these prompt texts get faults (default: all), e.g. to spare the capability
  probe that `detaudit run` sends first.
* ``message``: the error message of the ``429``/``5xx`` faults instead of ``"Injected 500"`` etc. (hostile text
  for terminal-safety tests); ``{authorization}`` in it stands for the request's Authorization header, as a server
  that echoes its request headers would send it.
* ``server.stats``: counts of ``requests``, ``ok``, ``faults`` by kind, ``max_in_flight`` and ``open_connections``.

Standalone (benchmarks, crash tests): ``python tests/scripted_server.py --port 0 --script script.json`` prints
``READY <base_url>`` on stdout when listening; the script file holds the constructor's keyword arguments as JSON
(tests/servers.py's `spawn` starts it so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from collections import Counter, deque
from typing import Any

import uvicorn
from servers import free_port  # tests/ is on sys.path (pytest, benchmarks, or this file run as a script)

from detaudit.audit.cache_arms import NONCE_PATTERN

FAULT_KINDS = ("429", "500", "502", "503", "timeout", "reset", "malformed", "truncated_sse", "non_openai", "html")
NAMED_FAULT_KINDS = ("raw", "trickle", "keepalive")  # only when named: never in the default random draw
CAPTURES = ("vllm", "openai", "text", "llama-server")
# What OpenAI's chat and completions endpoints accept; the "openai" capture refuses any other field.
OPENAI_FIELDS = frozenset(
    "model messages prompt max_tokens max_completion_tokens temperature top_p n stream stream_options stop "
    "presence_penalty frequency_penalty logit_bias logprobs top_logprobs user seed response_format tools tool_choice "
    "parallel_tool_calls functions function_call echo suffix best_of metadata store service_tier".split()
)
_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"


class _Token:
    __slots__ = ("text", "id", "bytes", "logprob", "shown", "merged", "penalised")

    def __init__(self, text: str, id_: int, bytes_: list[int] | None, logprob: float | None) -> None:
        self.text, self.id, self.bytes, self.logprob = text, id_, bytes_, logprob
        self.shown, self.merged, self.penalised = text, False, 0.0


class _Schedule:
    """Picks a completion name per successful answer, by arrival order or by load."""

    def __init__(self, spec: Any, seed: int) -> None:
        self.kind = "fixed"
        self.seed = seed
        self.cold = self.warm = ""
        self.count = 0
        self.loaded_count = 0
        if isinstance(spec, str):
            self.fixed = spec
        elif isinstance(spec, dict) and set(spec) == {"cold", "warm"}:
            self.kind = "cache"
            self.cold, self.warm = spec["cold"], spec["warm"]
        elif isinstance(spec, dict):
            self.kind = "load"
            self.serial, self.loaded = spec["serial"], list(spec["loaded"])
        elif all(isinstance(name, str) for name in spec):
            self.kind = "counts"
            self.order = list(spec)  # in arrival order, as given
        else:
            self.kind = "counts"
            order = [name for name, n in spec for _ in range(int(n))]
            random.Random(seed).shuffle(order)
            self.order = order

    def names(self) -> set[str]:
        if self.kind == "fixed":
            return {self.fixed}
        if self.kind == "load":
            return {self.serial, *self.loaded}
        if self.kind == "cache":
            return {self.cold, self.warm}
        return set(self.order)

    def pick(self, in_flight: int, advance: bool = True, hit: bool = False) -> str:
        """The next completion; advance=False (a fault will cut the answer) leaves the slot for the next request;
        `hit`: the prompt was in the prefix cache."""
        if self.kind == "fixed":
            return self.fixed
        if self.kind == "cache":
            return self.warm if hit else self.cold
        if self.kind == "load":
            if in_flight <= 1:
                return self.serial
            name = self.loaded[self.loaded_count % len(self.loaded)]
            self.loaded_count += advance
            return name
        name = self.order[self.count % len(self.order)]
        self.count += advance
        return name


class ScriptedServer:
    """A loopback OpenAI-compatible server whose answers and faults are scripted (see the module docstring)."""

    def __init__(
        self,
        *,
        models: list[str] | None = None,
        completions: dict[str, list[Any]] | None = None,
        schedules: dict[str, Any] | None = None,
        default: Any = "default",
        capture: str = "vllm",
        api_key: str | None = None,
        latency_s: float = 0.0,
        system_fingerprint: str | list[str] | None = "fp_scripted",
        apis: tuple[str, ...] | list[str] = ("chat", "completions"),
        stream: bool = True,
        drop_logprobs_after: int | None = None,
        interrupted: list[str] | tuple[str, ...] = (),
        faults: dict[str, Any] | None = None,
        cache: dict[str, Any] | None = None,
        seed: int = 0,
        record: int = 2000,
        port: int = 0,
    ) -> None:
        if capture not in CAPTURES:
            raise ValueError(f"capture must be one of {', '.join(CAPTURES)}, not {capture!r}")
        self.models = list(models or ["scripted-model"])
        completions = dict(completions or {})
        completions.setdefault("default", ["Hello", ",", " world", "."])
        self._vocab: dict[str, int] = {}
        self.completions = {name: [self._token(t) for t in toks] for name, toks in completions.items()}
        self._schedule_specs = dict(schedules or {})
        self._default_spec = default
        self._seed = seed
        self.reset_counts()
        for sched in [*self.schedules.values(), self.default]:
            missing = sched.names() - set(self.completions)
            if missing:
                raise ValueError(f"schedule names unknown completions: {sorted(missing)}")
        self.capture = capture
        self.api_key = api_key
        self.latency_s = latency_s
        self.system_fingerprint = system_fingerprint
        self.apis = tuple(apis)
        self.stream_ok = stream
        self.drop_logprobs_after = drop_logprobs_after
        self.interrupted = set(interrupted)
        if self.interrupted - set(self.completions):
            raise ValueError(
                f"interrupted names unknown completions: {sorted(self.interrupted - set(self.completions))}"
            )
        c = dict(cache) if cache is not None else None
        self.cache = c is not None
        self.cache_report = bool(c.pop("report", True)) if c is not None else False
        self.cache_salt = bool(c.pop("salt", True)) if c is not None else False
        self.cache_hit_tokens = int(c.pop("hit_tokens", 4)) if c is not None else 0
        self.cache_reset = bool(c.pop("reset", False)) if c is not None else False
        self.cache_value: Any = c.pop("value", None) if c is not None else None
        self.cache_forced = c is not None and self.cache_value is not None
        forced_prompts = c.pop("prompts", None) if c is not None else None
        self.cache_forced_prompts = None if forced_prompts is None else set(forced_prompts)
        if c:
            raise ValueError(f"unknown cache options: {sorted(c)}")
        self.cached: set[tuple[Any, str]] = set()  # (salt, prompt text) the prefix cache holds
        f = dict(faults or {})
        self.fault_rate = float(f.pop("rate", 0.0))
        self.fault_kinds = tuple(f.pop("kinds", FAULT_KINDS))
        self.fault_first = deque(f.pop("first", []))
        self.retry_after = float(f.pop("retry_after", 0.05))
        self.hang_s = float(f.pop("hang_s", 5.0))
        self.fault_message: str | None = f.pop("message", None)
        self.trickle_s = float(f.pop("trickle_s", 0.5))
        raw_body = f.pop("raw_body", b"")
        self.raw_body = raw_body.encode() if isinstance(raw_body, str) else bytes(raw_body)
        prompts = f.pop("prompts", None)
        self.fault_prompts = None if prompts is None else set(prompts)
        self._fault_rng = random.Random(f.pop("seed", seed))
        if f:
            raise ValueError(f"unknown fault options: {sorted(f)}")
        bad = set(self.fault_kinds) | set(self.fault_first)
        if bad - set(FAULT_KINDS) - set(NAMED_FAULT_KINDS):
            raise ValueError(f"unknown fault kinds: {sorted(bad - set(FAULT_KINDS) - set(NAMED_FAULT_KINDS))}")
        self.log: deque[dict[str, Any]] = deque(maxlen=record)
        self.stats: dict[str, Any] = {"requests": 0, "ok": 0, "faults": Counter(), "max_in_flight": 0}
        self.in_flight = 0
        self.answers = 0
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ scripting helpers

    def _token(self, spec: Any) -> _Token:
        if isinstance(spec, str):
            spec = {"token": spec}
        text = spec["token"]
        tid = spec.get("id")
        if tid is None:
            tid = self._vocab.setdefault(text, 1000 + len(self._vocab))
        bytes_ = spec["bytes"] if "bytes" in spec else list(text.encode())  # pinned: may be what UTF-8 cannot say
        token = _Token(text, int(tid), bytes_, spec.get("logprob"))
        token.shown = spec.get("shown", text)
        token.merged = bool(spec.get("merged", False))
        token.penalised = float(spec.get("penalised", 0.0))
        return token

    def token_id(self, token: str) -> int:
        """The id the server reports for `token` (vocabulary built from the script's completions)."""
        return self._vocab[token]

    def token_ids(self, completion: str) -> list[int]:
        return [t.id for t in self.completions[completion]]

    def text(self, completion: str) -> str:
        return "".join(t.text for t in self.completions[completion])

    def reset_counts(self) -> None:
        """Restart every schedule at its first slot (e.g. between two runs in one test)."""
        self.schedules = {p: _Schedule(s, self._seed) for p, s in self._schedule_specs.items()}
        self.default = _Schedule(self._default_spec, self._seed)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def open_connections(self) -> int:
        server = self._server
        return len(server.server_state.connections) if server is not None else 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> ScriptedServer:
        if self.port == 0:
            self.port = free_port()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="critical",
            access_log=False,
            interface="asgi3",
            lifespan="off",
            backlog=4096,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="scripted-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"scripted server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ ASGI

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        self.stats["requests"] += 1
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            await _json(send, 401, _err("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
            return
        if path in ("/health", "/v1/health"):
            await _json(send, 200, {"status": "ok"})
            return
        if path == "/reset_prefix_cache" and method == "POST" and self.cache_reset:
            self.cached.clear()
            await _json(send, 200, {"status": "ok"})
            return
        if path == "/v1/models" and method == "GET":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "scripted"} for m in self.models]
            await _json(send, 200, {"object": "list", "data": data})
            return
        api = {_CHAT: "chat", _COMPLETIONS: "completions"}.get(path)
        if api is None or api not in self.apis or method != "POST":
            await _json(send, 404, _err(f"No route {method} {path}", "not_found", None))
            return
        try:
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ValueError("body is not an object")
        except ValueError as e:
            await _json(send, 400, _err(f"Invalid JSON body: {e}", "invalid_request_error", None))
            return
        self.log.append({"path": path, "body": req, "headers": headers, "t": time.monotonic()})
        await self._completion(api, req, send, headers)

    @staticmethod
    def prompt_key(api: str, req: dict[str, Any]) -> str | None:
        """The prompt text a request is keyed by: the last chat message's content or the prompt (None: malformed)."""
        if api == "chat":
            msgs = req.get("messages")
            if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
                return None
            return str(msgs[-1].get("content", ""))
        return req["prompt"] if isinstance(req.get("prompt"), str) else None

    async def _completion(self, api: str, req: dict[str, Any], send: Any, headers: dict[str, str]) -> None:
        text = self.prompt_key(api, req)
        if text is None:
            msg = "messages must be a non-empty list" if api == "chat" else "prompt must be a string"
            await _json(send, 400, _err(msg, "invalid_request_error", None))
            return
        unsalted = NONCE_PATTERN.fullmatch(text)
        key = unsalted.group(1) if unsalted else text
        fault = self._draw_fault(key)
        if fault is not None:
            self.stats["faults"][fault] += 1
            if await self._fault_before_body(fault, send, headers, bool(req.get("stream"))):
                return
            if fault in ("trickle", "keepalive"):
                send = _slow_send(send, fault, self.trickle_s, self.hang_s, bool(req.get("stream")))
        if await self._refused(req, send):
            return
        ctx = await self.answer(api, req, key, advance=fault is None, text=text)
        stream = bool(req.get("stream"))
        if stream:
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
            await self._stream(ctx, send, truncate=fault == "truncated_sse", include_usage=include_usage)
        elif fault == "truncated_sse":  # a non-streaming answer cannot be truncated as SSE: reset it instead
            await _reset_mid_body(send, json.dumps(ctx.full()).encode())
        else:
            self.stats["ok"] += 1
            await _json(send, 200, ctx.full())

    async def _refused(self, req: dict[str, Any], send: Any) -> bool:
        """Answer the 4xx a real server gives (unknown field, unknown model, streaming off); True if it did."""
        if self.capture == "openai":
            unknown = set(req) - OPENAI_FIELDS
            if unknown:
                msg = f"Unrecognized request argument supplied: {sorted(unknown)[0]}"
                await _json(send, 400, _err(msg, "invalid_request_error", None))
                return True
        model = req.get("model") or self.models[0]
        if model not in self.models:
            msg = f"The model `{model}` does not exist."
            await _json(send, 404, _err(msg, "invalid_request_error", "model_not_found"))
            return True
        if req.get("stream") and not self.stream_ok:
            await _json(send, 400, _err("stream is not supported", "invalid_request_error", None))
            return True
        return False

    async def answer(
        self, api: str, req: dict[str, Any], key: str, *, advance: bool = True, text: str | None = None
    ) -> _Answer:
        """The scripted answer to `req` (after `latency_s`); advance=False leaves the schedule slot for the next;
        `text`: the prompt as sent (a cold nonce line included), what the prefix cache keys."""
        entry = (req.get("cache_salt") if self.cache_salt else None, key if text is None else text)
        hit = self.cache and entry in self.cached
        if self.cache:
            self.cached.add(entry)
        self.in_flight += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
        try:
            sched = self.schedules.get(key, self.default)
            name = sched.pick(self.in_flight, advance=advance, hit=hit)
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
        finally:
            self.in_flight -= 1
        self.answers += 1
        tokens = self.completions[name]
        max_tokens = req.get("max_tokens") or req.get("max_completion_tokens")
        finish: str | None = None if name in self.interrupted else "stop"
        if isinstance(max_tokens, int) and 0 < max_tokens < len(tokens):
            tokens, finish = tokens[:max_tokens], "length"
        want_lp = self.capture != "text" and bool(req.get("logprobs"))
        if self.drop_logprobs_after is not None and self.answers > self.drop_logprobs_after:
            want_lp = False
        if api == "chat":
            k = int(req.get("top_logprobs") or 0) if want_lp else 0
        else:
            k = int(req.get("logprobs") or 0) if want_lp else 0
        as_ids = self.capture == "vllm" and bool(req.get("return_tokens_as_token_ids"))
        with_ids = self.capture == "vllm" and bool(req.get("return_token_ids"))
        model = req.get("model") or self.models[0]
        fingerprint = self.system_fingerprint
        if isinstance(fingerprint, list):
            fingerprint = fingerprint[self.answers % len(fingerprint)]
        entries = self.capture == "llama-server"
        cached = None
        if self.cache_forced and (self.cache_forced_prompts is None or key in self.cache_forced_prompts):
            cached = self.cache_value
        elif self.cache_report:
            cached = self.cache_hit_tokens if hit else 0
        return _Answer(api, model, tokens, finish, want_lp, k, as_ids, with_ids, fingerprint, entries, cached)

    def _draw_fault(self, prompt: str) -> str | None:
        if self.fault_prompts is not None and prompt not in self.fault_prompts:
            return None
        with self._lock:
            if self.fault_first:
                return self.fault_first.popleft()
            if self.fault_rate and self._fault_rng.random() < self.fault_rate:
                return self._fault_rng.choice(self.fault_kinds)
        return None

    async def _fault_before_body(self, fault: str, send: Any, headers: dict[str, str], stream: bool) -> bool:
        """Send the fault's answer; False for the faults that happen inside a normal answer (truncated SSE)."""
        message = None
        if self.fault_message is not None:
            message = self.fault_message.replace("{authorization}", headers.get("authorization", ""))
        if fault == "429":
            retry_after = {"retry-after": f"{self.retry_after:g}"}
            await _json(send, 429, _err(message or "Rate limit reached", "rate_limit", None), retry_after)
        elif fault in ("500", "502", "503"):
            await _json(send, int(fault), _err(message or f"Injected {fault}", "server_error", None))
        elif fault == "timeout":
            await asyncio.sleep(self.hang_s)
            await _json(send, 200, {"late": True})
        elif fault == "reset":
            await _reset_mid_body(send, json.dumps(_err("x" * 200, "server_error", None)).encode())
        elif fault == "malformed":
            await _raw(send, 200, b'{"id": "cmpl-1", "choices": [{"text": "unterminated', "application/json")
        elif fault == "non_openai":
            await _json(send, 200, {"hello": "world"})
        elif fault == "html":
            await _raw(send, 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
        elif fault == "raw":
            ctype = b"text/event-stream" if stream else b"application/json"
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]})
            body, piece = self.raw_body, 64 * 1024
            for at in range(0, max(len(body), 1), piece):
                await send({"type": "http.response.body", "body": body[at : at + piece], "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            return False
        return True

    async def _stream(self, ctx: _Answer, send: Any, *, truncate: bool, include_usage: bool) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        n = len(ctx.tokens)
        stop_at = n // 2 if truncate else n
        for i in range(stop_at):
            await send({"type": "http.response.body", "body": _sse(ctx.chunk(i, i == n - 1)), "more_body": True})
        if truncate:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if n == 0:
            await send({"type": "http.response.body", "body": _sse(ctx.chunk(None, True)), "more_body": True})
        if include_usage:
            await send({"type": "http.response.body", "body": _sse(ctx.usage_chunk()), "more_body": True})
        self.stats["ok"] += 1
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


class _Answer:
    """Builds one answer's JSON in the chat or completions shape, whole or as stream chunks."""

    def __init__(
        self,
        api: str,
        model: str,
        tokens: list[_Token],
        finish: str | None,
        want_lp: bool,
        k: int,
        as_ids: bool,
        with_ids: bool,
        fingerprint: str | None,
        entries: bool = False,
        cached: Any = None,
    ) -> None:
        self.api, self.model, self.tokens, self.finish = api, model, tokens, finish
        self.want_lp, self.k, self.as_ids, self.with_ids, self.fingerprint = want_lp, k, as_ids, with_ids, fingerprint
        self.entries = entries  # llama-server: chat-shaped logprobs on both APIs, each entry with its id
        self.cached = cached  # usage.prompt_tokens_details.cached_tokens (None: not reported)
        self.id = f"{'chatcmpl' if api == 'chat' else 'cmpl'}-{random.getrandbits(48):x}"

    def _tok_str(self, t: _Token, pos: int) -> str:
        """The token as the logprobs name it: its id, or its shown string after those of merged tokens before it."""
        if self.as_ids:
            return f"token_id:{t.id}"
        before, at = "", pos - 1
        while at >= 0 and self.tokens[at].merged:
            before, at = self.tokens[at].shown + before, at - 1
        return before + t.shown

    @staticmethod
    def _entries(start: int, toks: list[_Token]) -> list[tuple[int, _Token]]:
        """(position, token) of the tokens that have a logprobs entry of their own."""
        return [(pos, t) for pos, t in enumerate(toks, start) if not t.merged]

    @staticmethod
    def _lp(t: _Token, pos: int) -> float:
        return t.logprob if t.logprob is not None else -0.05 * (1 + pos % 7)

    def _alts(self, t: _Token, pos: int) -> list[tuple[str, float, list[int] | None, int]]:
        chosen = (self._tok_str(t, pos), self._lp(t, pos), t.bytes, t.id)
        if t.penalised:
            alts = [
                (f"<alt{j}>", self._lp(t, pos) + t.penalised / j, list(f"<alt{j}>".encode()), j)
                for j in range(1, 1 + self.k)
            ]
            return [*alts, chosen]
        out = [chosen]
        for j in range(1, self.k):
            name = f"token_id:{j}" if self.as_ids else f"<alt{j}>"
            out.append((name, self._lp(t, pos) - 1.0 - j, list(f"<alt{j}>".encode()), j))
        return out

    def _chat_lp(self, start: int, toks: list[_Token]) -> dict[str, Any]:
        content = []
        for pos, t in self._entries(start, toks):
            ids = self.entries  # llama-server gives each entry, and each alternative, its token id
            entry: dict[str, Any] = {"token": self._tok_str(t, pos), "logprob": self._lp(t, pos), "bytes": t.bytes}
            entry.update({"id": t.id} if ids else {})
            entry["top_logprobs"] = [
                {"token": s, "logprob": lp, "bytes": b, **({"id": i} if ids else {})}
                for s, lp, b, i in (self._alts(t, pos) if self.k else [])
            ]
            content.append(entry)
        return {"content": content, "refusal": None}

    def _lp_object(self, start: int, toks: list[_Token]) -> dict[str, Any]:
        """The logprobs of a choice: chat-shaped on the chat API, and on both APIs for llama-server."""
        return self._chat_lp(start, toks) if self.api == "chat" or self.entries else self._compl_lp(start, toks)

    def _compl_lp(self, start: int, toks: list[_Token]) -> dict[str, Any]:
        entries = self._entries(start, toks)
        offsets, off = [], 0
        for t in toks:
            if not t.merged:
                offsets.append(off)
            off += len(t.text)
        return {
            "tokens": [self._tok_str(t, p) for p, t in entries],
            "token_logprobs": [self._lp(t, p) for p, t in entries],
            "top_logprobs": [{s: lp for s, lp, _, _ in self._alts(t, p)} for p, t in entries] if self.k else None,
            "text_offset": offsets,
        }

    def _usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": 7, "completion_tokens": len(self.tokens)}
        usage["total_tokens"] = 7 + len(self.tokens)
        if self.cached is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached}
        return usage

    def _head(self, obj: str) -> dict[str, Any]:
        head: dict[str, Any] = {"id": self.id, "object": obj, "created": int(time.time()), "model": self.model}
        if self.fingerprint is not None:
            head["system_fingerprint"] = self.fingerprint
        return head

    def full(self) -> dict[str, Any]:
        text = "".join(t.text for t in self.tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish}
        if self.api == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = self._lp_object(0, self.tokens) if self.want_lp else None
            head = self._head("chat.completion")
        else:
            choice["text"] = text
            choice["logprobs"] = self._lp_object(0, self.tokens) if self.want_lp else None
            head = self._head("text_completion")
        if self.with_ids:
            choice["token_ids"] = [t.id for t in self.tokens if not t.merged]
        return {**head, "choices": [choice], "usage": self._usage()}

    def chunk(self, i: int | None, last: bool) -> dict[str, Any]:
        toks = [] if i is None else [self.tokens[i]]
        text = "".join(t.text for t in toks)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish if last else None}
        if self.api == "chat":
            choice["delta"] = {"role": "assistant", "content": text} if i == 0 else {"content": text}
            choice["logprobs"] = self._lp_object(i or 0, toks) if self.want_lp else None
            head = self._head("chat.completion.chunk")
        else:
            choice["text"] = text
            choice["logprobs"] = self._lp_object(i or 0, toks) if self.want_lp else None
            head = self._head("text_completion")
        if self.with_ids:
            choice["token_ids"] = [t.id for t in toks if not t.merged]
        return {**head, "choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.api == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self._usage()}


def _err(message: str, typ: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": typ, "param": None, "code": code}}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _raw(send: Any, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _json(send: Any, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
    await _raw(send, status, json.dumps(obj).encode(), "application/json", extra)


def _slow_send(send: Any, kind: str, every_s: float, for_s: float, stream: bool) -> Any:
    """`send` made slow for at most `for_s` seconds: "trickle" sends the body a byte every `every_s`; "keepalive"
    sends keep-alive filler (SSE comments, or JSON whitespace) every `every_s` before the body."""
    until = time.monotonic() + for_s

    async def slow(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            headers = [(k, v) for k, v in msg.get("headers", []) if k.lower() != b"content-length"]
            await send({**msg, "headers": headers})
            while kind == "keepalive" and time.monotonic() < until:
                filler = b": keep-alive\n\n" if stream else b" "
                await send({"type": "http.response.body", "body": filler, "more_body": True})
                await asyncio.sleep(every_s)
            return
        body, more = msg.get("body", b""), msg.get("more_body", False)
        while kind == "trickle" and body and time.monotonic() < until:
            await send({"type": "http.response.body", "body": body[:1], "more_body": True})
            body = body[1:]
            await asyncio.sleep(every_s)
        await send({"type": "http.response.body", "body": body, "more_body": more})

    return slow


async def _reset_mid_body(send: Any, body: bytes) -> None:
    """Promise the whole body, send half, and return: uvicorn then drops the connection mid-body."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})


def main(argv: list[str] | None = None, server_class: type[ScriptedServer] = ScriptedServer) -> None:
    """Run a scripted server in the foreground: for benchmarks and tests that need it in another process."""
    ap = argparse.ArgumentParser(description=(sys.modules[server_class.__module__].__doc__ or "").splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--script", help="JSON file with ScriptedServer keyword arguments")
    args = ap.parse_args(argv)
    kwargs = json.loads(open(args.script).read()) if args.script else {}
    for name, spec in (kwargs.get("schedules") or {}).items():
        if isinstance(spec, list):
            kwargs["schedules"][name] = [tuple(x) for x in spec]
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # load tests hold thousands of connections
    server = server_class(port=args.port, **kwargs).start()
    print(f"READY {server.base_url}", flush=True)
    try:
        while server._thread is not None and server._thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
