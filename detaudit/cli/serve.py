"""`detaudit serve`: the local engine behind an OpenAI-compatible HTTP API (loopback unless --host is given)."""

from __future__ import annotations

import socket

import typer
from rich.console import Console

from detaudit.cli import engine_options
from detaudit.engine.config import KERNELS


def serve_command(
    model: str = typer.Option(..., "--model", help="Hub id or local model directory (Llama, Mistral, Qwen2, Qwen3)."),
    kernels: str = typer.Option("stock", "--kernels", help=f"{' or '.join(KERNELS)}."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; loopback by default."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    device: str = engine_options.DEVICE,
    dtype: str = engine_options.DTYPE,
    cuda_graphs: bool = engine_options.CUDA_GRAPHS,
    max_batch: int = typer.Option(32, "--max-batch", help="Sequences per engine step."),
    max_batched_tokens: int = typer.Option(512, "--max-batched-tokens", help="Token budget per step (chunks prompts)."),
    max_model_len: int = typer.Option(2048, "--max-model-len", help="Longest prompt + completion the KV cache holds."),
    max_queue: int = typer.Option(1024, "--max-queue", help="Waiting requests before answering 503."),
    served_model_name: str | None = typer.Option(None, "--served-model-name", help="Model id (default --model)."),
) -> None:
    import uvicorn

    from detaudit.engine.llm import Engine, EngineConfig
    from detaudit.errors import UsageError
    from detaudit.server import create_app

    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port")
    if max_queue < 1:
        raise UsageError(f"--max-queue must be at least 1, got {max_queue}")
    sock = _listen(host, port)  # before the model loads: a busy port fails in a second, not after minutes
    cfg = EngineConfig(
        model,
        device=device,
        dtype=dtype,
        kernels=kernels,
        max_batch=max_batch,
        max_batched_tokens=max_batched_tokens,
        max_model_len=max_model_len,
        cuda_graphs=cuda_graphs,
    )
    with Console(stderr=True).status(cfg.loading_message()):
        engine = Engine(cfg)
    name = served_model_name or model
    app = create_app(engine, model_name=name, max_queue=max_queue)
    Console(stderr=True).print(f"serving {name} ({kernels} kernels, {dtype}, {device}) at http://{host}:{port}/v1")
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown: stop accepting, finish or time out requests, then
    # the app's lifespan stops the engine thread.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """The bound server socket, or a one-line usage error (uvicorn would log a line and exit 3)."""
    from detaudit.errors import UsageError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock
