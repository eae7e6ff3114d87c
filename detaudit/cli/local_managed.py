"""`detaudit local --engine vllm|sglang|command`: the command-line side of a managed-engine audit (the target itself
is detaudit.audit.managed)."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from rich.console import Console

from detaudit.audit.launch import build_launch
from detaudit.audit.managed import request_for_resume, run_managed
from detaudit.audit.request import EndpointOptions, PromptOptions, RunSettings, request_from_options
from detaudit.cli.run import finish_run, make_progress
from detaudit.errors import UsageError

# `detaudit local` options that only one side uses: given on the command line for the other side, they are refused
# rather than silently ignored (e.g. --dtype means nothing to a vLLM command line; use --engine-args there).
INHOUSE_ONLY = (
    "scenario",
    "max_batch",
    "max_batched_tokens",
    "max_model_len",
    "device",
    "dtype",
    "seed",
    "cuda_graphs",
    "fit_steps",
    "prefix_cache",
    "kv_blocks",
)
MANAGED_ONLY = (
    "suite",
    "concurrency",
    "server_cmd",
    "tensor_parallel_size",
    "engine_args",
    "server_env",
    "attention_backend",
    "port",
    "startup_timeout",
    "resume",
    "request_timeout",
)


def refuse_foreign_options(engine: str, given: set[str]) -> None:
    """--engine detaudit takes no managed-engine option, and a managed engine takes no built-in engine option."""
    foreign = MANAGED_ONLY if engine == "detaudit" else INHOUSE_ONLY
    bad = sorted(given & set(foreign))
    if bad:
        flags = ", ".join("--" + b.replace("_", "-") for b in bad)
        side = "vllm, sglang or command" if engine == "detaudit" else "detaudit (the built-in engine)"
        raise UsageError(f"{flags} only {'applies' if len(bad) == 1 else 'apply'} with --engine {side}")


def local_managed(
    *,
    engine: str,
    model: str | None,
    kernels: str,
    prompt: list[str],
    suite: str | None,
    repeats: int,
    concurrency: str,
    max_tokens: int | None,
    top_logprobs: int | None,
    tensor_parallel_size: int | None,
    server_cmd: str | None,
    engine_args: str | None,
    server_env: list[str],
    attention_backend: str | None,
    port: int | None,
    startup_timeout: float,
    request_timeout: float,
    out: Path | None,
    resume: bool,
    force: bool,
    as_json: bool,
) -> None:
    """`detaudit local --engine vllm|sglang|command` (its options, by name, but the built-in engine's): parse, run
    the managed audit, render like `detaudit run`."""
    console, err_console = Console(), Console(stderr=True)
    if not startup_timeout > 0:  # written so that NaN (which would wait forever) fails too
        raise UsageError(f"--startup-timeout must be > 0, got {startup_timeout:g}")
    if not request_timeout > 0:  # checked here too so the message names this command's option, not run's --timeout
        raise UsageError(f"--request-timeout must be > 0, got {request_timeout:g}")
    launch = build_launch(
        engine,
        model=model,
        port=port,
        tensor_parallel_size=tensor_parallel_size,
        kernels=kernels,
        server_cmd=server_cmd,
        engine_args=engine_args,
        attention_backend=attention_backend,
        server_env=server_env,
    )
    if resume:
        if out is None:
            raise UsageError("--resume needs --out DIR (the run directory to finish)")
        given = [flag for flag, value in (("--prompt", prompt), ("--suite", suite)) if value]
        if given:
            raise UsageError(f"--resume takes the run's prompts from its manifest; drop {', '.join(given)}")
        req, manifest = request_for_resume(out, launch, backoff=EndpointOptions().backoff)
    else:
        req = request_from_options(
            PromptOptions(prompt=prompt, suite=suite),
            EndpointOptions(base_url=launch.base_url),
            RunSettings(
                model=model,
                repeats=repeats,
                concurrency=concurrency,
                max_tokens=max_tokens,
                top_logprobs=top_logprobs,
                timeout=request_timeout,
            ),
            out=out or Path("runs") / f"{engine}-{time.strftime('%Y%m%d-%H%M%S')}",
            force=force,
        )
        req.api_key = None  # the managed server listens on loopback without auth: never send the user's key there
        manifest = None
    err_console.print(
        f"starting {engine} server: {shlex.join(launch.redacted_argv())}", highlight=False, markup=False, soft_wrap=True
    )  # one line: the command stays copy-pastable
    outcome = run_managed(
        launch,
        req,
        startup_timeout_s=startup_timeout,
        make_progress=lambda: make_progress(err_console),
        resumed=manifest,
    )
    resume_hint = f"the same command plus --resume --out {shlex.quote(str(outcome.run_dir))} (without --prompt/--suite)"
    finish_run(outcome, as_json, console, err_console, resume=resume_hint)
