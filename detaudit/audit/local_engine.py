"""`detaudit local`: rerun prompts on the local engine under server-like load, into a standard run directory."""

from __future__ import annotations

import os
import platform
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from detaudit import __version__
from detaudit.audit.request import MAX_SAMPLES
from detaudit.audit.workload import CONTROL, SCENARIOS, Arrival, build_workload, drive
from detaudit.engine.llm import Engine, EngineConfig
from detaudit.engine.sequence import Sequence
from detaudit.errors import RecordingFailed, UsageError
from detaudit.rundir.recorder import Recorder, RunEnd, Timing, check_out_dir, sample_row
from detaudit.rundir.schema import ArmSpec, PromptSpec, RequestParams, RunManifest, TargetSpec

FLUSH_ROWS = 64  # rows per shard; an arm's last rows are flushed when it ends


@dataclass(frozen=True)
class LocalRunSpec:
    engine: EngineConfig
    prompts: list[str]
    repeats: int
    scenarios: list[str]
    out: Path
    max_tokens: int = 64
    top_logprobs: int = 5
    seed: int = 0
    force: bool = False


def validate(spec: LocalRunSpec) -> None:
    """Every argument error is raised before anything is loaded or written (exit 2)."""
    if not spec.prompts or any(not p.strip() for p in spec.prompts):
        raise UsageError("give at least one non-empty --prompt")
    if spec.repeats < 1:
        raise UsageError("-n must be at least 1")
    total = spec.repeats * len(spec.prompts) * max(len(spec.scenarios), 1)
    if total > MAX_SAMPLES:  # a mistyped -n built its workload until memory ran out
        raise UsageError(f"-n {spec.repeats} makes {total} target requests; a run holds at most {MAX_SAMPLES}")
    if spec.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if spec.max_tokens >= spec.engine.max_model_len:  # else found only after the model loads, with a filler's numbers
        raise UsageError(
            f"--max-tokens {spec.max_tokens} leaves no room for a prompt in --max-model-len {spec.engine.max_model_len}"
        )
    if spec.engine.max_batch < 1:
        raise UsageError("--max-batch must be at least 1")
    if not 0 <= spec.top_logprobs <= 20:
        raise UsageError("--top-logprobs must be between 0 and 20")
    bad = [s for s in spec.scenarios if s not in SCENARIOS]
    if bad or not spec.scenarios:
        raise UsageError(f"unknown scenario {bad[0] if bad else ''!r}; choose from {', '.join(SCENARIOS)}")
    if len(set(spec.scenarios)) != len(spec.scenarios):
        raise UsageError("--scenario lists a scenario twice")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def run_local(spec: LocalRunSpec, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Generate every (prompt, scenario, repeat) target request and write the run directory; returns its path."""
    validate(spec)
    check_out_dir(spec.out, spec.force)  # before the model loads: --force clears it only once it has
    engine = Engine(spec.engine)
    info = engine.info()
    fingerprint = f"detaudit-{spec.engine.kernels}-{spec.engine.dtype}-{spec.engine.device}"
    manifest = RunManifest(
        run_id=f"local-{_now():%Y%m%dT%H%M%S}-{secrets.token_hex(3)}",
        tool_version=__version__,
        created_at=_now(),
        target=TargetSpec(
            kind="local",
            api="chat",
            model=spec.engine.model,
            engine={**info, "scenarios": spec.scenarios, "seed": spec.seed, "system_fingerprint": fingerprint},
        ),
        params=RequestParams(
            max_tokens=spec.max_tokens, temperature=0.0, seed=spec.seed, top_logprobs=spec.top_logprobs or None
        ),
        prompts=[PromptSpec(prompt_id=f"p{i}", prompt=p) for i, p in enumerate(spec.prompts)],
        arms=[ArmSpec(name=s, concurrency=1 if s == CONTROL else spec.engine.max_batch) for s in spec.scenarios],
        repeats=spec.repeats,
        capture="token_ids",
        environment={"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()},
        notes=[
            "Local rerun: target requests interleaved with seeded filler requests; arrivals are counted in "
            "engine steps, so the batch composition of every step is reproducible from (scenario, seed)."
        ],
    )
    recorder = Recorder.create(spec.out, manifest, force=spec.force, flush_rows=FLUSH_ROWS)
    try:
        for arm_pos, scenario in enumerate(spec.scenarios):
            work = build_workload(
                scenario,
                spec.prompts,
                spec.repeats,
                max_tokens=spec.max_tokens,
                max_batch=spec.engine.max_batch,
                seed=spec.seed,
            )
            stats = _run_arm(engine, work, recorder, arm_pos, spec, fingerprint, progress)
            manifest.target.engine.setdefault("arms", {})[scenario] = stats
    except BaseException as e:  # Ctrl-C: interrupted; a failed flush or a bug: failed (a bug's traceback follows)
        end = recorder.abort(e)
        if isinstance(e, RecordingFailed):
            raise _failed(spec, end) from None
        raise
    end = recorder.end()
    if end.failure is not None:
        raise _failed(spec, end)
    return spec.out


def _failed(spec: LocalRunSpec, end: RunEnd) -> RecordingFailed:
    """Exit 3 for a run whose recording failed. The built-in engine's runs are reproducible from (scenario, seed)
    and do not resume: the way on is the same command again with --force."""
    return RecordingFailed(
        f"recording failed, run stopped: {end.failure}. {end.rows} of {end.manifest.expected_samples} samples are "
        f"recorded in {spec.out} (status failed); once the cause is fixed, run the same command again with --force"
    )


def _run_arm(
    engine: Engine,
    work: list[Arrival],
    recorder: Recorder,
    arm_pos: int,
    spec: LocalRunSpec,
    fingerprint: str,
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, Any]:
    """Drive one arm's arrivals through the engine; record each finished target request as a sample row."""
    arm = recorder.manifest.arms[arm_pos]
    n_targets = sum(a.target is not None for a in work)
    done = 0

    def on_target(a: Arrival, seq: Sequence, t0: datetime, latency: float) -> None:
        nonlocal done
        assert a.target is not None  # drive() calls back for target requests only
        prompt_pos, repeat = a.target
        timing = Timing(t0, _now(), latency)
        answer = _answer(engine, seq, recorder.manifest, fingerprint)
        if recorder.add(sample_row(recorder.manifest, prompt_pos, arm_pos, repeat, "ok", timing, **answer)):
            recorder.flush()
        done += 1
        if progress:
            progress(arm.name, done, n_targets)

    if progress:  # the arm has started (the engine is loaded): 0 of N
        progress(arm.name, 0, n_targets)
    stats = drive(
        engine,
        work,
        seed=spec.seed,
        top_logprobs=spec.top_logprobs,
        on_target=on_target,
        max_inflight=1 if arm.name == CONTROL else None,
    )
    recorder.flush()
    return stats


def _answer(engine: Engine, seq: Sequence, manifest: RunManifest, fingerprint: str) -> dict[str, Any]:
    """The answer columns of a finished target request: the engine's tokens, ids, logprobs and alternatives."""
    ids = seq.output_ids
    top = bool(seq.params.top_logprobs)
    return {
        "text": engine.decode(ids),
        "token_ids": ids,
        "tokens": [engine.token_str(t) for t in ids],
        "token_bytes": [engine.token_bytes(t) for t in ids],
        "logprobs": seq.logprobs,
        "top_tokens": [[engine.token_str(t) for t in row] for row in seq.top_ids] if top else None,
        "top_token_ids": seq.top_ids if top else None,
        "top_logprobs": seq.top_logprobs if top else None,
        "finish_reason": seq.finish_reason,
        "model": manifest.target.model,
        "system_fingerprint": fingerprint,
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": len(ids),
        "cached_tokens": seq.cached_tokens,
    }
