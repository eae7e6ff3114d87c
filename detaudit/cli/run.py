"""`detaudit run`: N independent temperature-0 requests per prompt per load arm, recorded to a run directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from detaudit.analysis.summary import summarize_run
from detaudit.analysis.summary_schema import RunSummary
from detaudit.audit.endpoint import RunOutcome, execute_run
from detaudit.audit.request import (
    DEFAULT_KEY_ENV,
    RunRequest,
    api_key_from_env,
    base_url_or_default,
    gather_prompts,
    parse_concurrency,
    parse_extra_body,
    parse_headers,
    request_from_manifest,
)
from detaudit.cli.gate import gate_finished_run
from detaudit.cli.options import given_options
from detaudit.cli.render import render_summary
from detaudit.errors import EndpointError, RecordingFailed, UsageError
from detaudit.gate import parse_gate_spec
from detaudit.probes.suites import load_suite
from detaudit.rundir.io import load_manifest, write_summary
from detaudit.rundir.schema import DEFAULT_MAX_RESPONSE_BYTES, PromptSpec, RequestParams
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


def make_progress(console: Console) -> Progress:
    """One bar per arm: done/total, rate, failed requests and distinct completions so far."""
    return Progress(
        _ArmColumn(), BarColumn(), MofNCompleteColumn(), _RateColumn(),
        TextColumn("errors {task.fields[errors]}"), TextColumn("distinct {task.fields[distinct]}"),
        TimeElapsedColumn(), console=console, transient=False, refresh_per_second=4,
    )  # fmt: skip


def build_request(
    *, prompts: list[str], prompt_file: Path | None, extra_prompts: list[PromptSpec] | None, repeats: int,
    base_url: str | None, api_key_env: str, model: str | None, api: str, max_tokens: int | None,
    temperature: float, top_p: float | None, seed: int | None, stop: list[str], top_logprobs: int | None,
    concurrency: str, rate: float | None, timeout: float, retries: int, backoff: float, extra_body: str | None,
    headers: list[str], out: Path | None, stream: bool, force: bool, suite: str | None,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> RunRequest:  # fmt: skip
    """Turn the command line into a validated RunRequest (everything but the endpoint is checked here)."""
    if api not in ("chat", "completions"):
        raise UsageError(f"--api must be chat or completions, got {api!r}")
    if max_response_bytes < 1:
        raise UsageError(f"--max-response-bytes must be >= 1, got {max_response_bytes}")
    req = RunRequest(
        out=out,
        base_url=base_url_or_default(base_url),
        api_key=api_key_from_env(api_key_env),
        headers=parse_headers(headers),
        model=model,
        api=api,  # type: ignore[arg-type]
        prompts=gather_prompts(prompts, prompt_file, extra_prompts),
        repeats=repeats,
        concurrency=parse_concurrency(concurrency),
        params=RequestParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
            top_logprobs=top_logprobs,
            extra_body=parse_extra_body(extra_body),
            timeout_s=timeout,
            retries=retries,
            rate=rate,
            max_response_bytes=max_response_bytes,
        ),  # fmt: skip
        stream=stream,
        backoff=backoff,
        force=force,
        suite=suite,
        key_env=api_key_env,
    )
    req.validate()
    return req


def render_run(outcome: RunOutcome, summary: RunSummary, console: Console) -> None:
    """The analysis module's summary view, then what the reader of this run should know and where it is."""
    render_summary(summary, console)
    for note in outcome.manifest.notes:
        console.print(f"note: {safe(note)}", highlight=False, markup=False)
    console.print(f"run directory: {safe(outcome.run_dir)}", highlight=False, markup=False)


def finish_run(outcome: RunOutcome, as_json: bool, console: Console, err_console: Console,
               resume: str | None = None) -> RunSummary:  # fmt: skip
    """Summarize a complete run into summary.json and print it. A run that did not complete prints how far it got
    and the command that finishes it (`resume`, default `detaudit run --resume ...`): interrupted, exit 130;
    failed (recording failed), exit 3 with one line."""
    resume = resume or outcome.resume_command()
    expected = outcome.manifest.expected_samples
    if outcome.failure is not None:
        raise RecordingFailed(f"recording failed, run stopped: {outcome.failure}. {_on_disk(outcome)} of {expected} "
                              f"samples are recorded in {outcome.run_dir} (status failed); once the cause is fixed, "
                              f"finish with: {resume}")  # fmt: skip
    if outcome.interrupted:
        msg = (f"interrupted: {_on_disk(outcome)} of {expected} samples recorded in {outcome.run_dir}; "
               f"finish with:\n  {resume}")  # fmt: skip
        # copy-pastable, never wrapped; header names come from the manifest, which is a file
        err_console.print(safe(msg, keep_newlines=True), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130)
    summary = summarize_run(outcome.run_dir)
    write_summary(outcome.run_dir, summary)
    if as_json:
        typer.echo(json_text(summary.document()))
    else:
        render_run(outcome, summary, console)
    samples = summary.samples
    if samples.expected and samples.errors > MAX_ERROR_SHARE * samples.expected:
        raise EndpointError(f"{samples.errors} of {samples.expected} requests failed; see the error column "
                            f"of {outcome.run_dir}/samples.parquet")  # fmt: skip
    return summary


def _on_disk(outcome: RunOutcome) -> int:
    """Rows on disk when they could be counted, else those this session finished."""
    return outcome.rows if outcome.rows is not None else sum(t.done for t in outcome.tallies)


# What a resumed run takes from its manifest: giving one of these with --resume is refused, never ignored.
_MANIFEST_SETTINGS = ("prompt", "prompt_file", "suite", "repeats", "model", "api", "max_tokens", "temperature",
                      "top_p", "seed", "stop", "top_logprobs", "concurrency", "rate", "timeout", "retries",
                      "max_response_bytes", "extra_body", "force")  # fmt: skip


def _flag(ctx: typer.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    return max(param.opts, key=len)


def run_command(
    ctx: typer.Context,
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text (repeatable)."),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", help='Plain-text prompt, or JSONL of {"prompt": ...} / {"messages": [...]} objects.'
    ),  # fmt: skip
    suite: str | None = typer.Option(
        None,
        "--suite",
        help="A probe suite: bundled name (see `detaudit suites`) "
        "or a .yaml/.jsonl file; every entry is its own prompt id.",
    ),  # fmt: skip
    repeats: int = typer.Option(
        100, "-n", "--repeats", help="N independent requests per prompt per arm (never the API's n field)."
    ),  # fmt: skip
    base_url: str | None = typer.Option(
        None, "--base-url", help="Endpoint base URL (default: env OPENAI_BASE_URL, else https://api.openai.com/v1)."
    ),  # fmt: skip
    api_key_env: str = typer.Option(
        DEFAULT_KEY_ENV,
        "--api-key-env",
        help="Environment variable holding the API key (the key itself is never written anywhere).",
    ),  # fmt: skip
    model: str | None = typer.Option(None, "--model", "-m", help="Model name (default: the only model /models lists)."),
    api: str = typer.Option("chat", "--api", help="chat or completions."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="max_tokens per request."),
    temperature: float = typer.Option(0.0, "--temperature", help="Sampling temperature."),
    top_p: float | None = typer.Option(None, "--top-p", help="top_p, if set."),
    seed: int | None = typer.Option(None, "--seed", help="seed field, if set."),
    stop: list[str] = typer.Option([], "--stop", help="Stop sequence (repeatable)."),
    top_logprobs: int | None = typer.Option(
        None, "--top-logprobs", help="Alternatives per token, 0-20 (default 2 when the endpoint has them; 0: none)."
    ),  # fmt: skip
    concurrency: str = typer.Option(
        "1",
        "--concurrency",
        "-c",
        help="In-flight requests; a comma list gives one arm per value, run one after another (e.g. 1,64).",
    ),  # fmt: skip
    rate: float | None = typer.Option(None, "--rate", help="Cap on requests per second."),
    timeout: float = typer.Option(
        60.0, "--timeout", help="Deadline of one HTTP attempt in seconds: connect and the whole answer."
    ),  # fmt: skip
    max_response_bytes: int = typer.Option(
        DEFAULT_MAX_RESPONSE_BYTES,
        "--max-response-bytes",
        help="Largest answer accepted, in bytes; a larger one is an error row (too_large).",
    ),
    retries: int = typer.Option(3, "--retries", help="Retries after a 429/5xx/timeout/broken answer."),
    backoff: float = typer.Option(0.5, "--backoff", help="First retry delay in seconds (doubles; Retry-After wins)."),
    extra_body: str | None = typer.Option(
        None, "--extra-body", help="JSON object merged into every request (e.g. vLLM's cache_salt)."
    ),  # fmt: skip
    header: list[str] = typer.Option(
        [], "--header", "-H", help="Extra 'Name: value' header (repeatable; the value is never written anywhere)."
    ),  # fmt: skip
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory to create (default: a new one in runs/)."
    ),  # fmt: skip
    resume: bool = typer.Option(False, "--resume", help="Finish the run in --out: only missing or failed samples."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory in --out."),
    stream: bool = typer.Option(False, "--stream", help="Use streaming responses (same record, timed per stream)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    gate: list[str] = typer.Option(
        [],
        "--gate",
        help="Judge the finished run like `detaudit gate` (exit 1 on "
        "failure): RULE=VALUE[,...], e.g. max-unique=1,min-modal-share=0.99; also "
        "min-first-divergence, max-error-rate, baseline=RUN, require-same-modal, "
        "max-unique-increase (repeatable).",
    ),  # fmt: skip
) -> None:
    console, err_console = Console(), Console(stderr=True)
    thresholds = parse_gate_spec(gate) if gate else None  # bad rules fail before any request is sent
    if thresholds is not None and thresholds.baseline is not None:
        load_manifest(thresholds.baseline)  # so does a baseline that is not a run
    if resume:
        if out is None:
            raise UsageError("--resume needs --out DIR (the run directory to finish)")
        given = [_flag(ctx, name) for name in _MANIFEST_SETTINGS if name in given_options(ctx)]
        if given:
            raise UsageError(f"--resume takes the run's settings from its manifest; drop {', '.join(given)}")
        req, manifest = request_from_manifest(
            out, base_url=base_url, api_key=api_key_from_env(api_key_env),
            headers=parse_headers(header), stream=stream, backoff=backoff,
        )  # fmt: skip
        req.key_env = api_key_env
        outcome = execute_run(req, lambda: make_progress(err_console), resumed=manifest)
    else:
        chosen = load_suite(suite) if suite else None
        req = build_request(
            prompts=prompt, prompt_file=prompt_file, extra_prompts=chosen.prompts if chosen else None,
            repeats=repeats, base_url=base_url,
            api_key_env=api_key_env, model=model, api=api, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop, top_logprobs=top_logprobs, concurrency=concurrency, rate=rate,
            timeout=timeout, retries=retries, backoff=backoff, extra_body=extra_body, headers=header, out=out,
            stream=stream, force=force, max_response_bytes=max_response_bytes,
            suite=None if chosen is None else chosen.name if chosen.bundled else chosen.source,
        )  # fmt: skip
        outcome = execute_run(req, lambda: make_progress(err_console))
    summary = finish_run(outcome, as_json, console, err_console)
    if thresholds is not None:
        gate_finished_run(outcome.run_dir, summary, thresholds)
