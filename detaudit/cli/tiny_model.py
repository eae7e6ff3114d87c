"""`detaudit tiny-model DIR`: build a random-weight model of a real architecture with an offline tokenizer."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from detaudit.errors import UsageError
from detaudit.tiny import ARCHS, PRESETS, build_tiny_model


def tiny_model_command(
    out_dir: Path = typer.Argument(..., help="Directory to create (must not exist or be empty)."),
    arch: str = typer.Option("qwen3", "--arch", help=f"Architecture: {', '.join(ARCHS)}."),
    preset: str = typer.Option("tiny", "--preset", help=f"Shape preset: {', '.join(PRESETS)}."),
    dtype: str = typer.Option("float32", "--dtype", help="Saved weight dtype: float32, bfloat16 or float16."),
    seed: int = typer.Option(
        0,
        "--seed",
        min=0,
        max=2**64 - 1,  # torch.manual_seed's range: past it, a ValueError
        help="Seed for the random weights.",
    ),  # fmt: skip
    device: str = typer.Option(
        "cpu",
        "--device",
        help="Where the random weights are drawn (cpu, cuda): a GPU builds "
        "the 8B-shaped preset in seconds. The weights differ from a CPU build's.",
    ),
) -> None:
    if out_dir.exists() and not out_dir.is_dir():  # else mkdir's bare "Not a directory", as if a parent were wrong
        raise UsageError(f"{out_dir} exists and is not a directory")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"unsupported device {device!r}; use cpu or cuda")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked but this machine has no CUDA device (torch sees none)")
    path = build_tiny_model(out_dir, arch, preset=preset, dtype=dtype, seed=seed, device=device)
    Console().print(f"wrote {arch} ({preset}, {dtype}) to {path}")
