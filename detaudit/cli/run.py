"""`detaudit run`: N independent temperature-0 requests per prompt per load arm, recorded to a run directory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from detaudit.analysis.summary import store_summary
from detaudit.analysis.summary_schema import RunSummary
from detaudit.audit.endpoint import RunOutcome, execute_run, planned_bodies
from detaudit.audit.request import (
    DEFAULT_KEY_ENV,
    LARGE_RUN,
    EndpointOptions,
    PromptOptions,
    RunRequest,
    RunSettings,
    plan_line,
    request_from_manifest,
    request_from_options,
)
from detaudit.cli import options
from detaudit.cli.gate import gate_finished_run
from detaudit.cli.options import given_options, group
from detaudit.cli.progress import PlainProgress, bars
from detaudit.cli.render import render_summary
from detaudit.errors import EndpointError, RecordingFailed, UsageError
from detaudit.gate import parse_gate_spec
from detaudit.redact import redact_url
from detaudit.rundir.io import load_manifest
from detaudit.rundir.recorder import check_out_dir
from detaudit.rundir.schema import DEFAULT_MAX_RESPONSE_BYTES, ArmSpec
from detaudit.termsafe import json_text, safe

# Share of failed samples above which the run is reported as unjudgeable (exit 3); the run directory is kept.
MAX_ERROR_SHARE = 0.5


class _ArmColumn(ProgressColumn):
    """The arm's name, as text (never markup, never raw control characters: on --resume it comes from a file)."""

    def render(self, task: Task) -> Text:
        return Text(safe(task.description), style="bold")


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:6.1f} req/s" if task.speed else "     - req/s", style="cyan")


# Up to this many prompts, the progress bar lists each prompt's distinct count; beyond, the largest and how many
# prompts have more than one.
DISTINCT_LISTED = 6


def distinct_text(per_prompt: Sequence[int]) -> str:
    """Distinct completions so far, per prompt (never summed over prompts: a deterministic 3-prompt arm is
    "1/1/1", not "3"): each prompt's count, in prompt order, for up to DISTINCT_LISTED prompts; beyond, the largest
    count and how many prompts diverged ("max 3, 2/40 prompts diverged")."""
    if len(per_prompt) <= DISTINCT_LISTED:
        return "/".join(map(str, per_prompt))
    diverged = sum(n > 1 for n in per_prompt)
    return f"max {max(per_prompt)}, {diverged}/{len(per_prompt)} prompts diverged"


class _DistinctColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"distinct {distinct_text(task.fields['distinct'])}")


def make_progress(console: Console) -> Progress | PlainProgress:
    """One bar per arm: done/total, rate, failed requests and distinct completions so far per prompt
    (distinct_text); plain lines when the console is not a terminal."""
    return bars(
        console,
        _ArmColumn(),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TextColumn("errors {task.fields[errors]}"),
        _DistinctColumn(),
        TimeElapsedColumn(),
        formats={"distinct": distinct_text},
    )


def render_run(outcome: RunOutcome, summary: RunSummary, console: Console) -> None:
    """The analysis module's summary view, then what the reader of this run should know and where it is."""
    render_summary(summary, console)
    for note in outcome.manifest.notes:
        console.print(f"note: {safe(note)}", highlight=False, markup=False)
    console.print(f"run directory: {safe(outcome.run_dir)}", highlight=False, markup=False)


def finish_run(
    outcome: RunOutcome, as_json: bool, console: Console, err_console: Console, resume: str | None = None
) -> RunSummary:
    """Summarize a complete run into summary.json and print it. A run that did not complete prints how far it got
    and the command that finishes it (`resume`, default `detaudit run --resume ...`): interrupted, exit 130;
    stopped by the circuit breaker (the endpoint is gone) or failed (recording failed), exit 3 with one line."""
    resume = resume or outcome.resume_command()
    expected = outcome.manifest.expected_samples
    if outcome.failure is not None:
        raise RecordingFailed(
            f"recording failed, run stopped: {outcome.failure}. {_on_disk(outcome)} of {expected} "
            f"samples are recorded in {outcome.run_dir} (status failed); once the cause is fixed, "
            f"finish with: {resume}"
        )
    if outcome.interrupted and outcome.gone is not None:
        raise EndpointError(
            f"stopped: {outcome.gone}. {_on_disk(outcome)} of {expected} samples are recorded in {outcome.run_dir} "
            f"(status interrupted); once the endpoint answers again, finish with: {resume}"
        )
    if outcome.interrupted:
        msg = (
            f"interrupted: {_on_disk(outcome)} of {expected} samples recorded in {outcome.run_dir}; "
            f"finish with:\n  {resume}"
        )
        # copy-pastable, never wrapped; header names come from the manifest, which is a file
        err_console.print(safe(msg, keep_newlines=True), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130)
    summary = store_summary(outcome.run_dir)
    if as_json:
        typer.echo(json_text(summary.document()))
    else:
        render_run(outcome, summary, console)
    samples = summary.samples
    if samples.expected and samples.errors > MAX_ERROR_SHARE * samples.expected:
        raise EndpointError(
            f"{samples.errors} of {samples.expected} requests failed; see the error column "
            f"of {outcome.run_dir}/samples.parquet; once the endpoint is fixed, resend them with: {resume}"
        )
    return summary


def _on_disk(outcome: RunOutcome) -> int:
    """Rows on disk when they could be counted, else those this session finished."""
    return outcome.rows if outcome.rows is not None else sum(t.done for t in outcome.tallies)


# What a resumed run takes from its manifest: giving one of these with --resume is refused, never ignored. The
# endpoint options (where to send, with which credentials) come from the command line.
_MANIFEST_SETTINGS = (*(f.name for f in fields(PromptOptions)), *(f.name for f in fields(RunSettings)), "force")


def _flag(ctx: typer.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    return max(param.opts, key=len)


def show_dry_run(req: RunRequest, console: Console) -> None:
    """--dry-run: what the run would send, from the command line alone; nothing is contacted or written."""
    lines = [
        "dry run: nothing is sent and nothing is written",
        f"endpoint: {redact_url(req.base_url)} ({req.api} API), model "
        + (req.model or "not given: the run takes the only model GET /models lists"),
        f"API key: {req.key_env} ({'set' if req.api_key else 'not set: no Authorization header'})"
        + (f"; headers: {', '.join(sorted(req.headers))} (values not shown)" if req.headers else ""),
        "arms: " + ", ".join(_arm_plan(a) for a in req.arms) + f"; -n {req.repeats} per prompt per arm",
        f"plan: {plan_line(req)}",
        f"run directory: {req.out or 'runs/<run id>'}",
        "before the first sample, probe requests ask the endpoint which capture fields it returns (logprobs, "
        "top_logprobs, token ids); the bodies below get those added",
    ]
    if req.cache:
        lines.append(
            "cache arms: the probe also asks whether the endpoint reports usage.prompt_tokens_details.cached_tokens "
            "and honours cache_salt or POST /reset_prefix_cache; cold requests then get a cache_salt each, else a "
            'reset before each, else a nonce line before the prompt ("[detaudit nonce <16 hex>]"); warm arms first '
            "send each prompt once with max_tokens 1 (unrecorded)"
        )
    for line in lines:
        console.print(safe(line), highlight=False, markup=False, soft_wrap=True)
    for prompt_id, body in planned_bodies(req):
        console.print(f"request body of prompt {safe(prompt_id)}:", highlight=False, markup=False)
        typer.echo(json_text(body))


def _arm_plan(arm: ArmSpec) -> str:
    load = f"concurrency {arm.concurrency}"
    return f"{arm.name} ({load}, {arm.cache} cache)" if arm.cache else f"{arm.name} ({load})"


def run_command(
    ctx: typer.Context,
    prompt: options.Prompt = [],
    prompt_file: options.PromptFile = None,
    suite: options.Suite = None,
    repeats: options.Repeats = 100,
    base_url: options.BaseUrl = None,
    api_key_env: options.ApiKeyEnv = DEFAULT_KEY_ENV,
    model: options.Model = None,
    api: options.Api = "chat",
    max_tokens: options.MaxTokens = None,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = None,
    seed: options.Seed = None,
    stop: options.Stop = [],
    top_logprobs: options.TopLogprobs = None,
    concurrency: options.Concurrency = "1",
    cache: options.Cache = None,
    rate: options.Rate = None,
    timeout: options.Timeout = 60.0,
    max_response_bytes: options.MaxResponseBytes = DEFAULT_MAX_RESPONSE_BYTES,
    retries: options.Retries = 3,
    backoff: options.Backoff = 0.5,
    extra_body: options.ExtraBody = None,
    header: options.Header = [],
    out: options.Out = None,
    resume: options.Resume = False,
    force: options.Force = False,
    stream: options.Stream = False,
    as_json: options.Json = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print what would be sent (endpoint, model, arms, N, the plan, each prompt's request body) and "
            "exit: contacts nothing, writes nothing.",
        ),
    ] = False,
    gate: Annotated[
        list[str],
        typer.Option(
            "--gate",
            help="Judge the finished run like `detaudit gate` (exit 1 on "
            "failure): RULE=VALUE[,...], e.g. max-unique=1,min-modal-share=0.99; also "
            "min-first-divergence, max-error-rate, baseline=RUN, require-same-modal, "
            "max-unique-increase (repeatable).",
        ),
    ] = [],
) -> None:
    console, err_console = Console(), Console(stderr=True)
    thresholds = parse_gate_spec(gate) if gate else None  # bad rules fail before any request is sent
    if thresholds is not None and thresholds.baseline is not None:
        load_manifest(thresholds.baseline)  # so does a baseline that is not a run
    endpoint = group(EndpointOptions, ctx)
    if resume:
        if dry_run:
            raise UsageError("--dry-run shows a new run; drop --resume (the run in --out is finished as recorded)")
        if out is None:
            raise UsageError("--resume needs --out DIR (the run directory to finish)")
        given = [_flag(ctx, name) for name in _MANIFEST_SETTINGS if name in given_options(ctx)]
        if given:
            raise UsageError(f"--resume takes the run's settings from its manifest; drop {', '.join(given)}")
        req, manifest = request_from_manifest(out, endpoint)
        outcome = execute_run(req, lambda: make_progress(err_console), resumed=manifest)
    else:
        prompts, settings = group(PromptOptions, ctx), group(RunSettings, ctx)
        req = request_from_options(prompts, endpoint, settings, out=out, force=force)
        if dry_run:
            if out is not None:
                check_out_dir(out, force)  # reads only: an --out the run would refuse is refused here too
            show_dry_run(req, console)
            return
        if len(req.prompts) * req.repeats * len(req.arms) >= LARGE_RUN:
            err_console.print(f"plan: {safe(plan_line(req))}", highlight=False, markup=False, soft_wrap=True)
        outcome = execute_run(req, lambda: make_progress(err_console))
    summary = finish_run(outcome, as_json, console, err_console)
    if thresholds is not None:
        gate_finished_run(outcome.run_dir, summary, thresholds)
