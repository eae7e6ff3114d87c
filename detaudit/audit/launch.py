"""Launch presets of managed engines: the command line and environment a vLLM, SGLang or custom server starts with.

`build_launch` turns the CLI's choices into a `LaunchSpec`, checking what can be checked before anything starts
(a large model takes minutes to load). The child inherits only an allowlist of detaudit's environment
(`child_env`, docs/scale.md): never an API key or token. What the manifest records of a launch (`LaunchSpec.record`)
has the values of secret-looking options and variables masked; `argv_secrets` names them for the log's scrubber.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from detaudit.errors import UsageError
from detaudit.redact import MASK, SECRET_NAME
from detaudit.rundir.schema import SERVER_LOG

ENGINES = ("vllm", "sglang", "command")
KERNELS = ("stock", "batch-invariant")
HOST = "127.0.0.1"
# vLLM's batch-invariant mode needs an attention backend that supports it (FLASH_ATTN, TRITON_ATTN,
# FLEX_ATTENTION; FlashInfer is excluded upstream): pin one rather than trust auto-selection of older versions.
VLLM_BI_ATTENTION = "FLASH_ATTN"
# Inherited variables that change kernel paths or placement: recorded (values masked if secret-looking).
_RECORDED_ENV = re.compile(r"^(VLLM_|SGLANG_|NCCL_|CUDA_VISIBLE_DEVICES$|CUBLAS|CUBLASLT|TORCH_|PYTORCH_|HIP_|ROCR_)")
# What a managed server inherits from detaudit's environment: what finds programs, libraries, GPUs and model caches,
# and the engines' own switches (docs/scale.md lists them). Names that look secret are dropped even when they match
# (VLLM_API_KEY would make the server demand a key detaudit does not send); --server-env passes anything else.
_CHILD_ENV = re.compile(
    r"^(PATH|HOME|USER|LOGNAME|SHELL|TERM|TZ|LANG|LANGUAGE|LC_\w+|TMPDIR|TMP|TEMP|XDG_CACHE_HOME|PYTHON\w*"
    r"|VIRTUAL_ENV|CONDA_PREFIX|LD_LIBRARY_PATH|CUDA_\w+|NVIDIA_\w+|NCCL_\w+|CUBLAS\w*|CUDNN_\w+|TORCH\w*"
    r"|PYTORCH_\w+|TRITON_\w+|VLLM_\w+|SGLANG_\w+|HIP_\w+|ROCR_\w+|ROCM_\w+|OMP_NUM_THREADS|MKL_\w+"
    r"|HF_HOME|HF_HUB_CACHE|HF_HUB_OFFLINE|HF_DATASETS_OFFLINE|TRANSFORMERS_\w+)$"
)


@dataclass
class LaunchSpec:
    """How one managed server is started: argv and env switches are exactly what the child gets."""

    engine: str
    argv_template: list[str]  # "{port}" stands for the port, so a port clash can be retried on another
    env: dict[str, str]
    port: int
    health_path: str
    model: str | None
    kernels: str
    tensor_parallel_size: int | None = None
    attention_backend: str | None = None
    port_chosen: bool = True
    secrets: list[str] = field(default_factory=list, repr=False)

    @property
    def argv(self) -> list[str]:
        return [a.replace("{port}", str(self.port)) for a in self.argv_template]

    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def redacted_argv(self) -> list[str]:
        return redact_argv(self.argv)

    def record(self) -> dict[str, Any]:
        """Manifest-safe facts about the launch (TargetSpec.engine)."""
        return {
            "managed": True,
            "engine": self.engine,
            "command": self.redacted_argv(),
            "command_line": shlex.join(self.redacted_argv()),
            "env_switches": _mask_env(self.env),
            "inherited_env": _mask_env({k: v for k, v in child_env({}).items() if _RECORDED_ENV.match(k)}),
            "kernels": self.kernels,
            "tensor_parallel_size": self.tensor_parallel_size,
            "attention_backend": self.attention_backend,
            "host": HOST,
            "port": self.port,
            "server_log": SERVER_LOG,
        }


def redact_argv(argv: list[str]) -> list[str]:
    """argv with the values of secret-looking options masked (`--api-key X`, `--api-key=X`, `--hf-token X`)."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        if arg.startswith("-") and SECRET_NAME.search(arg):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + MASK)
            else:
                out.append(arg)
                mask_next = True
            continue
        out.append(arg)
    return out


def argv_secrets(argv: list[str]) -> list[str]:
    """The values redact_argv masks: scrubbed from the server log and from error messages too."""
    redacted = redact_argv(argv)
    found = []
    for raw, red in zip(argv, redacted, strict=True):
        if raw != red:
            found.append(raw.split("=", 1)[1] if red.endswith("=" + MASK) else raw)
    return [s for s in found if s]


def _mask_env(env: dict[str, str]) -> dict[str, str]:
    return {k: (MASK if SECRET_NAME.search(k) else v) for k, v in sorted(env.items())}


def child_env(switches: dict[str, str]) -> dict[str, str]:
    """The environment a managed server starts with: the allowlisted part of detaudit's own, then the launch's
    switches (--server-env, VLLM_BATCH_INVARIANT), which the user named and so pass whatever their names."""
    inherited = {k: v for k, v in os.environ.items() if _CHILD_ENV.match(k) and not SECRET_NAME.search(k)}
    return {**inherited, **switches}


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def build_launch(
    engine: str,
    *,
    model: str | None,
    port: int | None = None,
    tensor_parallel_size: int | None = None,
    kernels: str = "stock",
    server_cmd: str | None = None,
    engine_args: str | None = None,
    attention_backend: str | None = None,
    server_env: list[str] | None = None,
) -> LaunchSpec:
    """Turn the CLI's choices into a command line and environment switches, checking what can be checked early."""
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: use detaudit (built-in) or one of {', '.join(ENGINES)}")
    if kernels not in KERNELS:
        raise UsageError(f"--kernels {kernels!r}: a managed engine takes {' or '.join(KERNELS)}")
    if tensor_parallel_size is not None and tensor_parallel_size < 1:
        raise UsageError("--tensor-parallel-size must be at least 1")
    chosen = port is None
    if port is None:
        port = free_port()
    elif not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: not a TCP port")
    elif port_in_use(port):
        raise UsageError(f"--port {port}: something already listens on {HOST}:{port}; pick another or leave --port out")
    env = _parse_env(server_env or [])
    extra = _split(engine_args, "--engine-args")
    if engine == "command":
        if not server_cmd:
            raise UsageError('--engine command needs --server-cmd "…" (an OpenAI-compatible server command line)')
        if tensor_parallel_size is not None:
            raise UsageError("--tensor-parallel-size applies to vllm/sglang; put the server's own flag in --server-cmd")
        if kernels != "stock":
            raise UsageError(
                "--kernels batch-invariant needs --engine vllm or sglang; with --engine command, put the server's own "
                "switch in --server-cmd (or --server-env) and leave --kernels at stock"
            )
        if attention_backend:
            raise UsageError("--attention-backend applies to vllm/sglang; put it in --server-cmd")
        words = _split(server_cmd, "--server-cmd")  # an unbalanced quote first: it is why {port} looks missing
        if "{port}" not in server_cmd and chosen:
            raise UsageError("--server-cmd must contain {port} (detaudit picks a free port) unless --port is given")
        subst = {"{host}": HOST, "{model}": model or ""}
        if "{model}" in server_cmd and not model:
            raise UsageError("--server-cmd uses {model} but no --model was given")
        argv = [_substitute(a, subst) for a in words] + extra
        if not argv:
            raise UsageError("--server-cmd is empty")
        health = "/v1/models"
    else:
        if not model:
            raise UsageError(f"--engine {engine} needs --model (a Hugging Face id or a local path)")
        if server_cmd:
            raise UsageError("--server-cmd is only for --engine command")
        tp = tensor_parallel_size or 1
        tensor_parallel_size = tp
        if attention_backend == "auto":  # leave the choice to the engine (e.g. a vLLM without --attention-backend)
            attention_backend = None
            pinned = False
        else:
            pinned = True
        if engine == "vllm":
            argv = ["vllm", "serve", model, "--host", HOST, "--port", "{port}", "--tensor-parallel-size", str(tp)]
            if kernels == "batch-invariant":
                env["VLLM_BATCH_INVARIANT"] = "1"
                if pinned:
                    attention_backend = attention_backend or VLLM_BI_ATTENTION
            else:
                # An inherited VLLM_BATCH_INVARIANT=1 would silently turn the stock arm deterministic.
                env["VLLM_BATCH_INVARIANT"] = "0"
            if attention_backend:
                argv += ["--attention-backend", attention_backend]
        else:
            argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--host", HOST]
            argv += ["--port", "{port}", "--tp-size", str(tp)]
            if kernels == "batch-invariant":
                argv.append("--enable-deterministic-inference")
            if attention_backend:
                argv += ["--attention-backend", attention_backend]
        argv += extra
        health = "/health"
    secrets = argv_secrets(argv) + [v for k, v in env.items() if SECRET_NAME.search(k)]
    return LaunchSpec(
        engine=engine,
        argv_template=argv,
        env=env,
        port=port,
        health_path=health,
        model=model,
        kernels=kernels,
        tensor_parallel_size=tensor_parallel_size,
        attention_backend=attention_backend,
        port_chosen=chosen,
        secrets=secrets,
    )


def _split(text: str | None, flag: str) -> list[str]:
    if not text:
        return []
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UsageError(f"{flag}: cannot split into arguments ({e})") from None


def _substitute(arg: str, subst: dict[str, str]) -> str:
    for k, v in subst.items():
        arg = arg.replace(k, v)
    return arg


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise UsageError(f"--server-env {item.split('=', 1)[0]!r}: use NAME=VALUE")
        env[name] = value
    return env
