"""`detaudit rescore RUN`: teacher-forced logprobs of a run's tokens on the local engine vs what was reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from detaudit.cli import options
from detaudit.cli.options import like
from detaudit.cli.progress import loading
from detaudit.termsafe import safe


def rescore_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory to rescore (any target that returned tokens).")],
    model: Annotated[
        str, like(options.ModelDir, help="Model directory, .gguf file, smollm2 or hub id: the model the run sampled.")
    ],
    kernels: Annotated[
        str,
        like(
            options.Kernels,
            help="stock or batch-invariant. Unlike local and serve (stock, as servers run), rescoring defaults to "
            "batch-invariant: the reference the run's reported logprobs are measured against.",
        ),
    ] = "batch-invariant",
    device: options.Device = "cpu",
    dtype: options.Dtype = "bfloat16",
    max_batch: Annotated[int, like(options.MaxBatch, help="Sequences prefilled per engine step.")] = 16,
    max_model_len: Annotated[int, like(options.MaxModelLen, help="Longest prompt + completion to rescore.")] = 4096,
    as_json: Annotated[bool, like(options.Json, help="Print the rescore section as JSON.")] = False,
) -> None:
    from detaudit.analysis.summary import load_run_manifest, store_summary
    from detaudit.audit.rescoring import check_model, rescore_run
    from detaudit.engine.llm import Engine, EngineConfig
    from detaudit.errors import UsageError
    from detaudit.rundir.io import read_samples

    # A bad run directory (manifest, a missing or corrupt samples file, nothing ok) fails before the model loads.
    manifest = load_run_manifest(run_dir)
    if "ok" not in read_samples(run_dir, ["status"]).column("status").to_pylist():
        raise UsageError(f"{run_dir}: no ok sample to rescore")
    # Rescoring only prefills (no decode step), so no CUDA graph would ever be replayed: none is captured.
    config = EngineConfig(
        model,
        device=device,
        dtype=dtype,
        kernels=kernels,
        max_batch=max_batch,
        max_batched_tokens=max(max_model_len, max_batch),
        max_model_len=max_model_len,
        cuda_graphs=False,
        prefix_cache=False,  # scoring never reads the cache (Engine.score): no blocks to name either
    )
    with loading(Console(stderr=True), config.loading_message()):
        engine = Engine(config)
    check = check_model(manifest, model, engine.info())
    if check["status"] != "same":
        # A warning, not an error: a served name cannot be matched to a directory, and rescoring with another
        # model on purpose is legitimate. The section records it either way.
        what = "is not the model that sampled" if check["status"] == "different" else "could not be verified against"
        line = f"--model {model} {what} {run_dir}: {check['reason']}"
        Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(safe(line))}", highlight=False, soft_wrap=True)
    rescore_run(run_dir, engine, check)
    summary = store_summary(run_dir)  # its rescore section is built from the rescore.parquet just written
    section = summary.rescore
    assert section is not None  # rescore_run has just written rescore.parquet
    if as_json:
        typer.echo(json.dumps(section.model_dump(), indent=2))
        return
    table = Table(title=Text(f"rescore of {safe(run_dir)} ({kernels}, {dtype}, {device})"))
    for col in ("rows", "tokens", "equal tokens", "max |Δ|", "mean |Δ|", "KL mean", "first diff min/median"):
        table.add_column(col)

    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.3g}"

    table.add_row(
        f"{section.rows_compared}/{section.rows}",
        str(section.tokens_compared),
        str(section.tokens_equal),
        fmt(section.max_abs_delta),
        fmt(section.mean_abs_delta),
        fmt(section.kl_mean),
        f"{section.first_diff_min if section.first_diff_min is not None else '–'}"
        f"/{section.first_diff_median if section.first_diff_median is not None else '–'}",
    )
    console = Console()
    console.print(table)
    if section.rows_compared and section.max_abs_delta == 0:
        console.print("every reported logprob equals the teacher-forced one, bit for bit")
    console.print(f"wrote {run_dir / 'rescore.parquet'} and the summary's rescore section")
