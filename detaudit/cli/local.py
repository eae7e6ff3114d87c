"""`detaudit local`: rerun prompts on the bundled engine under server-like load, stock or batch-invariant kernels."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from detaudit.audit.workload import SCENARIOS
from detaudit.cli import options
from detaudit.cli.options import given_options, group, like
from detaudit.cli.progress import arm_progress
from detaudit.errors import UsageError

# Options that only one side takes (cli/local_managed.py refuses them on the other), each under its own panel.
_BUILTIN = "Built-in engine only (--engine detaudit, the default)"
_MANAGED = "Managed engine only (--engine vllm|sglang|command; docs/scale.md)"


def local_command(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        like(
            options.Model,
            help="Local model directory, .gguf file, smollm2 or hub id (Llama, "
            "Mistral, Qwen2, Qwen3); --engine command: default the server's only model.",
        ),
    ] = None,
    prompt: options.Prompt = [],
    repeats: options.Repeats = 100,
    kernels: options.Kernels = "stock",
    scenario: Annotated[
        str,
        typer.Option(
            "--scenario",
            help=f"Comma list of {', '.join(SCENARIOS)}; one arm each. The default pairs the serial control arm "
            "with a loaded one, so a divergence can be judged load-dependent.",
            rich_help_panel=_BUILTIN,
        ),
    ] = "serial,mixed",
    max_batch: Annotated[
        int, like(options.MaxBatch, help="Sequences per engine step (the arm's concurrency).", panel=_BUILTIN)
    ] = 16,
    max_tokens: Annotated[int, like(options.MaxTokens)] = 64,
    max_batched_tokens: Annotated[int, like(options.MaxBatchedTokens, panel=_BUILTIN)] = 512,
    max_model_len: Annotated[int, like(options.MaxModelLen, panel=_BUILTIN)] = 1024,
    prefix_cache: Annotated[bool, like(options.PrefixCache, panel=_BUILTIN)] = True,
    kv_blocks: Annotated[int | None, like(options.KvBlocks, panel=_BUILTIN)] = None,
    device: Annotated[str, like(options.Device, panel=_BUILTIN)] = "cpu",
    dtype: Annotated[str, like(options.Dtype, panel=_BUILTIN)] = "bfloat16",
    cuda_graphs: Annotated[bool, like(options.CudaGraphs, panel=_BUILTIN)] = True,
    # Off here: StepFit sizes steps by measured times, and a local audit's batches must follow from the seed alone.
    fit_steps: Annotated[bool, like(options.FitSteps, panel=_BUILTIN)] = False,
    seed: Annotated[int, like(options.Seed, help="Seeds the filler requests and their arrivals.", panel=_BUILTIN)] = 0,
    top_logprobs: Annotated[int, like(options.TopLogprobs, help="Top-k alternatives recorded per token (0-20).")] = 5,
    out: options.Out = None,
    force: options.Force = False,
    as_json: options.Json = False,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="detaudit (built-in), or a server detaudit starts and audits over HTTP: vllm, sglang, command.",
        ),
    ] = "detaudit",
    suite: Annotated[str | None, like(options.Suite, panel=_MANAGED)] = None,
    concurrency: Annotated[str, like(options.Concurrency, panel=_MANAGED)] = "1,32",
    server_cmd: Annotated[
        str | None,
        typer.Option(
            "--server-cmd",
            rich_help_panel=_MANAGED,
            help="--engine command: server command line ({port}, {host}, {model}).",
        ),
    ] = None,
    tensor_parallel_size: Annotated[
        int | None, typer.Option("--tensor-parallel-size", help="vllm/sglang TP size.", rich_help_panel=_MANAGED)
    ] = None,
    engine_args: Annotated[
        str | None,
        typer.Option("--engine-args", help="Extra arguments for the engine's command line.", rich_help_panel=_MANAGED),
    ] = None,
    server_env: Annotated[
        list[str],
        typer.Option("--server-env", help="NAME=VALUE for the server (repeatable).", rich_help_panel=_MANAGED),
    ] = [],
    attention_backend: Annotated[
        str | None,
        typer.Option(
            "--attention-backend",
            rich_help_panel=_MANAGED,
            help="Engine attention backend (vllm batch-invariant: FLASH_ATTN).",
        ),
    ] = None,
    port: Annotated[int | None, like(options.Port, help="Server port (default: a free one).", panel=_MANAGED)] = None,
    startup_timeout: Annotated[
        float,
        typer.Option(
            "--startup-timeout", help="Seconds to wait for the server's health endpoint.", rich_help_panel=_MANAGED
        ),
    ] = 900.0,
    request_timeout: Annotated[
        float, typer.Option("--request-timeout", help="Seconds per HTTP attempt.", rich_help_panel=_MANAGED)
    ] = 300.0,
    resume: Annotated[bool, like(options.Resume, panel=_MANAGED)] = False,
) -> None:
    from detaudit.cli.local_managed import INHOUSE_ONLY, local_managed, refuse_foreign_options

    refuse_foreign_options(engine, given_options(ctx))
    if engine != "detaudit":
        # every option but the built-in engine's own, which refuse_foreign_options left at their defaults
        local_managed(**{name: value for name, value in ctx.params.items() if name not in INHOUSE_ONLY})
        return
    if model is None:  # optional only for --engine command, whose server may name its own model
        raise UsageError(f"--engine {engine} needs --model (a model directory, .gguf file or hub id)")
    from detaudit.analysis.summary import store_summary
    from detaudit.audit.local_engine import LocalRunSpec, run_local
    from detaudit.cli.render import render_summary
    from detaudit.engine.llm import EngineConfig

    out = out or Path("runs") / f"local-{kernels}-{datetime.now():%Y%m%d-%H%M%S}"
    spec = LocalRunSpec(
        engine=group(EngineConfig, ctx),
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
    with arm_progress(console, spec.engine.loading_message(), lambda arm: f"{arm} ({kernels})") as progress:
        run_dir = run_local(spec, progress)
    summary = store_summary(run_dir)
    if as_json:
        typer.echo(json.dumps(summary.document(), indent=2, default=str))
    else:
        render_summary(summary, console)
        console.print(f"run directory: {run_dir}", highlight=False, markup=False)
