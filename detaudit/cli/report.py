"""`detaudit report RUN [RUN …]`: the runs side by side as self-contained HTML, Markdown and/or JUnit XML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from detaudit.errors import UsageError
from detaudit.reports.pipeline import write_reports
from detaudit.rundir.io import same_output_file
from detaudit.termsafe import safe


def report_command(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Run directories, shown side by side (e.g. endpoint, local stock, local batch-invariant)."),
    ],
    html: Annotated[Path | None, typer.Option("--html", help="Write the self-contained HTML report here.")] = None,
    md: Annotated[
        Path | None, typer.Option("--md", help="Write the Markdown report (step summary / PR comment) here.")
    ] = None,
    junit: Annotated[
        Path | None, typer.Option("--junit", help="Write JUnit XML (one case per prompt and arm) here.")
    ] = None,
) -> None:
    """Without --html/--md/--junit the Markdown report is printed on stdout."""
    named = [(opt, path) for opt, path in (("--html", html), ("--md", md), ("--junit", junit)) if path is not None]
    for i, (opt, path) in enumerate(named):  # else the last one written silently replaces the other
        same = [other for other, p in named[i + 1 :] if same_output_file(p, path)]
        if same:
            raise UsageError(f"{opt} and {same[0]} name the same file {path}; give each report its own file")
    result = write_reports(runs, html=html, md=md, junit=junit)
    err = Console(stderr=True)  # stdout stays the reports' own (`--html /dev/stdout | gzip` gets no status lines)
    for warning in result.report.warnings:
        err.print(f"warning: {safe(warning)}", highlight=False, markup=False, soft_wrap=True)
    if not result.written:
        typer.echo(result.markdown, nl=False)
        return
    for path in result.written:
        err.print(f"wrote {safe(path)}", highlight=False, markup=False)
