"""`detaudit report`'s pipeline: run directories in, report files out (HTML, Markdown, JUnit)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detaudit.reports.html import render_html
from detaudit.reports.junit import report_junit
from detaudit.reports.markdown import render_markdown
from detaudit.reports.view_model import Report, build_report

from detaudit.analysis.summary import summarize_run
from detaudit.analysis.summary_schema import RunSummary
from detaudit.errors import UsageError
from detaudit.rundir.io import load_manifest, write_output_file
from detaudit.rundir.schema import RunManifest


@dataclass
class ReportFiles:
    report: Report
    markdown: str
    written: list[Path]


def load_runs(run_dirs: Sequence[Path]) -> list[tuple[Path, RunManifest, RunSummary]]:
    """Manifest and fresh summary of each run; a bad run directory raises RunDirError (exit 2)."""
    if not run_dirs:
        raise UsageError("give at least one run directory")
    return [(Path(d), load_manifest(Path(d)), summarize_run(Path(d))) for d in run_dirs]


def _write(path: Path, text: str) -> Path:
    return write_output_file(path, text.encode("utf-8"))


def write_reports(
    run_dirs: Sequence[Path], *, html: Path | None = None, md: Path | None = None, junit: Path | None = None
) -> ReportFiles:
    """Render the runs side by side into each requested file; the Markdown is always returned for printing."""
    report = build_report(load_runs(run_dirs))
    markdown = render_markdown(report)
    written = []
    if html is not None:
        written.append(_write(html, render_html(report)))
    if md is not None:
        written.append(_write(md, markdown))
    if junit is not None:
        written.append(_write(junit, report_junit(report)))
    return ReportFiles(report=report, markdown=markdown, written=written)
