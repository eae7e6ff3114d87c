"""What one audit run asks for: prompts, arms and request parameters, parsed and validated from the command line or
from the manifest of a run to resume. Everything here is checked before the network or the disk is touched, so bad
input writes nothing (exit 2).

Longer than our ~400 lines on purpose: every check of a run's input (prompts, arguments, option groups, manifest)
lives here, in one place (issue #20: request parsing in one module)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from detaudit.audit.cache_arms import CACHE_STATES, CacheState, arm_specs
from detaudit.audit.client import Api
from detaudit.errors import UsageError
from detaudit.probes.suites import load_suite
from detaudit.redact import redact_url, session_scrubber, url_secrets
from detaudit.rundir.recorder import load_resumable
from detaudit.rundir.schema import DEFAULT_MAX_RESPONSE_BYTES, ArmSpec, PromptSpec, RequestParams, RunManifest
from detaudit.userfiles import read_user_file

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
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
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except ValueError as e:  # a number past int()'s digit limit
            raise UsageError(f"{path}:{lineno}: not valid JSON ({e})") from None
        except RecursionError:
            raise UsageError(f"{path}:{lineno}: JSON nested too deeply") from None
        specs.append(_prompt_entry(obj, f"{path}:{lineno}"))
    if not specs:
        raise UsageError(f"prompt file {path} holds no prompts")
    return specs


def _prompt_entry(obj: Any, where: str) -> PromptSpec:
    if not isinstance(obj, dict):
        raise UsageError(f'{where}: expected a JSON object with "prompt" or "messages"')
    unknown = set(obj) - {"prompt", "messages", "id", "max_tokens"}
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise UsageError(f'{where}: give exactly one of "prompt" or "messages"')
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise UsageError(f'{where}: "prompt" must be a non-empty string')
    if messages is not None:
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise UsageError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} strings')
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise UsageError(f'{where}: "max_tokens" must be a positive integer')
    pid = obj.get("id")
    if pid is not None and (not isinstance(pid, str) or not pid.strip()):
        raise UsageError(f'{where}: "id" must be a non-empty string')
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
            raise UsageError(
                f"prompt {pid!r} holds text that is not valid Unicode (a lone surrogate such as "
                f"\\ud800, or bytes that are not UTF-8); no server can take it"
            )
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


def parse_cache(value: str | None) -> list[CacheState]:
    """'cold,warm' -> ["cold", "warm"]: the prefix-cache states to make an arm of, for each concurrency."""
    if value is None:
        return []
    states: list[CacheState] = []
    for part in (p.strip() for p in value.split(",")):
        match = next((s for s in CACHE_STATES if s == part), None)
        if match is None:
            raise UsageError(f"--cache: {part!r} is not a cache state (use cold, warm or cold,warm)")
        if match in states:
            raise UsageError(f"--cache lists {part} twice: {value}")
        states.append(match)
    return states


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
            raise UsageError(
                f"--header {name!r}: the value holds a non-ASCII character; HTTP header values are "
                f"ASCII (the value is not shown)"
            )
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
            raise UsageError(
                f"the API key in {env_name} holds whitespace, a control or a non-ASCII character (the key is not shown)"
            )
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
        raise UsageError(
            f"conflicting credentials: {' and '.join(sources)} each set the Authorization header; give only one{hint}"
        )


def parse_extra_body(value: str | None) -> dict[str, Any]:
    """--extra-body as a JSON object every server can parse: no NaN/Infinity (JSON has neither; httpx refuses to
    send them), no lone surrogates, nested at most MAX_EXTRA_BODY_DEPTH deep."""
    if not value:
        return {}

    def no_constant(name: str) -> Any:
        raise UsageError(f"--extra-body holds {name}, which JSON does not allow (no server would accept it)")

    try:
        obj = json.loads(value, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise UsageError(f"--extra-body is not valid JSON ({e.msg} at char {e.pos})") from None
    except ValueError as e:  # a number past int()'s digit limit
        raise UsageError(f"--extra-body is not valid JSON ({e})") from None
    except RecursionError:
        raise UsageError(f"--extra-body is nested more than {MAX_EXTRA_BODY_DEPTH} levels deep") from None
    if not isinstance(obj, dict):
        raise UsageError('--extra-body must be a JSON object, e.g. \'{"cache_salt": "x"}\'')
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
    cache: list[CacheState] = field(default_factory=list)  # [] : load arms only; else an arm per state per concurrency
    params: RequestParams = field(default_factory=RequestParams)
    stream: bool = False
    backoff: float = 0.5
    resume: bool = False
    force: bool = False
    suite: str | None = None
    key_env: str = DEFAULT_KEY_ENV  # where api_key came from, to name it in messages

    @property
    def arms(self) -> list[ArmSpec]:
        return arm_specs(self.concurrency, self.cache)

    def validate(self) -> None:
        """Every argument checked before the network or the disk is touched; secrets registered with the scrubber."""
        scrubber = session_scrubber()
        for secret in [self.api_key, *self.headers.values(), *url_secrets(self.base_url)]:
            scrubber.add(secret)
        if self.repeats < 1:
            raise UsageError(f"-n/--repeats must be >= 1, got {self.repeats}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise UsageError("--concurrency must be >= 1")
        total = self.repeats * max(len(self.prompts), 1) * len(self.arms)
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


# ---------------------------------------------------------------------------- what a run will cost

# Requests from which `detaudit run` prints the plan line before it starts (always with --dry-run).
LARGE_RUN = 1000


def plan_line(req: RunRequest) -> str:
    """What the run will send at most, from its request alone (no network): requests, completion tokens (when every
    prompt has a cap) and, with --rate, the least time it takes. Upper bounds only: answers are often shorter, and
    the time per answer is the endpoint's."""
    arms = len(req.arms)
    requests = len(req.prompts) * req.repeats * arms
    caps = [s.max_tokens or req.params.max_tokens for s in req.prompts]
    shape = (
        f"{len(req.prompts)} prompt{'s' * (len(req.prompts) != 1)} × -n {req.repeats:,} × {arms} arm{'s' * (arms != 1)}"
    )
    line = f"up to {requests:,} requests ({shape})"
    if all(c is not None for c in caps):
        tokens = sum(c or 0 for c in caps) * req.repeats * arms
        line += f", at most {tokens:,} completion tokens"
    else:
        line += ", completion tokens not capped (no --max-tokens: each answer runs to the model's own limit)"
    warm = sum(a.cache == "warm" for a in req.arms)
    if warm:
        line += f", plus {warm * len(req.prompts):,} unrecorded 1-token warm-up requests"
    if req.params.rate:
        line += f", at least {_duration(requests / req.params.rate)} at --rate {req.params.rate:g}/s"
    return line


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------- from options or from a manifest
# The option groups of a run: each field is named like the command-line parameter it comes from
# (detaudit.cli.options.group builds them), and a field's default is what a command without that option means.


@dataclass(frozen=True, kw_only=True)
class PromptOptions:
    """What to ask: --prompt values, then --prompt-file entries, then a --suite's entries."""

    prompt: list[str] = field(default_factory=list)
    prompt_file: Path | None = None
    suite: str | None = None


@dataclass(frozen=True, kw_only=True)
class EndpointOptions:
    """Where requests go and how: URL, credentials, transport. None of it is what a run measures (and credentials
    are never stored), so a resumed run takes these from its command line."""

    base_url: str | None = None  # None: env OPENAI_BASE_URL, else OpenAI's
    api_key_env: str = DEFAULT_KEY_ENV
    header: list[str] = field(default_factory=list)
    stream: bool = False
    backoff: float = 0.5


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """What every request asks and how many there are: a resumed run takes all of it from its manifest (a refused
    --resume names the options given in this order)."""

    repeats: int
    model: str | None = None
    api: str = "chat"
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None
    concurrency: str  # "1,64": one arm per value
    cache: str | None = None  # "cold,warm": an arm per state per concurrency
    rate: float | None = None
    timeout: float = 60.0
    retries: int = 3
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    extra_body: str | None = None  # a JSON object


def request_from_options(
    prompts: PromptOptions, endpoint: EndpointOptions, settings: RunSettings, *, out: Path | None, force: bool
) -> RunRequest:
    """A new run's validated RunRequest (everything but the endpoint itself is checked here)."""
    chosen = load_suite(prompts.suite) if prompts.suite else None
    if settings.api not in ("chat", "completions"):
        raise UsageError(f"--api must be chat or completions, got {settings.api!r}")
    if settings.max_response_bytes < 1:
        raise UsageError(f"--max-response-bytes must be >= 1, got {settings.max_response_bytes}")
    req = RunRequest(
        out=out,
        base_url=base_url_or_default(endpoint.base_url),
        api_key=api_key_from_env(endpoint.api_key_env),
        headers=parse_headers(endpoint.header),
        model=settings.model,
        api=cast(Api, settings.api),  # checked above
        prompts=gather_prompts(prompts.prompt, prompts.prompt_file, chosen.prompts if chosen else None),
        repeats=settings.repeats,
        concurrency=parse_concurrency(settings.concurrency),
        cache=parse_cache(settings.cache),
        params=RequestParams(
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
            stop=list(settings.stop),
            top_logprobs=settings.top_logprobs,
            extra_body=parse_extra_body(settings.extra_body),
            timeout_s=settings.timeout,
            retries=settings.retries,
            rate=settings.rate,
            max_response_bytes=settings.max_response_bytes,
        ),
        stream=endpoint.stream,
        backoff=endpoint.backoff,
        force=force,
        suite=None if chosen is None else chosen.name if chosen.bundled else chosen.source,
        key_env=endpoint.api_key_env,
    )
    req.validate()
    return req


def request_from_manifest(out: Path, endpoint: EndpointOptions) -> tuple[RunRequest, RunManifest]:
    """The request of an unfinished run (interrupted, failed or killed), from its manifest; the endpoint options
    (credentials are never stored) from the command line."""
    api_key, headers = api_key_from_env(endpoint.api_key_env), parse_headers(endpoint.header)
    manifest = load_resumable(out)  # refuse what is not a run to trust before anything is written
    if manifest.target.kind != "endpoint":
        raise UsageError(f"{out} is a local run; resume it with the command that made it")
    recorded = manifest.target.base_url or DEFAULT_BASE_URL
    base_url = endpoint.base_url
    if base_url is not None and redact_url(base_url) != recorded:
        raise UsageError(f"--base-url {redact_url(base_url)} differs from the run's {recorded}")
    if "***" in recorded and base_url is None:
        raise UsageError("the run's --base-url held credentials that were not stored; pass --base-url again")
    missing = [n for n in manifest.target.header_names if n not in headers]
    if missing:
        raise UsageError(f"the run sent header(s) {', '.join(missing)}; pass --header again (values are not stored)")
    req = RunRequest(
        out=out,
        base_url=base_url or recorded,
        api_key=api_key,
        headers=headers,
        model=manifest.target.model,
        api=manifest.target.api,
        prompts=manifest.prompts,
        repeats=manifest.repeats,
        concurrency=list(dict.fromkeys(a.concurrency for a in manifest.arms)),
        cache=list(dict.fromkeys(a.cache for a in manifest.arms if a.cache is not None)),
        params=manifest.params,
        stream=bool(manifest.environment.get("stream", endpoint.stream)),
        backoff=endpoint.backoff,
        resume=True,
        suite=manifest.suite,
        key_env=endpoint.api_key_env,
    )
    return req, manifest
