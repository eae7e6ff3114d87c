"""`detaudit probe kernels`: is each op batch-invariant here, for stock torch and for our kernels?"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from detaudit.cli import options
from detaudit.cli.options import like
from detaudit.engine.config import DTYPES
from detaudit.errors import UsageError


def kernels_command(
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    quick: Annotated[bool, typer.Option("--quick", help="Fewer batch sizes (smoke test).")] = False,
    seed: Annotated[int, like(options.TorchSeed, help="Seed for inputs, offsets and probed rows.")] = 0,
    as_json: Annotated[bool, like(options.Json, help="Print the rows as JSON.")] = False,
) -> None:
    """Sweep every op over batch sizes that cross kernel-heuristic boundaries; report invariance per op."""
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (or bf16, fp16, fp32), got {dtype!r}")
    try:
        import torch
    except ImportError as e:
        raise UsageError("probe kernels needs torch: pip install 'detaudit[local]'") from e
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch")
    from detaudit.probes.kernel_probes import default_config, run_sweep

    cfg = default_config(device, quick=quick)
    rows = run_sweep(device, getattr(torch, dtype), cfg=cfg, seed=seed)
    if as_json:
        typer.echo(
            json.dumps(
                {"device": device, "dtype": dtype, "sizes": list(cfg.sizes), "rows": [r.to_dict() for r in rows]},
                indent=2,
            )
        )
        return
    table = Table(
        title=escape(
            f"batch invariance on {device} / {dtype}: op(x)[rows] == op(x[rows]) over "
            f"{len(cfg.sizes)} batch sizes {min(cfg.sizes)}…{max(cfg.sizes)}"
        )
    )
    for col in ("op", "impl", "invariant", "max abs diff", "worst batch", "rows checked"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.op,
            r.impl,
            "[green]yes[/]" if r.invariant else "[red]NO[/]",
            f"{r.max_abs_diff:.3g}",
            "" if r.worst_batch is None else str(r.worst_batch),
            str(r.checked),
        )
    console = Console()
    console.print(table)
    for impl in ("stock", "ours"):
        bad = [r.op for r in rows if r.impl == impl and not r.invariant]
        console.print(
            f"{impl}: " + (f"{len(bad)} op(s) NOT invariant: {', '.join(bad)}" if bad else "every op invariant"),
            highlight=False,
            markup=False,
        )
