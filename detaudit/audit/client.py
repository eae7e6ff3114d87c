"""Async HTTP client for OpenAI-compatible endpoints: chat and completions, whole or streamed, with retries.

Why not the openai SDK: detaudit needs what the SDK hides or drops — vLLM's `token_ids` and "token_id:123" token
strings, per-token `bytes`, the exact failure of each attempt, Retry-After on every retryable answer, and a
connection pool sized to the arm's concurrency. There is no response cache of any kind: every call is a fresh HTTP
request. What comes back is parsed strictly by answers.py.

An attempt is bounded in time (`timeout`: connect and the whole body) and in size (`max_response_bytes`).

Secrets: the API key and header values stay in this object's memory; every error message and every raw answer
kept for inspection passes the Scrubber.
"""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio
import httpx
import orjson

from detaudit.audit.answers import StreamParser, parse_answer
from detaudit.audit.completion import RAW_CHARS, Api, CallError, CallResult, Completion, one_line, text_of
from detaudit.redact import Scrubber, redact_url, url_secrets
from detaudit.rundir.schema import DEFAULT_MAX_RESPONSE_BYTES

PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
MAX_RETRY_AFTER_S = 120.0
POOL_SIZE = 32  # connections per httpx pool (see OpenAIClient.__init__)
ERROR_BODY_BYTES = 64 * 1024  # how much of a non-200 body is read: its message is at the start


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
            return text_of(err["message"])
        if isinstance(err, str):
            return one_line(err)
        if "detail" in obj:
            return text_of(obj["detail"])
    text = one_line(body.decode("utf-8", "replace"), 400)
    if "html" in content_type or text.lower().startswith(("<!doctype", "<html")):
        return "HTML error page" + (f" ({text[:80]})" if text else "")
    return text[:200] or "(empty body)"


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
        query = tuple(parse_qsl(parts.query, keep_blank_values=True))
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
            return CallError(
                self._scrub(f"cannot connect to {where}: {one_line(str(e)) or type(e).__name__}"),
                retryable=True,
                reason="connect",
            )
        if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return CallError(
                self._scrub(f"connection broken ({type(e).__name__}: {one_line(str(e))})"),
                retryable=True,
                reason="broken",
                raw=raw,
            )
        return CallError(
            self._scrub(f"{type(e).__name__}: {one_line(str(e))}"), retryable=True, reason="broken", raw=raw
        )

    def _status_error(self, resp: httpx.Response, body: bytes) -> CallError:
        msg = self._scrub(f"HTTP {resp.status_code}: {_error_message(body, resp.headers.get('content-type', ''))}")
        return CallError(
            msg,
            retryable=resp.status_code in RETRYABLE_STATUS,
            reason=f"http:{resp.status_code}",
            status=resp.status_code,
            retry_after=_retry_after(resp.headers),
            raw=self._raw(body),
        )

    def _too_large(self) -> CallError:
        return CallError(
            f"answer larger than {self.max_response_bytes} bytes (--max-response-bytes)",
            retryable=False,
            reason="too_large",
        )

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

    async def _send(
        self, api: Api, body: Mapping[str, Any], stream: bool, http: httpx.AsyncClient, got: _Received
    ) -> Completion:
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

    async def request(
        self, api: Api, body: Mapping[str, Any], *, stream: bool = False, slot: int | None = None
    ) -> Completion:
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
            raise CallError(
                one_line(self._scrub(str(e)), 400),
                retryable=e.retryable,
                reason=e.reason,
                status=e.status,
                retry_after=e.retry_after,
                raw=raw,
            ) from None

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
            raise CallError(
                f"/models did not answer within {self.timeout:g}s", retryable=True, reason="deadline"
            ) from None
        except httpx.HTTPError as e:
            raise self._transport_error(e, self._raw(got.head)) from None
        try:
            data = orjson.loads(body).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            raise CallError("/models answer is not OpenAI JSON", retryable=False, reason="not_openai") from None
        if not isinstance(data, list):
            raise CallError("/models answer has no data list", retryable=False, reason="not_openai")
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def reset_prefix_cache(self) -> bool:
        """POST /reset_prefix_cache at the server's root (vLLM's path, and `detaudit serve`'s): whether it answered
        200. One attempt; any failure is just False (most servers have no such route)."""
        root = self.base_url.removesuffix("/v1")
        try:
            with anyio.fail_after(self.timeout):
                resp = await self._pools[0].post(f"{root}/reset_prefix_cache")
        except (TimeoutError, httpx.HTTPError):
            return False
        return resp.status_code == 200

    def _delay(self, attempt: int, err: CallError) -> float:
        if err.retry_after is not None:
            return min(err.retry_after, MAX_RETRY_AFTER_S)
        base = min(self.backoff * (2 ** (attempt - 1)), self.backoff_max)
        return base * random.uniform(0.5, 1.0)

    async def call(
        self, api: Api, body: Mapping[str, Any], *, stream: bool = False, slot: int | None = None
    ) -> CallResult:
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
                    return CallResult(
                        None,
                        reason,
                        attempt,
                        started,
                        datetime.now(timezone.utc),
                        time.perf_counter() - t0,
                        errors,
                        e.reason,
                        e.raw,
                    )
                await asyncio.sleep(self._delay(attempt, e))
                continue
            return CallResult(
                completion, None, attempt, started, datetime.now(timezone.utc), time.perf_counter() - t0, errors
            )
