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
    dtype: Annotated[str, like(options.Dtype, help="Saved weight dtype: float32, bfloat16 or float16.")] = "float32",
    seed: options.TorchSeed = 0,
) -> None:
    if out_dir.exists() and not out_dir.is_dir():  # else mkdir's bare "Not a directory", as if a parent were wrong
        raise UsageError(f"{out_dir} exists and is not a directory")
    path = build_tiny_model(out_dir, arch, preset=preset, dtype=dtype, seed=seed)
    Console().print(f"wrote {arch} ({preset}, {dtype}) to {path}")
