"""`detaudit gate RUN [--baseline RUN0] [thresholds]`: pass/fail a model release on its audit, for CI.

Exit 0 pass, 1 a rule failed, 2 usage or input error, 3 too many endpoint errors to judge. One line per rule;
the Markdown verdict also goes to $GITHUB_STEP_SUMMARY when that is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from detaudit.analysis.summary_schema import RunSummary
from detaudit.errors import EXIT_ENDPOINT, EndpointError, GateFailed, UsageError
from detaudit.gate import GateResult, GateThresholds, judge, run_gate
from detaudit.reports.junit import gate_junit
from detaudit.reports.markdown import render_gate_markdown, render_markdown
from detaudit.reports.view_model import build_report
from detaudit.rundir.io import check_output_file, load_manifest, same_output_file, write_output_file
from detaudit.rundir.schema import RunManifest
from detaudit.termsafe import safe


def gate_command(
    run: Annotated[Path, typer.Argument(help="The run directory to judge.")],
    baseline: Annotated[Path | None, typer.Option("--baseline", help="A baseline run of the same prompts.")] = None,
    max_unique: Annotated[
        int | None, typer.Option("--max-unique", help="At most K distinct completions per arm.")
    ] = None,
    min_modal_share: Annotated[
        float | None,
        typer.Option("--min-modal-share", help="The modal completion's share of ok samples is at least R (0-1)."),
    ] = None,
    min_first_divergence: Annotated[
        int | None,
        typer.Option(
            "--min-first-divergence",
            help="No sample diverges from the modal completion before position P, in the run's unit "
            "(tokens; characters for a run compared as text).",
        ),
    ] = None,
    max_error_rate: Annotated[
        float | None,
        typer.Option(
            "--max-error-rate", help="More failed requests than this share (0-1) in an arm: cannot judge (exit 3)."
        ),
    ] = None,
    require_same_modal: Annotated[
        bool,
        typer.Option("--require-same-modal", help="The modal completion equals the baseline's (needs --baseline)."),
    ] = False,
    max_unique_increase: Annotated[
        int | None,
        typer.Option(
            "--max-unique-increase", help="Unique count grows by at most D over the baseline (needs --baseline)."
        ),
    ] = None,
    require_cache_invariant: Annotated[
        bool,
        typer.Option(
            "--require-cache-invariant",
            help="Cold and warm cache arms (`run --cache cold,warm`) give the same completions and logprobs; no "
            "cache arms, or cached_tokens that do not prove the cache states: cannot judge (exit 3).",
        ),
    ] = False,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write the rules as JUnit XML test cases here.")] = None,
    md: Annotated[Path | None, typer.Option("--md", help="Write the Markdown verdict and report here.")] = None,
) -> None:
    """Judge a run against thresholds (and a baseline run); exit code 0/1/2/3 as documented in the README."""
    # Output paths first: a typo must fail before any rule line is printed or either file written.
    for option, path in (("--md", md), ("--junit", junit)):
        if path is not None:
            check_output_file(path, option)
    if md is not None and junit is not None and same_output_file(md, junit):
        raise UsageError(f"--md and --junit name the same file {md}; give two file names")
    thresholds = GateThresholds(
        max_unique=max_unique,
        min_modal_share=min_modal_share,
        min_first_divergence=min_first_divergence,
        max_error_rate=max_error_rate,
        require_same_modal=require_same_modal,
        max_unique_increase=max_unique_increase,
        baseline=baseline,
        require_cache_invariant=require_cache_invariant,
    )
    result, manifest, summary = run_gate(run, thresholds)
    publish_gate(result, run, manifest, summary, junit=junit, md=md)


def gate_finished_run(run_dir: Path, summary: RunSummary, thresholds: GateThresholds) -> None:
    """`detaudit run --gate`: the same gate, on the summary the run just wrote."""
    manifest = load_manifest(run_dir)
    # stderr: stdout may carry the run's --json summary
    console = Console(stderr=True)
    publish_gate(judge(run_dir, manifest, summary, thresholds), run_dir, manifest, summary, console=console)


def publish_gate(
    result: GateResult,
    run: Path,
    manifest: RunManifest,
    summary: RunSummary,
    *,
    junit: Path | None = None,
    md: Path | None = None,
    console: Console | None = None,
) -> None:
    """Print one line per rule, write the Markdown/JUnit outputs, and raise the exit code's error if not passed."""
    console = console or Console()
    styles = {"PASS": "green", "FAIL": "bold red", "CANNOT": "yellow"}
    for line in result.lines():
        style = styles[line.split(" ", 1)[0]]
        console.print(safe(line), style=style, highlight=False, soft_wrap=True, markup=False)
    markdown = (
        render_gate_markdown(result)
        + "\n"
        + render_markdown(build_report([(run, manifest, summary)]), heading="### Audit")
    )
    if md is not None:
        write_output_file(md, markdown.encode())
    if junit is not None:
        write_output_file(junit, gate_junit(result).encode())
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as f:  # GitHub expects appends: steps share the file
            f.write(markdown + "\n")
    failed = sum(1 for r in result.rules if not r.passed)
    rules = f"{len(result.rules)} rule{'' if len(result.rules) == 1 else 's'}"
    if result.exit_code == EXIT_ENDPOINT:
        unjudged = [r.rule for r in result.rules if not r.judged]
        why = "the cache state is not proven" if unjudged == ["require-cache-invariant"] else "too many endpoint errors"
        raise EndpointError(f"gate cannot judge {run}: {why}")
    if failed:
        raise GateFailed(f"gate failed: {failed} of {rules}")
    console.print(f"gate passed: {rules}", style="green", highlight=False, markup=False)
