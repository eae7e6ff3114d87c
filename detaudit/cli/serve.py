"""`detaudit serve`: the local engine behind an OpenAI-compatible HTTP API (loopback unless --host is given)."""

from __future__ import annotations

import socket
from typing import Annotated

import typer
from rich.console import Console

from detaudit.cli import options
from detaudit.cli.options import group
from detaudit.cli.progress import loading


def serve_command(
    ctx: typer.Context,
    model: options.ModelDir,
    kernels: options.Kernels = "stock",
    host: Annotated[str, typer.Option("--host", help="Address to bind; loopback by default.")] = "127.0.0.1",
    port: options.Port = 8000,
    device: options.Device = "cpu",
    dtype: options.Dtype = "bfloat16",
    cuda_graphs: options.CudaGraphs = True,
    fit_steps: options.FitSteps = True,
    max_batch: options.MaxBatch = 32,
    max_batched_tokens: options.MaxBatchedTokens = 512,
    max_model_len: options.MaxModelLen = 2048,
    prefix_cache: options.PrefixCache = True,
    kv_blocks: options.KvBlocks = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Waiting requests before answering 503.")] = 1024,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="Model id (default --model).")
    ] = None,
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
    cfg = group(EngineConfig, ctx)
    with loading(Console(stderr=True), cfg.loading_message()):
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
