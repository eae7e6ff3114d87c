"""`detaudit analyze RUN` and `detaudit compare A B`: the divergence analysis of run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from detaudit.analysis.compare import compare_runs
from detaudit.analysis.summary import summarize_run
from detaudit.cli.render import render_compare, render_summary
from detaudit.rundir.io import write_summary
from detaudit.termsafe import json_text, safe


def _print_json(doc: dict[str, Any]) -> None:
    typer.echo(json_text(doc))


def analyze_command(
    run_dir: Path = typer.Argument(..., help="A run directory written by `detaudit run`."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (detaudit.summary/1) as JSON."),
) -> None:
    summary = summarize_run(run_dir)
    try:
        write_summary(run_dir, summary)
    except OSError as e:  # a read-only copy of a run is still worth analysing
        Console(stderr=True).print(
            f"warning: could not write {safe(run_dir)}/summary.json ({e.strerror})", highlight=False, markup=False
        )
    if as_json:
        _print_json(summary.document())
    else:
        render_summary(summary, Console())


def compare_command(
    run_a: Path = typer.Argument(..., help="The baseline run directory."),
    run_b: Path = typer.Argument(..., help="The run directory to compare with it."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison (detaudit.compare/1) as JSON."),
) -> None:
    result = compare_runs(run_a, run_b)
    if as_json:
        _print_json(result)
    else:
        render_compare(result, Console())
