"""The audit run pipeline: endpoint -> N requests per prompt per load arm -> run directory.

Arms run one after another (a concurrency-1 arm is the serial control), each with at most `concurrency` requests in
flight and an optional requests/s cap. Finished rows are flushed as Parquet shards about once a second, so a kill
loses at most the last second of answers, and `--resume` sends only the sample indices that are missing (or that
failed). Every sample index ends as exactly one row: ok, or error with its reason.

Order of work, so that bad input writes nothing: validate arguments and prompts, check `--out`, reach the endpoint
(models, auth, probe), and only then create the run directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from detaudit import __version__
from detaudit.analysis.units import completion_key
from detaudit.client import Api, CallError, CallResult, OpenAIClient
from detaudit.errors import RecordingFailed, UsageError
from detaudit.probe import logprob_fields, probe_api
from detaudit.redact import redact_url, session_scrubber, url_secrets
from detaudit.rundir.io import (
    ShardWriter,
    check_out_dir,
    describe,
    end_run,
    load_resumable,
    prepare_out_dir,
    read_samples,
    write_manifest,
)
from detaudit.rundir.schema import ArmSpec, PromptSpec, RequestParams, RunManifest, TargetSpec
from detaudit.userfiles import read_user_file

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TOP_LOGPROBS = 2  # top-1 vs top-2 margin at each fork; --top-logprobs 0 turns alternatives off
FLUSH_INTERVAL_S = 1.0
FLUSH_ROWS = 2000
# Requests per run: each one is a row in memory while its arm runs (the to-do list) and on disk. 10^7 is hours of
# requests at 1000 req/s; a mistyped -n (1e20) was an out-of-memory kill instead of a message.
MAX_SAMPLES = 10_000_000
# A prompt file is read whole into memory: /dev/zero once grew to 7.8 GB in 10 s.
MAX_PROMPT_FILE_BYTES = 64 * 2**20
# --extra-body is merged into every request: deeper JSON is a mistake, and the encoders recurse.
MAX_EXTRA_BODY_DEPTH = 64
# Bounds that keep waits computable: 1/rate seconds between requests, and timeouts the socket layer accepts.
MIN_RATE = 1e-3
MAX_SECONDS = 86_400.0
# RFC 9110 token characters: what a header name may hold.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# ---------------------------------------------------------------------------- prompts


def load_prompt_file(path: Path) -> list[PromptSpec]:
    """Plain text (the whole file is one prompt) or JSONL of {"prompt": ...} / {"messages": [...]} objects."""
    raw = read_user_file(path, MAX_PROMPT_FILE_BYTES, "prompt file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"prompt file {path} is not UTF-8 text") from None
    if "\x00" in text:
        raise UsageError(f"prompt file {path} contains NUL bytes; is it a binary file?")
    if path.suffix.lower() != ".jsonl":
        if not text.strip():
            raise UsageError(f"prompt file {path} is empty")
        return [PromptSpec(prompt_id="", prompt=text.rstrip("\n"))]
    specs: list[PromptSpec] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise UsageError(f"{path}:{lineno}: JSON nested too deeply") from None
        specs.append(_prompt_entry(obj, f"{path}:{lineno}"))
    if not specs:
        raise UsageError(f"prompt file {path} holds no prompts")
    return specs


def _prompt_entry(obj: Any, where: str) -> PromptSpec:
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object with \"prompt\" or \"messages\"")
    unknown = set(obj) - {"prompt", "messages", "id", "max_tokens"}
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise UsageError(f"{where}: give exactly one of \"prompt\" or \"messages\"")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise UsageError(f"{where}: \"prompt\" must be a non-empty string")
    if messages is not None:
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise UsageError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} strings")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise UsageError(f"{where}: \"max_tokens\" must be a positive integer")
    pid = obj.get("id")
    if pid is not None and (not isinstance(pid, str) or not pid.strip()):
        raise UsageError(f"{where}: \"id\" must be a non-empty string")
    return PromptSpec(prompt_id=pid or "", prompt=prompt, messages=messages, max_tokens=max_tokens)


def gather_prompts(
    prompts: list[str], prompt_file: Path | None, extra: list[PromptSpec] | None = None
) -> list[PromptSpec]:
    """All prompts of a run, in order: --prompt values, then --prompt-file entries, then `extra` (e.g. a suite).

    Prompts without an id get p0, p1, ...; ids must be unique.
    """
    specs: list[PromptSpec] = []
    for i, p in enumerate(prompts):
        if not p.strip():
            raise UsageError(f"--prompt #{i + 1} is empty")
        specs.append(PromptSpec(prompt_id="", prompt=p))
    if prompt_file is not None:
        specs.extend(load_prompt_file(prompt_file))
    specs.extend(extra or [])
    if not specs:
        raise UsageError("no prompt given: pass --prompt TEXT, --prompt-file FILE or --suite NAME")
    out, seen = [], set()
    for i, s in enumerate(specs):
        pid = s.prompt_id or f"p{i}"
        if pid in seen:
            raise UsageError(f"prompt id {pid!r} appears twice")
        seen.add(pid)
        texts = [pid, s.prompt or "", *(v for m in s.messages or [] for v in m.values() if isinstance(v, str))]
        if not all(_utf8(t) for t in texts):
            raise UsageError(f"prompt {pid!r} holds text that is not valid Unicode (a lone surrogate such as "
                             f"\\ud800, or bytes that are not UTF-8); no server can take it")  # fmt: skip
        out.append(s.model_copy(update={"prompt_id": pid}))
    return out


def _utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8: a lone surrogate (a JSON "\\ud800" escape, undecodable bytes in argv) does
    not, and httpx would raise UnicodeEncodeError from inside a worker for every request that carries it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------------- arguments


def parse_concurrency(value: str) -> list[int]:
    """'1,64' -> [1, 64]: one load arm per value, run one after another."""
    arms = []
    for part in value.split(","):
        part = part.strip()
        try:
            c = int(part)
        except ValueError:
            raise UsageError(f"--concurrency: {part!r} is not an integer (use e.g. 1,64)") from None
        if c < 1:
            raise UsageError(f"--concurrency must be >= 1, got {c}")
        arms.append(c)
    if len(set(arms)) != len(arms):
        raise UsageError(f"--concurrency lists a value twice: {value}")
    return arms


def parse_headers(values: list[str]) -> dict[str, str]:
    """'Name: value' pairs; the values are secrets and never leave memory (they are registered with the scrubber).

    httpx sends headers as ASCII: a name outside the RFC 9110 token characters, or a value with a non-ASCII or
    control character, fails every request (UnicodeEncodeError, or a 400 from the server), so both are refused."""
    headers: dict[str, str] = {}
    for v in values:
        name, sep, val = v.partition(":")
        name = name.strip()
        if not sep or not name or any(c.isspace() for c in name):
            raise UsageError(f"--header {name or '?'!r}: expected 'Name: value'")
        if not _HEADER_NAME.fullmatch(name):
            raise UsageError(f"--header {name!r}: a header name is ASCII letters, digits and !#$%&'*+-.^_`|~")
        val = val.strip()
        session_scrubber().add(val)
        if any(ord(c) < 32 or ord(c) == 127 for c in val):  # the server answers 400 to every request
            raise UsageError(f"--header {name!r}: the value holds a control character (the value is not shown)")
        if not val.isascii():
            raise UsageError(f"--header {name!r}: the value holds a non-ASCII character; HTTP header values are "
                             f"ASCII (the value is not shown)")  # fmt: skip
        if any(n.lower() == name.lower() for n in headers):
            raise UsageError(f"--header {name!r} is given twice; give each header once")
        headers[name] = val
    return headers


def api_key_from_env(env_name: str) -> str | None:
    """The key in `env_name`; an explicitly named variable that is unset is an error, the default one is not."""
    key = os.environ.get(env_name)
    if env_name != DEFAULT_KEY_ENV and not key:
        raise UsageError(f"--api-key-env {env_name}: that environment variable is not set")
    if key:
        session_scrubber().add(key)
        if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
            # It goes into "Authorization: Bearer KEY": httpx cannot encode it, or every request gets a 400.
            raise UsageError(f"the API key in {env_name} holds whitespace, a control or a non-ASCII character "
                             f"(the key is not shown)")  # fmt: skip
    return key or None


def base_url_or_default(base_url: str | None) -> str:
    """--base-url as given (an empty one is refused by check_base_url, never replaced by OpenAI's), else the env."""
    return base_url if base_url is not None else os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL


def check_base_url(url: str) -> str:
    """Refuse a base URL no request could use, before any is sent: httpx would raise InvalidURL, a bare ValueError
    or an IDNA error from inside a worker task (a bad port, a broken IPv6 literal, a host name IDNA refuses), or
    look up an empty host name. The URL's credentials are registered with the scrubber first."""
    import httpx

    for secret in url_secrets(url):
        session_scrubber().add(secret)
    shown = redact_url(url)
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--base-url must start with http:// or https://, got {shown!r}")
    if any(c.isspace() for c in url):
        raise UsageError(f"--base-url {shown!r} contains whitespace")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check (non-numeric or past 65535 raises)
    except ValueError as e:
        raise UsageError(f"--base-url {shown!r}: {e}") from None
    if not parts.hostname:
        raise UsageError(f"--base-url {shown!r} names no host")
    try:
        httpx.Request("GET", url)  # the parser, IDNA encoder and decoder (for the Host header) of every request
    except (httpx.InvalidURL, ValueError) as e:  # idna.IDNAError is a UnicodeError, hence a ValueError
        raise UsageError(f"--base-url {shown!r}: {e}") from None
    return url


def check_credentials(base_url: str, api_key: str | None, headers: Mapping[str, str], key_env: str) -> None:
    """Each of user:password in the URL, --header Authorization and the API key sets the Authorization header, and
    httpx lets one silently replace another: two of them are a mistake to name, not a choice to make quietly."""
    sources = []
    if "@" in urlsplit(base_url).netloc:
        sources.append("user:password in --base-url")
    if any(name.lower() == "authorization" for name in headers):
        sources.append("--header Authorization")
    if api_key:
        sources.append(f"the API key in {key_env}")
    if len(sources) > 1:
        hint = f" (run with {key_env}= to send no key)" if api_key else ""
        raise UsageError(f"conflicting credentials: {' and '.join(sources)} each set the Authorization header; "
                         f"give only one{hint}")  # fmt: skip


def parse_extra_body(value: str | None) -> dict[str, Any]:
    """--extra-body as a JSON object every server can parse: no NaN/Infinity (JSON has neither; httpx refuses to
    send them), no lone surrogates, nested at most MAX_EXTRA_BODY_DEPTH deep."""
    if not value:
        return {}

    def no_constant(name: str) -> Any:
        raise UsageError(f"--extra-body holds {name}, which JSON does not allow (no server would accept it)")

    try:
        obj = json.loads(value, parse_constant=no_constant)
    except ValueError as e:
        raise UsageError(f"--extra-body is not valid JSON ({e.msg} at char {e.pos})") from None
    except RecursionError:
        raise UsageError(f"--extra-body is nested more than {MAX_EXTRA_BODY_DEPTH} levels deep") from None
    if not isinstance(obj, dict):
        raise UsageError("--extra-body must be a JSON object, e.g. '{\"cache_salt\": \"x\"}'")
    reserved = {"model", "messages", "prompt", "stream", "n"} & set(obj)
    if reserved:
        raise UsageError(f"--extra-body may not set {', '.join(sorted(reserved))} (use the matching option)")
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_EXTRA_BODY_DEPTH:
            raise UsageError(f"--extra-body is nested more than {MAX_EXTRA_BODY_DEPTH} levels deep")
        if isinstance(item, dict):
            stack += [(k, depth) for k in item] + [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]
        elif isinstance(item, str) and not _utf8(item):
            raise UsageError("--extra-body holds a lone surrogate escape (such as \\ud800): not valid Unicode")
    return obj


@dataclass
class RunRequest:
    """Everything a run needs. Secrets (api_key, header values) live here in memory only."""

    out: Path | None = None  # None: runs/<run id>
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    api: Api = "chat"
    prompts: list[PromptSpec] = field(default_factory=list)
    repeats: int = 1
    concurrency: list[int] = field(default_factory=lambda: [1])
    params: RequestParams = field(default_factory=RequestParams)
    stream: bool = False
    backoff: float = 0.5
    resume: bool = False
    force: bool = False
    suite: str | None = None
    key_env: str = DEFAULT_KEY_ENV  # where api_key came from, to name it in messages

    def validate(self) -> None:
        """Every argument checked before the network or the disk is touched; secrets registered with the scrubber."""
        scrubber = session_scrubber()
        for secret in [self.api_key, *self.headers.values(), *url_secrets(self.base_url)]:
            scrubber.add(secret)
        if self.repeats < 1:
            raise UsageError(f"-n/--repeats must be >= 1, got {self.repeats}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise UsageError("--concurrency must be >= 1")
        total = self.repeats * max(len(self.prompts), 1) * len(self.concurrency)
        if total > MAX_SAMPLES:
            raise UsageError(f"-n/--repeats {self.repeats} makes {total} requests; a run holds at most {MAX_SAMPLES}")
        # Comparisons below are written so that NaN fails them too (nan < 0 and nan <= 0 are both False).
        p = self.params
        if p.max_tokens is not None and p.max_tokens < 1:
            raise UsageError(f"--max-tokens must be >= 1, got {p.max_tokens}")
        if not 0 <= p.temperature < math.inf:  # JSON has no inf: every request would fail to encode
            raise UsageError(f"--temperature must be >= 0 and finite, got {p.temperature}")
        if p.top_p is not None and not 0 < p.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {p.top_p}")
        if p.top_logprobs is not None and not 0 <= p.top_logprobs <= 20:
            raise UsageError(f"--top-logprobs must be between 0 and 20, got {p.top_logprobs}")
        if not 0 < p.timeout_s <= MAX_SECONDS:
            raise UsageError(f"--timeout must be > 0 and at most {MAX_SECONDS:g} s, got {p.timeout_s}")
        if p.retries < 0:
            raise UsageError(f"--retries must be >= 0, got {p.retries}")
        if p.rate is not None and not MIN_RATE <= p.rate < math.inf:  # 1/rate is the wait between requests
            raise UsageError(f"--rate must be > 0 (at least {MIN_RATE:g} requests/s, and finite), got {p.rate}")
        if not 0 <= self.backoff <= MAX_SECONDS:
            raise UsageError(f"--backoff must be >= 0 and at most {MAX_SECONDS:g} s, got {self.backoff}")
        for what, text in [("--model", self.model or ""), *(("--stop", s) for s in p.stop)]:
            if not _utf8(text):
                raise UsageError(f"{what} holds text that is not valid Unicode (bytes that are not UTF-8)")
        check_base_url(self.base_url)
        check_credentials(self.base_url, self.api_key, self.headers, self.key_env)
        if self.api == "completions":
            chat_only = [s.prompt_id for s in self.prompts if s.prompt is None]
            if chat_only:
                raise UsageError(f"--api completions needs plain prompts; {chat_only[0]!r} has chat messages")


# ---------------------------------------------------------------------------- results


@dataclass
class ArmTally:
    """Live per-arm counts for the progress bar (and the fallback table)."""

    name: str
    concurrency: int
    total: int
    done: int = 0
    ok: int = 0
    errors: int = 0
    keys: set[int] = field(default_factory=set)  # hashes of the distinct completions seen


@dataclass
class RunOutcome:
    """How a run ended: its manifest (status complete, interrupted or failed) and, when failed, why."""

    run_dir: Path
    manifest: RunManifest
    interrupted: bool = False
    tallies: list[ArmTally] = field(default_factory=list)
    failure: str | None = None
    rows: int | None = None  # sample rows on disk

    def resume_command(self) -> str:
        cmd = f"detaudit run --resume --out {shlex.quote(str(self.run_dir))}"
        if self.manifest.target.header_names:
            cmd += " " + " ".join(f"--header '{n}: …'" for n in self.manifest.target.header_names)
        return cmd


# ---------------------------------------------------------------------------- the pipeline


def _endpoint_usage_error(what: str, err: CallError | str) -> UsageError:
    return UsageError(f"{what}: {err}")


async def resolve_model(client: OpenAIClient, model: str | None, base_url: str) -> tuple[str | None, list[str]]:
    """Reach the endpoint once: unreachable, 401 and unknown model are usage errors (exit 2), before any write."""
    try:
        models = await client.list_models()
    except CallError as e:
        if e.status in (401, 403):
            raise _endpoint_usage_error(f"{redact_url(base_url)} refused the credentials", e) from None
        if e.status is None:
            raise _endpoint_usage_error(f"endpoint {redact_url(base_url)} is unreachable", e) from None
        if model is None:
            raise UsageError(f"--model is required: {redact_url(base_url)}/models answered {e}") from None
        return model, []
    if model is None:
        if len(models) == 1:
            return models[0], models
        if not models:
            raise UsageError(f"--model is required: {redact_url(base_url)}/models lists no model")
        shown = ", ".join(models[:5]) + (" …" if len(models) > 5 else "")
        raise UsageError(f"--model is required: the endpoint serves {len(models)} models ({shown})")
    if models and model not in models:
        shown = ", ".join(models[:5]) + (" …" if len(models) > 5 else "")
        raise UsageError(f"unknown model {model!r}: the endpoint serves {shown}")
    return model, models


def _base_body(req: RunRequest, manifest: RunManifest, spec: PromptSpec) -> dict[str, Any]:
    """The request body: capture fields from the probe, then --extra-body (which may override them, e.g.
    "logprobs": false), then the explicit options, which nothing overrides."""
    p = manifest.params
    body: dict[str, Any] = dict(manifest.probe.get("request_fields", {}))
    if manifest.capture != "text":
        body.update(logprob_fields(manifest.target.api, p.top_logprobs or 0))
    body.update(p.extra_body)
    body["model"] = manifest.target.model
    body["temperature"] = p.temperature
    max_tokens = spec.max_tokens or p.max_tokens
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if p.top_p is not None:
        body["top_p"] = p.top_p
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if manifest.target.api == "chat":
        body["messages"] = spec.messages or [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if req.stream and manifest.target.api == "chat":
        body["stream_options"] = {"include_usage": True}
    return body


def _row(manifest: RunManifest, idx: int, spec: PromptSpec, arm: ArmSpec, repeat: int, res: CallResult) -> dict:
    row: dict[str, Any] = {
        "run_id": manifest.run_id, "sample_index": idx, "prompt_id": spec.prompt_id, "arm": arm.name,
        "concurrency": arm.concurrency, "repeat": repeat, "attempts": res.attempts, "latency_s": res.latency_s,
        "started_at": res.started_at, "finished_at": res.finished_at,
    }  # fmt: skip
    if res.completion is None:
        row.update(status="error", error=res.error, error_reason=res.error_reason, raw_answer=res.raw_answer)
    else:
        row.update(status="ok", **res.completion.columns())
    return row


class _Runner:
    """State of one executing run: the manifest, the shard writer, the row buffer and the stop flag."""

    def __init__(self, req: RunRequest, manifest: RunManifest, run_dir: Path, progress: Any) -> None:
        self.req, self.manifest, self.run_dir, self.progress = req, manifest, run_dir, progress
        self.writer = ShardWriter(run_dir)
        # A flush awaited by a cancelled task keeps running in its thread: the lock keeps shard numbers apart.
        self._write_lock = threading.Lock()
        self.buffer: list[dict[str, Any]] = []
        self._pending: set[asyncio.Future[str | None]] = set()
        self.stop = asyncio.Event()
        self.current: list[asyncio.Task[Any]] = []  # the arm running now, cancelled by halt()
        self.failure: str | None = None  # why recording failed; the run then stops and ends `failed`
        self._next_slot = 0.0
        self.capture_seen: Counter[str] = Counter()

    def halt(self) -> None:
        """Stop sending and cancel the requests in flight (Ctrl-C, SIGTERM, or a failed shard write)."""
        self.stop.set()
        for t in self.current:
            t.cancel()

    async def _rate_wait(self) -> None:
        rate = self.manifest.params.rate
        if not rate:
            return
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / rate
        if slot > now:
            await asyncio.sleep(slot - now)

    async def flush(self) -> None:
        if not self.buffer:
            return
        rows, self.buffer = self.buffer, []
        # The write runs on in its thread even if this awaiter is cancelled (a worker or the flusher being
        # stopped): keep it in _pending so drain() waits for it before the shards are folded. Its outcome is
        # read by _written, whoever awaits it (the flusher task's own exceptions were lost: #15).
        write = asyncio.ensure_future(asyncio.to_thread(self._write, rows))
        self._pending.add(write)
        write.add_done_callback(self._written)
        await asyncio.shield(write)

    async def drain(self) -> None:
        """Flush the buffer and wait for every shard write still in flight."""
        await self.flush()
        while self._pending:
            await asyncio.gather(*list(self._pending))

    def _write(self, rows: list[dict[str, Any]]) -> str | None:
        """Write one shard (in a worker thread); returns why recording failed instead of raising."""
        with self._write_lock:
            try:
                self.writer.write(rows)
            except RecordingFailed as e:
                return str(e)
            except Exception as e:  # noqa: BLE001 - whatever stops a shard stops the run, and says why
                return f"cannot write {len(rows)} rows: {describe(e)}"
        return None

    def _written(self, write: asyncio.Future[str | None]) -> None:
        """A shard write ended (on the event loop, before its awaiters resume): a failure stops the run at once."""
        self._pending.discard(write)
        why = "a shard write was cancelled" if write.cancelled() else write.result()
        if why is not None:
            self.failure = self.failure or why
            self.halt()

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self.flush()

    async def run_arm(self, client: OpenAIClient, arm_pos: int, arm: ArmSpec, todo: list[tuple[int, int]],
                      tally: ArmTally, task_id: Any) -> None:  # fmt: skip
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)
        prompts = self.manifest.prompts
        bodies = [_base_body(self.req, self.manifest, s) for s in prompts]

        async def worker(slot: int) -> None:
            while not self.stop.is_set():
                try:
                    prompt_pos, repeat = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self._rate_wait()
                res = await client.call(self.manifest.target.api, bodies[prompt_pos], stream=self.req.stream,
                                        slot=slot)  # fmt: skip
                idx = self.manifest.sample_index(prompt_pos, arm_pos, repeat)
                row = _row(self.manifest, idx, prompts[prompt_pos], arm, repeat, res)
                self.buffer.append(row)
                if len(self.buffer) >= FLUSH_ROWS:
                    await self.flush()
                self._count(row, tally, task_id)

        workers = [asyncio.create_task(worker(slot)) for slot in range(min(arm.concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _count(self, row: Mapping[str, Any], tally: ArmTally, task_id: Any) -> None:
        tally.done += 1
        if row["status"] == "ok":
            tally.ok += 1
            tally.keys.add(_key_hash(row))
            self.capture_seen[_row_capture(row)] += 1
        else:
            tally.errors += 1
        if self.progress is not None:
            self.progress.update(task_id, advance=1, errors=tally.errors, distinct=len(tally.keys))


def _row_capture(row: Mapping[str, Any]) -> str:
    if row.get("token_ids") is not None:
        return "token_ids"
    if row.get("tokens") is not None or row.get("token_bytes") is not None:
        return "tokens"
    return "text"


_KEY_COLUMNS = ["sample_index", "status", "prompt_id", "token_ids", "token_bytes", "tokens", "text"]


def _recorded(run_dir: Path) -> dict[int, int | None]:
    """sample_index -> hash of its completion key for ok rows (None for failed rows) already on disk."""
    if not (run_dir / "samples.parquet").exists() and not (run_dir / "shards").is_dir():
        return {}
    table = read_samples(run_dir, columns=_KEY_COLUMNS)
    out: dict[int, int | None] = {}
    for batch in table.to_batches(max_chunksize=4096):  # bounded Python objects at a time
        for row in batch.to_pylist():
            out[row["sample_index"]] = _key_hash(row) if row["status"] == "ok" else None
    return out


def _key_hash(row: Mapping[str, Any]) -> int:
    """The live distinct counter keeps a 64-bit hash per completion, not the completion: bounded memory."""
    return hash((row["prompt_id"], completion_key(row)))


def _todo(manifest: RunManifest, recorded: dict[int, int | None], arm_pos: int,
          tally: ArmTally) -> list[tuple[int, int]]:  # fmt: skip
    """(prompt_pos, repeat) pairs of this arm still to send: never sent, or failed last time."""
    todo = []
    for prompt_pos in range(len(manifest.prompts)):
        for repeat in range(manifest.repeats):
            key = recorded.get(manifest.sample_index(prompt_pos, arm_pos, repeat))
            if key is not None:
                tally.done += 1
                tally.ok += 1
                tally.keys.add(key)
            else:
                todo.append((prompt_pos, repeat))
    return todo


def _new_manifest(req: RunRequest, model: str | None, probe: dict[str, Any]) -> RunManifest:
    capture = probe.get("capture", "text")
    params = req.params
    if capture != "text" and params.top_logprobs is None and probe.get("top_logprobs"):
        params = params.model_copy(update={"top_logprobs": DEFAULT_TOP_LOGPROBS})
    notes = []
    if capture == "text":
        notes.append("The endpoint returned no per-token data: completions are compared as text.")
    return RunManifest(
        run_id=uuid.uuid4().hex[:12],
        tool_version=__version__,
        created_at=datetime.now(timezone.utc),
        target=TargetSpec(kind="endpoint", base_url=redact_url(req.base_url), api=req.api, model=model,
                          header_names=sorted(req.headers)),  # fmt: skip
        params=params,
        prompts=req.prompts,
        arms=[ArmSpec(name=f"c{c}", concurrency=c) for c in req.concurrency],
        repeats=req.repeats,
        capture=capture,
        probe=probe,
        environment={"python": sys.version.split()[0], "platform": platform.platform(),
                     "stream": req.stream},  # fmt: skip
        suite=req.suite,
        notes=notes,
    )


def request_from_manifest(out: Path, *, base_url: str | None, api_key: str | None, headers: dict[str, str],
                          stream: bool, backoff: float) -> tuple[RunRequest, RunManifest]:  # fmt: skip
    """The request of an unfinished run (interrupted, failed or killed), from its manifest; credentials come from
    the caller (never stored)."""
    manifest = load_resumable(out)  # refuse what is not a run to trust before anything is written
    if manifest.target.kind != "endpoint":
        raise UsageError(f"{out} is a local run; resume it with the command that made it")
    recorded = manifest.target.base_url or DEFAULT_BASE_URL
    if base_url is not None and redact_url(base_url) != recorded:
        raise UsageError(f"--base-url {redact_url(base_url)} differs from the run's {recorded}")
    if "***" in recorded and base_url is None:
        raise UsageError("the run's --base-url held credentials that were not stored; pass --base-url again")
    missing = [n for n in manifest.target.header_names if n not in headers]
    if missing:
        raise UsageError(f"the run sent header(s) {', '.join(missing)}; pass --header again (values are not stored)")
    req = RunRequest(
        out=out, base_url=base_url or recorded, api_key=api_key, headers=headers, model=manifest.target.model,
        api=manifest.target.api, prompts=manifest.prompts, repeats=manifest.repeats,
        concurrency=[a.concurrency for a in manifest.arms], params=manifest.params,
        stream=bool(manifest.environment.get("stream", stream)), backoff=backoff, resume=True, suite=manifest.suite,
    )  # fmt: skip
    return req, manifest


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Half-written temporaries of a killed run (atomic writes never renamed): never read, safe to drop on resume."""
    for pattern in (".*.tmp", "shards/.*.tmp"):
        for path in run_dir.glob(pattern):
            path.unlink(missing_ok=True)


def _ensure_fd_limit(connections: int) -> None:
    """Concurrency 1,024 needs more descriptors than the common soft limit of 1,024: raise it toward the hard one."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256  # sockets plus Parquet, Python and the event loop's own descriptors
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        raise UsageError(f"--concurrency {connections} needs about {want} open files but the limit is {hard}; "
                         f"lower --concurrency or raise the limit (ulimit -n)")  # fmt: skip


async def _execute(req: RunRequest, make_progress: Callable[[], Any] | None,
                   resumed: RunManifest | None) -> RunOutcome:  # fmt: skip
    scrubber = session_scrubber()  # knows the environment's secrets too: error rows are scrubbed of them
    max_conn = max(req.concurrency) + 4
    async with OpenAIClient(req.base_url, api_key=req.api_key, headers=req.headers, timeout=req.params.timeout_s,
                            retries=req.params.retries, backoff=req.backoff, max_connections=max_conn,
                            max_response_bytes=req.params.max_response_bytes, scrubber=scrubber) as client:  # fmt: skip
        model, models = await resolve_model(client, req.model, req.base_url)
        if resumed is None:
            probe = await probe_api(client, req.api, model, req.params.extra_body)
            if not probe["ok"]:
                raise UsageError(f"{req.api} API of {redact_url(req.base_url)} does not answer: {probe['error']}")
            probe["models"] = models
            manifest = _new_manifest(req, model, probe)
            run_dir = req.out or Path("runs") / manifest.run_id
            prepare_out_dir(run_dir, resume=False, force=req.force)
        else:
            manifest = resumed.model_copy(update={"status": "started", "finished_at": None})
            run_dir = req.out or Path(".")
            _remove_stale_temp_files(run_dir)
        # Ctrl-C from the first byte written on is the runner's (a loop callback, run at the first await, when
        # `runner` exists): a KeyboardInterrupt in between left a run directory that still said `started`.
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, lambda: runner.halt())
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        write_manifest(run_dir, manifest)
        progress = make_progress() if make_progress is not None else None
        runner = _Runner(req, manifest, run_dir, progress)
        tallies = [ArmTally(a.name, a.concurrency, len(manifest.prompts) * manifest.repeats) for a in manifest.arms]
        flusher = asyncio.create_task(runner._flusher())
        try:
            try:
                if progress is not None:
                    progress.start()
                stopped = await _run_arms(runner, client, run_dir, tallies)
            finally:
                for sig in installed:
                    loop.remove_signal_handler(sig)
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
                await runner.drain()
                if progress is not None:
                    progress.stop()
        except Exception as e:  # a bug: the manifest still says so (failed), then the traceback path takes over
            end_run(run_dir, manifest, interrupted=False, failure=runner.failure or f"internal error: {describe(e)}")
            raise
        if not stopped:
            manifest = _final_capture(manifest, runner.capture_seen)
        end = end_run(run_dir, manifest, interrupted=stopped, failure=runner.failure)
        return RunOutcome(run_dir, end.manifest, interrupted=end.manifest.status == "interrupted", tallies=tallies,
                          failure=end.failure, rows=end.rows)  # fmt: skip


async def _run_arms(runner: _Runner, client: OpenAIClient, run_dir: Path, tallies: list[ArmTally]) -> bool:
    """Send every sample still missing, arm after arm; returns whether the run was stopped before the end."""
    manifest, progress = runner.manifest, runner.progress
    recorded = _recorded(run_dir)
    for arm_pos, arm in enumerate(manifest.arms):
        tally = tallies[arm_pos]
        todo = _todo(manifest, recorded, arm_pos, tally)
        task_id = None
        if progress is not None:
            task_id = progress.add_task(f"arm {arm.name}", total=tally.total, completed=tally.done,
                                        errors=tally.errors, distinct=len(tally.keys))  # fmt: skip
        if not todo:
            continue
        task = asyncio.create_task(runner.run_arm(client, arm_pos, arm, todo, tally, task_id))
        runner.current[:] = [task]
        try:
            await task
        except asyncio.CancelledError:
            if not runner.stop.is_set():
                raise
        if runner.stop.is_set():
            return True
    return runner.stop.is_set()


def _final_capture(manifest: RunManifest, seen: Counter[str]) -> RunManifest:
    """If some answers came back poorer than the probe promised, say so: comparisons must use the common unit."""
    if not seen:
        return manifest
    order = ("text", "tokens", "token_ids")
    lowest = min(seen, key=order.index)
    if order.index(lowest) >= order.index(manifest.capture):
        return manifest
    note = (f"capture dropped from {manifest.capture} to {lowest} on {seen[lowest]} of {sum(seen.values())} answers "
            f"this session: compare completions as {'text' if lowest == 'text' else 'tokens'}")  # fmt: skip
    return manifest.model_copy(update={"capture": lowest, "notes": [*manifest.notes, note]})


def execute_run(req: RunRequest, make_progress: Callable[[], Any] | None = None,
                resumed: RunManifest | None = None) -> RunOutcome:  # fmt: skip
    """Validate, reach the endpoint, write the run directory; returns where it is and how it ended."""
    req.validate()
    _ensure_fd_limit(max(req.concurrency))
    if resumed is None and req.out is not None:
        check_out_dir(req.out, req.force)  # before the network: --force clears it only once the endpoint answered
    with _gc_tuned():
        return asyncio.run(_execute(req, make_progress, resumed))


@contextlib.contextmanager
def _gc_tuned() -> Iterator[None]:
    """Each answer allocates about a thousand short-lived, acyclic JSON objects that reference counting frees; the
    cyclic collector would still rescan the whole heap (pyarrow, rich, ...) every few answers. Freeze the objects
    that exist at start and collect young objects less often for the run, then restore."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], 50_000), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
