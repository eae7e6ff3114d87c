"""`detaudit local`: rerun prompts on the bundled engine under server-like load, stock or batch-invariant kernels."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from detaudit.audit.workload import SCENARIOS
from detaudit.cli import engine_options
from detaudit.engine.config import KERNELS
from detaudit.errors import UsageError

_MANAGED = "Managed engine (--engine vllm|sglang|command; docs/scale.md)"


def local_command(
    ctx: typer.Context,
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Hub id or local model directory (Llama, "
        "Mistral, Qwen2, Qwen3); --engine command: default the server's only model.",
    ),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text (repeatable)."),
    repeats: int = typer.Option(
        100, "-n", "--repeats", help="N independent requests per prompt per arm (never the API's n field)."
    ),  # fmt: skip
    kernels: str = typer.Option("stock", "--kernels", help=f"{' or '.join(KERNELS)}."),
    scenario: str = typer.Option("mixed", "--scenario", help=f"Comma list of {', '.join(SCENARIOS)}; one arm each."),
    max_batch: int = typer.Option(16, "--max-batch", help="Sequences per engine step (the arm's concurrency)."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="max_tokens per request."),
    max_batched_tokens: int = typer.Option(512, "--max-batched-tokens", help="Token budget per step (chunks prompts)."),
    max_model_len: int = typer.Option(1024, "--max-model-len", help="Longest prompt + completion the KV cache holds."),
    device: str = engine_options.DEVICE,
    dtype: str = engine_options.DTYPE,
    cuda_graphs: bool = engine_options.CUDA_GRAPHS,
    seed: int = typer.Option(0, "--seed", help="Seeds the filler requests and their arrivals."),
    top_logprobs: int = typer.Option(5, "--top-logprobs", help="Top-k alternatives recorded per token (0-20)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory to create (default: a new one in runs/)."
    ),  # fmt: skip
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    engine: str = typer.Option(
        "detaudit",
        "--engine",
        help="detaudit (built-in), or a server detaudit starts and audits over HTTP: vllm, sglang, command.",
        rich_help_panel=_MANAGED,
    ),  # fmt: skip
    suite: str | None = typer.Option(
        None,
        "--suite",
        help="A probe suite: bundled name (see `detaudit suites`) "
        "or a .yaml/.jsonl file; every entry is its own prompt id.",
        rich_help_panel=_MANAGED,
    ),  # fmt: skip
    concurrency: str = typer.Option(
        "1,32",
        "--concurrency",
        "-c",
        help="In-flight requests; a comma list gives one arm per value, run one after another (e.g. 1,64).",
        rich_help_panel=_MANAGED,
    ),  # fmt: skip
    server_cmd: str | None = typer.Option(
        None,
        "--server-cmd",
        rich_help_panel=_MANAGED,
        help="--engine command: server command line ({port}, {host}, {model}).",
    ),
    tensor_parallel_size: int | None = typer.Option(
        None, "--tensor-parallel-size", help="vllm/sglang TP size.", rich_help_panel=_MANAGED
    ),  # fmt: skip
    engine_args: str | None = typer.Option(
        None, "--engine-args", help="Extra arguments for the engine's command line.", rich_help_panel=_MANAGED
    ),  # fmt: skip
    server_env: list[str] = typer.Option(
        [], "--server-env", help="NAME=VALUE for the server (repeatable).", rich_help_panel=_MANAGED
    ),  # fmt: skip
    attention_backend: str | None = typer.Option(
        None,
        "--attention-backend",
        rich_help_panel=_MANAGED,
        help="Engine attention backend (vllm batch-invariant: FLASH_ATTN).",
    ),
    port: int | None = typer.Option(
        None, "--port", help="Server port (default: a free one).", rich_help_panel=_MANAGED
    ),  # fmt: skip
    startup_timeout: float = typer.Option(
        900.0, "--startup-timeout", help="Seconds to wait for the server's health endpoint.", rich_help_panel=_MANAGED
    ),  # fmt: skip
    request_timeout: float = typer.Option(
        300.0, "--request-timeout", help="Seconds per HTTP attempt.", rich_help_panel=_MANAGED
    ),  # fmt: skip
    resume: bool = typer.Option(
        False, "--resume", help="Finish the run in --out: only missing or failed samples.", rich_help_panel=_MANAGED
    ),  # fmt: skip
) -> None:
    from detaudit.cli.local_managed import local_managed, refuse_foreign_options
    from detaudit.cli.options import given_options

    refuse_foreign_options(engine, given_options(ctx))
    if engine != "detaudit":
        local_managed(
            engine=engine, model=model, tensor_parallel_size=tensor_parallel_size, kernels=kernels,
            server_cmd=server_cmd, engine_args=engine_args, server_env=server_env, attention_backend=attention_backend,
            port=port, startup_timeout=startup_timeout, prompts=prompt, suite=suite, repeats=repeats,
            concurrency=concurrency, max_tokens=max_tokens, top_logprobs=top_logprobs, timeout=request_timeout,
            out=out, resume=resume, force=force, as_json=as_json,
        )  # fmt: skip
        return
    if model is None:  # optional only for --engine command, whose server may name its own model
        raise UsageError(f"--engine {engine} needs --model (a hub id or local model directory)")
    from detaudit.analysis.summary import summarize_run
    from detaudit.audit.local_engine import LocalRunSpec, run_local
    from detaudit.cli.render import render_summary
    from detaudit.engine.llm import EngineConfig
    from detaudit.rundir.io import write_summary

    out = out or Path("runs") / f"local-{kernels}-{datetime.now():%Y%m%d-%H%M%S}"
    spec = LocalRunSpec(
        engine=EngineConfig(
            model,
            device=device,
            dtype=dtype,
            kernels=kernels,
            max_batch=max_batch,
            max_batched_tokens=max_batched_tokens,
            max_model_len=max_model_len,
            cuda_graphs=cuda_graphs,
        ),
        prompts=prompt,
        repeats=repeats,
        scenarios=[s.strip() for s in scenario.split(",") if s.strip()],
        out=out,
        max_tokens=max_tokens,
        top_logprobs=top_logprobs,
        seed=seed,
        force=force,
    )
    console = Console(stderr=as_json)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, int] = {"": bar.add_task(spec.engine.loading_message(), total=None)}  # until an arm starts

        def progress(arm: str, done: int, total: int) -> None:
            if "" in tasks:
                bar.remove_task(tasks.pop(""))
            if arm not in tasks:
                tasks[arm] = bar.add_task(f"{arm} ({kernels})", total=total)
            bar.update(tasks[arm], completed=done)

        run_dir = run_local(spec, progress)
    summary = summarize_run(run_dir)
    write_summary(run_dir, summary)
    if as_json:
        typer.echo(json.dumps(summary.document(), indent=2, default=str))
    else:
        render_summary(summary, console)
        console.print(f"run directory: {run_dir}", highlight=False, markup=False)
