"""`detaudit tiny-model DIR`: build a random-weight model of a real architecture with an offline tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from detaudit.cli import options
from detaudit.cli.options import like
from detaudit.errors import UsageError
from detaudit.tiny import ARCHS, PRESETS, build_tiny_model


def tiny_model_command(
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (must not exist or be empty).")],
    arch: Annotated[str, typer.Option("--arch", help=f"Architecture: {', '.join(ARCHS)}.")] = "qwen3",
    preset: Annotated[str, typer.Option("--preset", help=f"Shape preset: {', '.join(PRESETS)}.")] = "tiny",
    dtype: Annotated[
        str, like(options.Dtype, help="Saved weight dtype: float32, bfloat16 or float16 (or fp32, bf16, fp16).")
    ] = "float32",
    seed: options.TorchSeed = 0,
    device: Annotated[
        str,
        like(
            options.Device,
            help="Where the random weights are drawn (cpu, cuda): a GPU builds the 8B-shaped preset in seconds. "
            "The weights differ from a CPU build's.",
        ),
    ] = "cpu",
    weights_at_load: Annotated[
        bool,
        typer.Option(
            "--weights-at-load",
            help="Write no weights: the local engine draws seeded random ones on its device as it loads the "
            "directory (seconds for the 61 GB qwen3-30b-a3b preset, which is too big to write). For benchmarks; "
            "transformers cannot load such a directory.",
        ),
    ] = False,
) -> None:
    if out_dir.exists() and not out_dir.is_dir():  # else mkdir's bare "Not a directory", as if a parent were wrong
        raise UsageError(f"{out_dir} exists and is not a directory")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"unsupported device {device!r}; use cpu or cuda")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked but this machine has no CUDA device (torch sees none)")
    path = build_tiny_model(
        out_dir, arch, preset=preset, dtype=dtype, seed=seed, device=device, weights_at_load=weights_at_load
    )
    what = "config and tokenizer (weights drawn at load)" if weights_at_load else f"{arch} ({preset}, {dtype})"
    Console().print(f"wrote {what} to {path}")
