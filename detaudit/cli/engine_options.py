"""Options that every command running the bundled engine (`local`, `serve`, `rescore`) declares the same way."""

from __future__ import annotations

import typer

from detaudit.engine.config import DTYPES

DEVICE = typer.Option("cpu", "--device", help="cpu or cuda.")
DTYPE = typer.Option("bfloat16", "--dtype", help=f"{', '.join(DTYPES)}.")
CUDA_GRAPHS = typer.Option(
    True,
    "--cuda-graphs/--no-cuda-graphs",
    help="Replay steps from CUDA graphs (decode-only "
    "whole, prefill piecewise; CUDA only; --no-cuda-graphs runs every step eagerly).",
)
