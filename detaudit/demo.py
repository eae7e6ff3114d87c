"""`detaudit demo`: the whole story offline, on a CPU, in a few minutes.

1. build a tiny random-weight model with an offline tokenizer (detaudit.tiny);
2. serve it on 127.0.0.1 with stock kernels (detaudit's own OpenAI-compatible server, continuous batching);
3. audit that endpoint with a serial arm and a loaded arm (`--concurrency 1,16`): the loaded arm forks;
4. rerun the same prompt on the local engine with the bundled batch-invariant kernels, N copies arriving over
   time so batch sizes vary as on the loaded endpoint (scenario `single`): one completion;
5. write report.html and report.md with both runs side by side.

Each step is a call into the same pipeline the commands use (no subprocesses). A missing part (the `local`
extra, the server) stops the demo with a message saying what to install, before anything is written. Ctrl-C in any
step stops the whole demo (DemoInterrupted); what it wrote stays, marked unfinished, and the next demo in the same
directory replaces it without --force.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detaudit.analysis.summary import store_summary
from detaudit.audit.endpoint import execute_run
from detaudit.audit.request import RunRequest, gather_prompts
from detaudit.errors import EndpointError, UsageError
from detaudit.reports.pipeline import write_reports
from detaudit.rundir.schema import RequestParams

# The load the engine's own tests show forking with stock bf16 kernels on CPU: a code prompt, small prefill chunks
# (so prompts are split into varying batch shapes), 16 sequences per step.
DEMO_PROMPT = "def fibonacci(n):"
DEMO_DTYPE = "bfloat16"
DEMO_MAX_BATCH = 16
DEMO_MAX_BATCHED_TOKENS = 32
SERVED_MODEL = "tiny-qwen3"
ENDPOINT_RUN = "endpoint-stock"
LOCAL_RUN = "local-batch-invariant"
# The loaded endpoint's shape (copies of one prompt, batch sizes varying); `mixed` adds filler prompts and about
# doubles the CPU time, past the demo's budget of a few minutes on two cores.
LOCAL_SCENARIO = "single"
# What `--force` may remove from an existing demo directory: only what the demo itself writes.
_OUTPUTS = ("model", "runs", "report.html", "report.md")
_MARKER = ".detaudit-demo"  # proof that the outputs in a directory are the demo's, not the user's
_STATUS = "status: "  # the marker's line saying whether the demo there finished (running, interrupted, complete)
# What the CLI shows while a step counts: the endpoint audit's bars (execute_run's make_progress), and the local
# rerun's progress callback (arm, done, total) under a context that first shows the given loading message.
LocalProgress = Callable[[str], AbstractContextManager[Callable[[str, int, int], None] | None]]


class DemoInterrupted(Exception):
    """Ctrl-C during a step: the demo stopped there; `kept` is what it had written (left marked unfinished)."""

    def __init__(self, step: str, out: Path, kept: list[str]) -> None:
        super().__init__(step)
        self.step, self.out, self.kept = step, out, kept


@dataclass(frozen=True)
class DemoSettings:
    out: Path = Path("detaudit-demo")
    repeats: int = 48
    max_tokens: int = 32
    concurrency: tuple[int, ...] = (1, 16)
    seed: int = 3
    force: bool = False


@dataclass
class DemoResult:
    """Where everything went, the two headline facts, and how long each step took."""

    out: Path
    endpoint_run: Path
    local_run: Path
    html: Path
    md: Path
    endpoint_verdict: str
    endpoint_unique: dict[str, int]
    local_unique: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def shows_contrast(self) -> bool:
        """The point of the demo: the served stock endpoint is load-dependent, the invariant rerun has 1 completion."""
        return self.endpoint_verdict == "load-dependent" and self.local_unique == 1


def missing_parts() -> list[str]:
    """What this install lacks for the demo, as install hints; empty when everything is there."""
    missing = []
    if any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "safetensors")):
        missing.append('the local engine needs the `local` extra: pip install "detaudit[local]"')
    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("fastapi") is None:
        missing.append('the demo server needs fastapi and uvicorn (the `local` extra): pip install "detaudit[local]"')
    return missing


def _status(out: Path) -> str | None:
    """The marker's status line (None: no marker; "complete" for a marker of a demo older than the status line)."""
    try:
        text = (out / _MARKER).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return next((line[len(_STATUS) :] for line in text.splitlines() if line.startswith(_STATUS)), "complete")


def _mark(out: Path, status: str) -> None:
    (out / _MARKER).write_text(
        f"written by `detaudit demo`; --force may replace model/, runs/ and the reports here\n{_STATUS}{status}\n"
    )


def _prepare(settings: DemoSettings) -> None:
    out = settings.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    present = [name for name in _OUTPUTS if (out / name).exists()]
    status = _status(out)
    unfinished = status in ("running", "interrupted")  # the demo's own leftovers: replaced without --force
    if present and not settings.force and not unfinished:
        raise UsageError(f"{out} already holds a demo ({', '.join(present)}); pass --force to redo it")
    if present and status is None:
        raise UsageError(f"--force refuses to clear {', '.join(present)} in {out}: detaudit demo did not write them")
    for name in present:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _mark(out, "running")


def _engine_config(model_dir: Path, kernels: str) -> Any:
    from detaudit.engine.llm import EngineConfig

    return EngineConfig(
        str(model_dir),
        device="cpu",
        dtype=DEMO_DTYPE,
        kernels=kernels,
        max_batch=DEMO_MAX_BATCH,
        max_batched_tokens=DEMO_MAX_BATCHED_TOKENS,
        # On CPU the stock divergence comes from where a prompt's chunks start (docs/engine.md, Kernels); a prefix
        # cache hands every copy after the first the same cached blocks and removes it. The demo shows batch
        # dependence, so its engines run without one (the cache's own story: `detaudit local --scenario prefix`).
        prefix_cache=False,
    )


@contextmanager
def _serving(model_dir: Path, kernels: str) -> Iterator[str]:
    """`detaudit serve` in this process: the engine's ASGI app under uvicorn in a thread, on a free 127.0.0.1 port."""
    import uvicorn

    from detaudit.engine.llm import Engine
    from detaudit.server import create_app

    app = create_app(Engine(_engine_config(model_dir, kernels)), model_name=SERVED_MODEL)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here and handed to uvicorn: no race for the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="detaudit-demo-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise EndpointError("the demo server on 127.0.0.1 did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _audit_endpoint(settings: DemoSettings, base_url: str, out: Path, make_progress: Callable[[], Any] | None) -> Path:
    req = RunRequest(
        out=out,
        base_url=base_url,
        prompts=gather_prompts([DEMO_PROMPT], None),
        repeats=settings.repeats,
        concurrency=list(settings.concurrency),
        params=RequestParams(max_tokens=settings.max_tokens, seed=settings.seed, top_logprobs=2, timeout_s=120.0),
    )
    outcome = execute_run(req, make_progress)
    if outcome.gone is not None or outcome.failure is not None:
        raise EndpointError(f"the demo's audit of its own server stopped: {outcome.gone or outcome.failure}")
    if outcome.interrupted:  # Ctrl-C reached the run's own handler, which stopped only the audit: stop the demo
        raise KeyboardInterrupt
    store_summary(outcome.run_dir)
    return outcome.run_dir


def _rerun_local(settings: DemoSettings, model_dir: Path, out: Path, local_progress: LocalProgress | None) -> Path:
    from detaudit.audit.local_engine import LocalRunSpec, run_local

    spec = LocalRunSpec(
        engine=_engine_config(model_dir, "batch-invariant"),
        prompts=[DEMO_PROMPT],
        repeats=settings.repeats,
        scenarios=[LOCAL_SCENARIO],
        out=out,
        max_tokens=settings.max_tokens,
        top_logprobs=2,
        seed=settings.seed,
    )
    shown = local_progress(spec.engine.loading_message()) if local_progress is not None else nullcontext()
    with shown as progress:
        run_dir = run_local(spec, progress)
    store_summary(run_dir)
    return run_dir


def run_demo(
    settings: DemoSettings,
    say: Callable[[str], None] = lambda _: None,
    make_progress: Callable[[], Any] | None = None,
    local_progress: LocalProgress | None = None,
) -> DemoResult:
    """Run the five steps; `say` hears one line as each step starts, the progress arguments show the two long ones
    (LocalProgress). Ctrl-C in any step raises DemoInterrupted."""
    missing = missing_parts()
    if missing:
        raise UsageError("detaudit demo cannot run: " + "; ".join(missing))
    _prepare(settings)
    out = settings.out
    timings: dict[str, float] = {}
    current = ["setup"]

    def step(name: str, line: str, fn: Callable[[], Any]) -> Any:
        current[0] = name
        say(line)
        t0 = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        return value

    try:
        from transformers.utils import logging as hf_logging

        from detaudit.tiny import build_tiny_model

        hf_logging.disable_progress_bar()  # save_pretrained's bar would interleave with the step lines
        model_dir = step(
            "model", "building a tiny qwen3 model offline …", lambda: build_tiny_model(out / "model", "qwen3")
        )
        arms = ",".join(str(c) for c in settings.concurrency)
        current[0] = "serve"
        with _serving(model_dir, "stock") as base_url:
            endpoint = step(
                "endpoint",
                f"auditing it served at {base_url} with stock kernels: -n {settings.repeats} --concurrency {arms} …",
                lambda: _audit_endpoint(settings, base_url, out / "runs" / ENDPOINT_RUN, make_progress),
            )
        local = step(
            "local",
            f"rerunning it locally with batch-invariant kernels, batch sizes varying: -n {settings.repeats} …",
            lambda: _rerun_local(settings, model_dir, out / "runs" / LOCAL_RUN, local_progress),
        )
        files = step(
            "report",
            "writing report.html and report.md …",
            lambda: write_reports([endpoint, local], html=out / "report.html", md=out / "report.md"),
        )
    except KeyboardInterrupt:
        _mark(out, "interrupted")
        runs = sorted(f"runs/{p.name}" for p in (out / "runs").glob("*"))
        kept = [name for name in ("model", *runs, "report.html", "report.md") if (out / name).exists()]
        raise DemoInterrupted(current[0], out, kept) from None
    _mark(out, "complete")
    endpoint_cells = [c for c in files.report.prompts[0].cells if c.run.label == ENDPOINT_RUN]
    local_cells = [c for c in files.report.prompts[0].cells if c.run.label == LOCAL_RUN]
    verdicts = dict(files.report.prompts[0].verdicts)
    return DemoResult(
        out=out,
        endpoint_run=endpoint,
        local_run=local,
        html=out / "report.html",
        md=out / "report.md",
        endpoint_verdict=verdicts.get(ENDPOINT_RUN, "inconclusive"),
        endpoint_unique={c.arm: c.unique for c in endpoint_cells},
        local_unique=max((c.unique for c in local_cells), default=0),
        timings=timings,
    )
