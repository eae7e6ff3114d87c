"""Async client for OpenAI-compatible endpoints: chat and completions, whole or streamed, with retries.

Why not the openai SDK: detaudit needs what the SDK hides or drops — vLLM's `token_ids` and "token_id:123" token
strings, per-token `bytes`, the exact failure of each attempt, Retry-After on every retryable answer, and a
connection pool sized to the arm's concurrency. One `Completion` per request, parsed the same way whichever API or
transport produced it. There is no response cache of any kind: every call is a fresh HTTP request.

Secrets: the API key and header values stay in this object's memory; every error message passes the Scrubber.
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
from operator import itemgetter
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
import orjson

from detaudit.redact import Scrubber, redact_url, url_secrets

Api = Literal["chat", "completions"]
PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
MAX_RETRY_AFTER_S = 120.0
POOL_SIZE = 32  # connections per httpx pool (see OpenAIClient.__init__)
_TOKEN_ID_PREFIX = "token_id:"
_TOKEN, _LOGPROB, _BYTES = itemgetter("token"), itemgetter("logprob"), itemgetter("bytes")


class CallError(Exception):
    """One failed attempt: why, whether another attempt may succeed, and the server's Retry-After if any."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


@dataclass
class Completion:
    """What one successful request returned, in the columns of the samples table."""

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


def _loads(data: bytes | str) -> Any:
    """orjson for speed; the stdlib for what orjson refuses but JSON allows (lone surrogate escapes)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


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


def _error_message(resp: httpx.Response) -> str:
    """The server's own error message when it sent one in OpenAI shape, else the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in body:
            return str(body["detail"])
    text = " ".join(resp.text.split())
    ctype = resp.headers.get("content-type", "")
    if "html" in ctype or text.lower().startswith(("<!doctype", "<html")):
        return "HTML error page" + (f" ({text[:80]})" if text else "")
    return text[:200] or "(empty body)"


def _split_token(tok: Any) -> tuple[str | None, int | None]:
    """vLLM's return_tokens_as_token_ids gives "token_id:123": an id, not a string."""
    if tok.__class__ is not str:
        return None, None
    if tok.startswith(_TOKEN_ID_PREFIX):
        try:
            return None, int(tok[len(_TOKEN_ID_PREFIX) :])
        except ValueError:
            return tok, None
    return tok, None


class _Acc:
    """Accumulates per-token data from one whole answer or from a stream's chunks."""

    def __init__(self) -> None:
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
        self.usage: dict[str, Any] | None = None

    def head(self, obj: Mapping[str, Any]) -> None:
        self.model = obj.get("model") or self.model
        self.fingerprint = obj.get("system_fingerprint") or self.fingerprint
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]

    def _top(self, entries: list[tuple[Any, Any]]) -> None:
        strs, ids, lps = [], [], []
        for tok, lp in entries:
            if tok.__class__ is str and not tok.startswith(_TOKEN_ID_PREFIX):
                strs.append(tok)
            else:
                s, i = _split_token(tok)
                strs.append(s if s is not None else str(tok))
                if i is not None:
                    ids.append(i)
            lps.append(float(lp) if lp.__class__ in (float, int) else float("nan"))
        if any(lps[k] < lps[k + 1] for k in range(len(lps) - 1)):  # servers send best first; sort only if not
            order = sorted(range(len(lps)), key=lambda k: -lps[k] if lps[k] == lps[k] else float("inf"))
            strs, lps = [strs[k] for k in order], [lps[k] for k in order]
            ids = [ids[k] for k in order] if len(ids) == len(order) else ids
        self.top_strs.append(strs)
        self.top_ids.append(ids if len(ids) == len(entries) else [])
        self.top_lps.append(lps)
        if entries:
            self.any_top = True

    def _fast(self, toks: list[Any], lps: list[Any], byts: list[bytes] | None, top_s: list[list[Any]],
              top_l: list[list[Any]]) -> bool:  # fmt: skip
        """Take the common shape whole (plain token strings, numeric logprobs, alternatives best first) with list
        operations only; False sends anything else to the careful per-entry path."""
        try:
            lps = list(map(float, lps))
            top_l = [list(map(float, row)) for row in top_l]
            if _TOKEN_ID_PREFIX in "\x00".join(toks) or _TOKEN_ID_PREFIX in "\x00".join(map("\x00".join, top_s)):
                return False
        except (TypeError, ValueError):
            return False
        if len(lps) != len(toks) or len(top_l) != len(toks):
            return False
        if any(r[k] < r[k + 1] for r in top_l for k in range(len(r) - 1)):
            return False
        n = len(toks)
        self.strs.extend(toks)
        self.str_ids.extend([None] * n)
        if byts is not None:
            self.bytes.extend(byts)
            self.any_bytes = self.any_bytes or n > 0
        else:
            self.bytes.extend([None] * n)
        self.logprobs.extend(lps)
        self.top_strs.extend(top_s)
        self.top_ids.extend([[]] * n)
        self.top_lps.extend(top_l)
        self.any_top = self.any_top or any(top_l)
        return True

    def chat_logprobs(self, lp: Any) -> None:
        content = lp.get("content") if isinstance(lp, dict) else None
        if not isinstance(content, list):
            return
        try:
            tops = [e.get("top_logprobs") or () for e in content]
            fast = self._fast(list(map(_TOKEN, content)), list(map(_LOGPROB, content)),
                              [bytes(b) for b in map(_BYTES, content)], [list(map(_TOKEN, r)) for r in tops],
                              [list(map(_LOGPROB, r)) for r in tops])  # fmt: skip
        except (AttributeError, KeyError, TypeError, ValueError):
            fast = False
        if fast:
            return
        nan = float("nan")
        for entry in content:
            if entry.__class__ is not dict:
                raise CallError("malformed logprobs entry", retryable=True)
            s, i = _split_token(entry.get("token"))
            self.strs.append(s)
            self.str_ids.append(i)
            b = entry.get("bytes")
            if b.__class__ is list:
                self.bytes.append(bytes(b))
                self.any_bytes = True
            else:
                self.bytes.append(None)
            v = entry.get("logprob")
            self.logprobs.append(float(v) if v is not None else nan)
            top = entry.get("top_logprobs")
            self._top([(t.get("token"), t.get("logprob")) for t in top if t.__class__ is dict] if top else [])

    def completion_logprobs(self, lp: Any) -> None:
        if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
            return
        try:
            tops = lp.get("top_logprobs") or [{}] * len(lp["tokens"])
            if self._fast(lp["tokens"], lp["token_logprobs"], None, [list(d) for d in tops],
                          [list(d.values()) for d in tops]):  # fmt: skip
                return
        except (AttributeError, KeyError, TypeError, ValueError):
            pass
        tlps, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
        for k, tok in enumerate(lp["tokens"]):
            tlp = tlps[k] if k < len(tlps) else None
            top = tops[k] if k < len(tops) else None
            s, i = _split_token(tok)
            self.strs.append(s)
            self.str_ids.append(i)
            self.logprobs.append(float(tlp) if tlp is not None else float("nan"))
            self._top(list(top.items()) if isinstance(top, dict) else [])

    def choice(self, choice: Mapping[str, Any], api: Api, delta: bool) -> None:
        if api == "chat":
            msg = choice.get("delta" if delta else "message") or {}
            if not isinstance(msg, dict):
                raise CallError("malformed choice", retryable=True)
            self.text.append(msg.get("content") or "")
            self.chat_logprobs(choice.get("logprobs"))
        else:
            self.text.append(choice.get("text") or "")
            self.completion_logprobs(choice.get("logprobs"))
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.choice_ids = (self.choice_ids or []) + [int(x) for x in ids]
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]

    def result(self) -> Completion:
        n = len(self.strs)
        out = Completion(text="".join(self.text), finish_reason=self.finish, model=self.model,
                         system_fingerprint=self.fingerprint)  # fmt: skip
        if self.choice_ids is not None:
            out.token_ids = self.choice_ids
        elif n and all(i is not None for i in self.str_ids):
            out.token_ids = [int(i) for i in self.str_ids if i is not None]
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


def _parse_whole(obj: Any, api: Api) -> Completion:
    if not isinstance(obj, dict):
        raise CallError("response is not a JSON object", retryable=True)
    if "error" in obj and "choices" not in obj:
        err = obj["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        raise CallError(f"server error in a 200 answer: {msg}", retryable=True)
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        keys = ", ".join(sorted(str(k) for k in obj)[:6])
        raise CallError(f"response is not an OpenAI completion (keys: {keys or 'none'})", retryable=True)
    acc = _Acc()
    acc.head(obj)
    acc.choice(choices[0], api, delta=False)
    return acc.result()


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

    def _transport_error(self, e: Exception) -> CallError:
        if isinstance(e, httpx.TimeoutException):
            kind = type(e).__name__
            return CallError(f"timeout ({kind}) after {self.timeout:g}s", retryable=True)
        if isinstance(e, httpx.ConnectError):
            where = redact_url(self.base_url)
            return CallError(self._scrub(f"cannot connect to {where}: {e or type(e).__name__}"), retryable=True)
        if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return CallError(self._scrub(f"connection broken ({type(e).__name__}: {e})"), retryable=True)
        return CallError(self._scrub(f"{type(e).__name__}: {e}"), retryable=True)

    def _status_error(self, resp: httpx.Response) -> CallError:
        msg = self._scrub(f"HTTP {resp.status_code}: {_error_message(resp)}")
        return CallError(msg, retryable=resp.status_code in RETRYABLE_STATUS, status=resp.status_code,
                         retry_after=_retry_after(resp.headers))  # fmt: skip

    async def list_models(self) -> list[str]:
        """Model ids from GET /models (one attempt; callers turn failures into usage errors)."""
        try:
            resp = await self._pools[0].get("/models")
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if resp.status_code != 200:
            raise self._status_error(resp)
        try:
            data = resp.json().get("data")
        except (ValueError, AttributeError):
            raise CallError("/models answer is not OpenAI JSON", retryable=False) from None
        if not isinstance(data, list):
            raise CallError("/models answer has no data list", retryable=False)
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    async def request(self, api: Api, body: Mapping[str, Any], *, stream: bool = False,
                      slot: int | None = None) -> Completion:  # fmt: skip
        """One attempt. Raises CallError. `slot` (e.g. a worker's number) picks the connection pool."""
        path = PATHS[api]
        http = self._pool(slot)
        try:
            if not stream:
                resp = await http.post(path, json=dict(body))
                if resp.status_code != 200:
                    raise self._status_error(resp)
                try:
                    obj = _loads(resp.content)
                except ValueError as e:
                    raise CallError(f"malformed JSON in a 200 answer ({e})", retryable=True) from None
                return _parse_whole(obj, api)
            payload = {**body, "stream": True}
            async with http.stream("POST", path, json=payload) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise self._status_error(resp)
                return await self._read_stream(resp, api)
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None

    async def _read_stream(self, resp: httpx.Response, api: Api) -> Completion:
        acc = _Acc()
        done = False
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                obj = _loads(data)
            except ValueError as e:
                raise CallError(f"malformed JSON in a stream event ({e})", retryable=True) from None
            if not isinstance(obj, dict):
                raise CallError("stream event is not a JSON object", retryable=True)
            if "error" in obj:
                err = obj["error"]
                msg = err.get("message") if isinstance(err, dict) else err
                raise CallError(self._scrub(f"error event in stream: {msg}"), retryable=True)
            acc.head(obj)
            choices = obj.get("choices")
            if not isinstance(choices, list):
                raise CallError("stream event is not an OpenAI chunk", retryable=True)
            for choice in choices:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    acc.choice(choice, api, delta=True)
        # Some servers (transformers serve) close a finished stream without [DONE]; a finish_reason still proves
        # the end was reached. Neither means the stream was cut.
        if not done and acc.finish is None:
            raise CallError("stream ended before [DONE] or a finish_reason (truncated)", retryable=True)
        return acc.result()

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
                                      time.perf_counter() - t0, errors)  # fmt: skip
                await asyncio.sleep(self._delay(attempt, e))
                continue
            return CallResult(completion, None, attempt, started, datetime.now(timezone.utc),
                              time.perf_counter() - t0, errors)  # fmt: skip
