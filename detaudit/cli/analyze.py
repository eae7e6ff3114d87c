"""`detaudit analyze RUN` and `detaudit compare A B`: the divergence analysis of run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from detaudit.analysis.compare import compare_runs
from detaudit.analysis.summary import store_summary
from detaudit.cli import options
from detaudit.cli.options import like
from detaudit.cli.render import render_compare, render_summary
from detaudit.errors import UsageError
from detaudit.termsafe import json_text, safe


def _print_json(doc: dict[str, Any]) -> None:
    typer.echo(json_text(doc))


def analyze_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `detaudit run`.")],
    as_json: Annotated[bool, like(options.Json, help="Print the summary (detaudit.summary/1) as JSON.")] = False,
) -> None:

    def unwritable(e: OSError) -> None:  # a read-only copy of a run is still worth analysing
        Console(stderr=True).print(
            f"warning: could not write {safe(run_dir)}/summary.json ({e.strerror})", highlight=False, markup=False
        )

    summary = store_summary(run_dir, unwritable)
    if as_json:
        _print_json(summary.document())
    else:
        render_summary(summary, Console())


def compare_command(
    run_a: Annotated[Path, typer.Argument(help="The baseline run directory.")],
    run_b: Annotated[Path, typer.Argument(help="The run directory to compare with it.")],
    as_json: Annotated[bool, like(options.Json, help="Print the comparison (detaudit.compare/1) as JSON.")] = False,
    allow_different: Annotated[
        bool,
        typer.Option(
            "--allow-different",
            help="Exit 0 even when the runs used different models or APIs (otherwise exit 2 after the comparison).",
        ),
    ] = False,
) -> None:
    result = compare_runs(run_a, run_b)
    if as_json:
        _print_json(result)
    else:
        render_compare(result, Console())
    differ = [
        f"{what} ({safe(result['a'][key])} vs {safe(result['b'][key])})"
        for what, key, same in (("models", "model", "same_model"), ("APIs", "api", "same_api"))
        if not result[same]
    ]
    if differ and not allow_different:
        # Not a nondeterminism finding: two models, or chat against completions, answer differently anyway.
        raise UsageError(
            f"the runs differ in {' and '.join(differ)}; their answers are not comparable as one setup "
            "(pass --allow-different to compare them anyway)"
        )
