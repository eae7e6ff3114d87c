"""The audit run pipeline: endpoint -> N requests per prompt per load arm -> run directory.

Arms run one after another (a concurrency-1 arm is the serial control), each with at most `concurrency` requests in
flight and an optional requests/s cap. Finished rows are flushed as Parquet shards about once a second, so a kill
loses at most the last second of answers, and `--resume` sends only the sample indices that are missing (or that
failed). Every sample index ends as exactly one row: ok, or error with its reason.

Order of work, so that bad input writes nothing: validate arguments and prompts, check `--out`, reach the endpoint
(models, auth, probe), and only then create the run directory.

Over 400 lines, for a reason: this is the endpoint target's one pipeline in that order (model, request bodies,
workers and their rate cap, what a resume still has to send, the run's start and end around its Recorder); the
run directory's side of it already lives in rundir/recorder.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import platform
import shlex
import signal
import sys
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
from detaudit.audit.cache_arms import cold_body, warm_salt, warmup_body
from detaudit.audit.capabilities import logprob_fields, probe_api, probe_cache, stream_fields
from detaudit.audit.client import CallError, CallResult, OpenAIClient
from detaudit.audit.request import RunRequest
from detaudit.errors import UsageError
from detaudit.redact import redact_url, session_scrubber
from detaudit.rundir.io import has_samples, read_samples
from detaudit.rundir.recorder import Recorder, Timing, check_out_dir, sample_row
from detaudit.rundir.schema import PromptSpec, RunManifest, TargetSpec

DEFAULT_TOP_LOGPROBS = 2  # top-1 vs top-2 margin at each fork; --top-logprobs 0 turns alternatives off
FLUSH_INTERVAL_S = 1.0
FLUSH_ROWS = 2000
# The circuit breaker: this many requests in a row (at least; an arm's concurrency when larger, since a loaded arm's
# requests in flight fail together) that could not reach the endpoint, each after its retries, and no answer of any
# kind in between: the endpoint is gone, and every remaining sample would only wait out its retries (an hour for
# -n 1000 -c 1). The run stops as interrupted, and --resume finishes it once the endpoint is back.
DEAD_AFTER = 4
DEAD_REASONS = frozenset({"connect", "broken"})  # refused, reset or cut off: no HTTP answer at all


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
    prompts: int = 1
    # prompt position -> hashes of the distinct completions seen: distinct counts are per prompt (a deterministic
    # 3-prompt arm has 1 completion for each, not 3)
    keys: dict[int, set[int]] = field(default_factory=dict)

    def add_key(self, prompt_pos: int, key: int) -> None:
        self.keys.setdefault(prompt_pos, set()).add(key)

    def distinct(self) -> list[int]:
        """Distinct completions so far of each prompt, in the run's prompt order."""
        return [len(self.keys.get(pos, ())) for pos in range(self.prompts)]


@dataclass
class RunOutcome:
    """How a run ended: its manifest (status complete, interrupted or failed) and, when failed, why."""

    run_dir: Path
    manifest: RunManifest
    interrupted: bool = False
    tallies: list[ArmTally] = field(default_factory=list)
    failure: str | None = None
    rows: int | None = None  # sample rows on disk
    gone: str | None = None  # why the circuit breaker stopped the run (the endpoint stopped answering)

    def resume_command(self) -> str:
        cmd = f"detaudit run --resume --out {shlex.quote(str(self.run_dir))}"
        if self.manifest.target.header_names:
            cmd += " " + " ".join(f"--header '{n}: …'" for n in self.manifest.target.header_names)
        return cmd


# ---------------------------------------------------------------------------- the pipeline


def _endpoint_usage_error(what: str, err: CallError | str) -> UsageError:
    return UsageError(f"{what}: {err}")


def v1_hint(base_url: str, error: CallError | str | None) -> str:
    """ " (did you mean …/v1?)" after a 404 from a base URL whose path does not end in /v1, where OpenAI-compatible
    servers (OpenAI, vLLM, SGLang, Ollama, llama.cpp) serve their API; else nothing."""
    status = error.status if isinstance(error, CallError) else None
    if status != 404 and not (isinstance(error, str) and error.startswith("HTTP 404")):
        return ""
    if urlsplit(base_url).path.rstrip("/").endswith("/v1"):
        return ""
    return f" (did you mean {redact_url(base_url).rstrip('/')}/v1?)"


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
            raise UsageError(
                f"--model is required: {redact_url(base_url)}/models answered {e}{v1_hint(base_url, e)}"
            ) from None
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
    if req.stream:
        body.update(stream_fields(manifest.target.api))
    return body


def planned_bodies(req: RunRequest) -> list[tuple[str, dict[str, Any]]]:
    """(prompt id, request body) for each prompt as the run would send it, less the capture fields the capability
    probe adds (logprobs, top_logprobs, token ids), which only the endpoint can say: what --dry-run shows."""
    manifest = _new_manifest(req, req.model or "<the only model GET /models lists>", {})
    stream = {"stream": True} if req.stream else {}  # the client adds it to each streamed request
    return [(s.prompt_id, {**_base_body(req, manifest, s), **stream}) for s in manifest.prompts]


def _row(manifest: RunManifest, prompt_pos: int, arm_pos: int, repeat: int, res: CallResult) -> dict[str, Any]:
    timing = Timing(res.started_at, res.finished_at, res.latency_s, res.attempts)
    if res.completion is None:
        return sample_row(
            manifest,
            prompt_pos,
            arm_pos,
            repeat,
            "error",
            timing,
            error=res.error,
            error_reason=res.error_reason,
            raw_answer=res.raw_answer,
        )
    return sample_row(manifest, prompt_pos, arm_pos, repeat, "ok", timing, **res.completion.columns())


class _Runner:
    """The sending side of one executing run: the stop flag, the arm in flight, the rate limit, the live counts.
    What it receives goes to the run's Recorder."""

    def __init__(self, req: RunRequest, progress: Any) -> None:
        self.req, self.progress = req, progress
        self.stop = asyncio.Event()
        self.current: list[asyncio.Task[Any]] = []  # the arm running now, cancelled by halt()
        self._next_slot = 0.0
        self.capture_seen: Counter[str] = Counter()
        self.without_usage = 0  # ok answers that reported no usage.completion_tokens
        self.unreachable = 0  # requests in a row that got no HTTP answer (DEAD_REASONS)
        self.gone: str | None = None
        self.warmup_failures: list[str] = []  # "prompt@arm: why" of each failed warm-up request

    def halt(self) -> None:
        """Stop sending and cancel the requests in flight (Ctrl-C, SIGTERM, or a failed shard write)."""
        self.stop.set()
        for t in self.current:
            t.cancel()

    async def _rate_wait(self, rate: float | None) -> None:
        if not rate:
            return
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / rate
        if slot > now:
            await asyncio.sleep(slot - now)

    async def run_arm(
        self,
        client: OpenAIClient,
        recorder: Recorder,
        arm_pos: int,
        todo: list[tuple[int, int]],
        tally: ArmTally,
        task_id: Any,
    ) -> None:
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)
        manifest = recorder.manifest
        arm = manifest.arms[arm_pos]
        bodies = [_base_body(self.req, manifest, s) for s in manifest.prompts]
        method = manifest.probe.get("cache", {}).get("cold", "nonce")
        if arm.cache == "warm":
            if method == "cache_salt":
                bodies = [{**b, "cache_salt": warm_salt(manifest.run_id)} for b in bodies]
            await self._warm_up(client, manifest, arm.name, bodies, sorted({p for p, _ in todo}))

        def body_of(prompt_pos: int, repeat: int) -> dict[str, Any]:
            if arm.cache != "cold":
                return bodies[prompt_pos]
            index = manifest.sample_index(prompt_pos, arm_pos, repeat)
            return cold_body(bodies[prompt_pos], manifest.target.api, manifest.run_id, index, method)

        async def worker(slot: int) -> None:
            while not self.stop.is_set():
                try:
                    prompt_pos, repeat = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self._rate_wait(manifest.params.rate)
                body = body_of(prompt_pos, repeat)
                if arm.cache == "cold" and method == "reset":
                    await client.reset_prefix_cache()
                res = await client.call(manifest.target.api, body, stream=self.req.stream, slot=slot)
                row = _row(manifest, prompt_pos, arm_pos, repeat, res)
                if recorder.add(row):
                    await recorder.flush_async()
                self._count(row, prompt_pos, tally, task_id)
                self._watch(res, manifest.arms[arm_pos].concurrency)

        workers = [
            asyncio.create_task(worker(slot)) for slot in range(min(manifest.arms[arm_pos].concurrency, len(todo)))
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _warm_up(
        self, client: OpenAIClient, manifest: RunManifest, arm: str, bodies: list[dict[str, Any]], prompts: list[int]
    ) -> None:
        """A warm arm's unrecorded warm-up: each prompt it still has to send, once, with max_tokens 1. A failed
        warm-up is noted (the arm's cached_tokens then show whether the cache got warm anyway)."""
        for prompt_pos in prompts:
            if self.stop.is_set():
                return
            res = await client.call(manifest.target.api, warmup_body(bodies[prompt_pos]))
            if res.completion is None:
                pid = manifest.prompts[prompt_pos].prompt_id
                self.warmup_failures.append(f"{pid}@{arm}: {res.error}")

    def _watch(self, res: CallResult, concurrency: int) -> None:
        """The circuit breaker (DEAD_AFTER): any HTTP answer, even an error status, shows the endpoint is there."""
        if res.completion is not None or res.error_reason not in DEAD_REASONS:
            self.unreachable = 0
            return
        self.unreachable += 1
        if self.unreachable >= max(DEAD_AFTER, concurrency) and self.gone is None:
            self.gone = f"the endpoint stopped answering ({self.unreachable} requests in a row failed: {res.error})"
            self.halt()

    def _count(self, row: Mapping[str, Any], prompt_pos: int, tally: ArmTally, task_id: Any) -> None:
        tally.done += 1
        if row["status"] == "ok":
            tally.ok += 1
            tally.add_key(prompt_pos, _key_hash(row))
            self.capture_seen[_row_capture(row)] += 1
            self.without_usage += row.get("completion_tokens") is None
        else:
            tally.errors += 1
        if self.progress is not None:
            self.progress.update(task_id, advance=1, errors=tally.errors, distinct=tally.distinct())


def _row_capture(row: Mapping[str, Any]) -> str:
    if row.get("token_ids") is not None:
        return "token_ids"
    if row.get("tokens") is not None or row.get("token_bytes") is not None:
        return "tokens"
    return "text"


_KEY_COLUMNS = ["sample_index", "status", "prompt_id", "token_ids", "token_bytes", "tokens", "text"]


def _recorded(run_dir: Path) -> dict[int, int | None]:
    """sample_index -> hash of its completion key for ok rows (None for failed rows) already on disk."""
    if not has_samples(run_dir):
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


def _todo(
    manifest: RunManifest, recorded: dict[int, int | None], arm_pos: int, tally: ArmTally
) -> list[tuple[int, int]]:
    """(prompt_pos, repeat) pairs of this arm still to send: never sent, or failed last time."""
    todo = []
    for prompt_pos in range(len(manifest.prompts)):
        for repeat in range(manifest.repeats):
            key = recorded.get(manifest.sample_index(prompt_pos, arm_pos, repeat))
            if key is not None:
                tally.done += 1
                tally.ok += 1
                tally.add_key(prompt_pos, key)
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
    if req.cache and "cold" in req.cache:
        notes.append(_cold_note(probe.get("cache", {})))
    return RunManifest(
        run_id=uuid.uuid4().hex[:12],
        tool_version=__version__,
        created_at=datetime.now(timezone.utc),
        target=TargetSpec(
            kind="endpoint",
            base_url=redact_url(req.base_url),
            api=req.api,
            model=model,
            header_names=sorted(req.headers),
        ),
        params=params,
        prompts=req.prompts,
        arms=req.arms,
        repeats=req.repeats,
        capture=capture,
        probe=probe,
        environment={
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "stream": req.stream,
        },
        suite=req.suite,
        notes=notes,
    )


def _cold_note(cache_probe: Mapping[str, Any]) -> str:
    """How the cold arms were made cold, and what that means for comparing them with the warm ones."""
    if cache_probe.get("cold") == "cache_salt":
        return "cold arms: every request carried its own cache_salt (the probe saw the endpoint honour it)."
    if cache_probe.get("cold") == "reset":
        return "cold arms: POST /reset_prefix_cache emptied the endpoint's prefix cache before every request."
    return (
        "cold arms: every request's prompt began with its own nonce line (the endpoint did not show that it honours "
        "cache_salt), so the model read a slightly different prompt in cold arms than in warm ones"
    )


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
        raise UsageError(
            f"--concurrency {connections} needs about {want} open files but the limit is {hard}; "
            f"lower --concurrency or raise the limit (ulimit -n)"
        )


async def _execute(req: RunRequest, make_progress: Callable[[], Any] | None, resumed: RunManifest | None) -> RunOutcome:
    scrubber = session_scrubber()  # knows the environment's secrets too: error rows are scrubbed of them
    max_conn = max(req.concurrency) + 4
    async with OpenAIClient(
        req.base_url,
        api_key=req.api_key,
        headers=req.headers,
        timeout=req.params.timeout_s,
        retries=req.params.retries,
        backoff=req.backoff,
        max_connections=max_conn,
        max_response_bytes=req.params.max_response_bytes,
        scrubber=scrubber,
    ) as client:
        model, models = await resolve_model(client, req.model, req.base_url)
        if resumed is None:
            probe = await probe_api(client, req.api, model, req.params.extra_body)
            if not probe["ok"]:
                raise UsageError(
                    f"{req.api} API of {redact_url(req.base_url)} does not answer: {probe['error']}"
                    + v1_hint(req.base_url, probe["error"])
                )
            probe["models"] = models
            if req.cache:
                probe["cache"] = await probe_cache(client, req.api, model, req.params.extra_body)
            manifest = _new_manifest(req, model, probe)
            run_dir = req.out or Path("runs") / manifest.run_id
        else:
            manifest, run_dir = resumed, req.out or Path(".")
        progress = make_progress() if make_progress is not None else None
        runner = _Runner(req, progress)
        # Ctrl-C from the first byte written on is the runner's: a KeyboardInterrupt in between left a run directory
        # that still said `started`.
        restore_signals = _halt_on_signals(runner.halt)
        try:
            if resumed is None:
                recorder = Recorder.create(run_dir, manifest, force=req.force, flush_rows=FLUSH_ROWS)
            else:
                recorder = Recorder.resume(run_dir, manifest, flush_rows=FLUSH_ROWS)
        except BaseException:
            restore_signals()
            raise
        recorder.on_failure = runner.halt
        n_prompts = len(manifest.prompts)
        tallies = [
            ArmTally(a.name, a.concurrency, n_prompts * manifest.repeats, prompts=n_prompts) for a in manifest.arms
        ]
        flusher = asyncio.create_task(recorder.flush_every(FLUSH_INTERVAL_S))
        try:
            try:
                if progress is not None:
                    progress.start()
                stopped = await _run_arms(runner, recorder, client, tallies)
            finally:
                restore_signals()
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
                await recorder.drain()
                if progress is not None:
                    progress.stop()
        except Exception as e:  # a bug: the manifest still says so (failed), then the traceback path takes over
            recorder.abort(e)
            raise
        if not stopped:
            recorder.manifest = _final_capture(recorder.manifest, runner.capture_seen)
            recorder.manifest = _usage_note(recorder.manifest, runner.without_usage, runner.capture_seen.total())
        if runner.warmup_failures:
            note = f"warm-up request failed ({len(runner.warmup_failures)}): " + "; ".join(runner.warmup_failures[:3])
            recorder.manifest = recorder.manifest.model_copy(update={"notes": [*recorder.manifest.notes, note]})
        end = recorder.end(interrupted=stopped)
        return RunOutcome(
            run_dir,
            end.manifest,
            interrupted=end.manifest.status == "interrupted",
            tallies=tallies,
            failure=end.failure,
            rows=end.rows,
            gone=runner.gone,
        )


def _halt_on_signals(halt: Callable[[], None]) -> Callable[[], None]:
    """Ctrl-C and SIGTERM call `halt` (a loop callback, run at the next await) instead of raising wherever they
    land; returns what puts the previous handling back."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, halt)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass

    def restore() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return restore


async def _run_arms(runner: _Runner, recorder: Recorder, client: OpenAIClient, tallies: list[ArmTally]) -> bool:
    """Send every sample still missing, arm after arm; returns whether the run was stopped before the end."""
    manifest, progress = recorder.manifest, runner.progress
    recorded = _recorded(recorder.run_dir)
    for arm_pos, arm in enumerate(manifest.arms):
        tally = tallies[arm_pos]
        todo = _todo(manifest, recorded, arm_pos, tally)
        task_id = None
        if progress is not None:
            task_id = progress.add_task(
                f"arm {arm.name}",
                total=tally.total,
                completed=tally.done,
                errors=tally.errors,
                distinct=tally.distinct(),
            )
        if not todo:
            continue
        task = asyncio.create_task(runner.run_arm(client, recorder, arm_pos, todo, tally, task_id))
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
    note = (
        f"capture dropped from {manifest.capture} to {lowest} on {seen[lowest]} of {sum(seen.values())} answers "
        f"this session: compare completions as {'text' if lowest == 'text' else 'tokens'}"
    )
    return manifest.model_copy(update={"capture": lowest, "notes": [*manifest.notes, note]})


def _usage_note(manifest: RunManifest, without: int, ok: int) -> RunManifest:
    """Answers without usage cannot have their token count checked against the server's own: say so."""
    if not without:
        return manifest
    streamed = "streamed " if manifest.environment.get("stream") else ""
    note = (
        f"{without} of {ok} {streamed}answers this session reported no usage (usage.completion_tokens): their "
        "token counts cannot be checked against the server's"
    )
    return manifest.model_copy(update={"notes": [*manifest.notes, note]})


def execute_run(
    req: RunRequest, make_progress: Callable[[], Any] | None = None, resumed: RunManifest | None = None
) -> RunOutcome:
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
