"""The one place tests start HTTP servers in other processes: the scripted server, `detaudit serve`,
`transformers serve` and llama.cpp's `llama-server`.

Every server gets a free loopback port, its log in a file (never the test's terminal), a bounded wait until it
answers (with the log's tail in the error when it does not), death with the test process (PR_SET_PDEATHSIG: a
pytest killed by a timeout leaves no server behind), a memory bound (a watchdog kills its process group
when its resident memory passes `max_rss_mb`: a server that grows without bound fails its test instead of taking
the shared machine down), and a teardown that stops its whole process group::

    from servers import free_port, serving, detaudit_serve_argv   # tests/ is on sys.path under pytest

    port = free_port()
    with serving(detaudit_serve_argv(model, port), log=tmp / "serve.log", port=port, max_rss_mb=3000) as srv:
        srv.base_url                                         # "http://127.0.0.1:PORT/v1"
    srv.peak_rss_mb                                          # the most it held

The scripted server prints ``READY <base_url>`` instead of answering a health check: `spawn` starts it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

SCRIPTED = Path(__file__).with_name("scripted_server.py")
BIN = Path(sys.executable).parent  # the venv's console scripts: detaudit, transformers


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies (a killed pytest runs no teardown, and a
    server in its own session would outlive it)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, in MiB (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 2**20


class Server:
    """A server process in its own process group, with its log file, URL and memory watchdog."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path, max_rss_mb: float | None) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.base = f"http://127.0.0.1:{port}"
        self.peak_rss_mb = 0.0
        self.killed_for_memory = ""
        self._done = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, args=(max_rss_mb,), daemon=True, name="rss-watch")
        self._watch.start()

    @property
    def base_url(self) -> str:
        return f"{self.base}/v1"

    def _watchdog(self, max_rss_mb: float | None) -> None:
        while not self._done.wait(0.5) and self.proc.poll() is None:
            rss = _tree_rss_mb(self.proc.pid)
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
            if max_rss_mb is not None and rss > max_rss_mb:
                self.killed_for_memory = f"killed: resident memory {rss:.0f} MiB passed the bound {max_rss_mb:.0f}"
                self._signal(signal.SIGKILL)
                return

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def tail(self, chars: int = 2000) -> str:
        text = self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
        return f"{self.killed_for_memory}\n{text}".strip()

    def wait_ready(self, timeout: float, path: str = "/health") -> None:
        """Poll `path` until it answers 200; raise with the log's tail if the server exits first or is not ready
        within `timeout` seconds (it is then stopped)."""
        name = " ".join(Path(str(a)).name for a in self.proc.args[:2]) if isinstance(self.proc.args, list) else ""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.base}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s: {self.tail()}")
            time.sleep(0.3)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM to the whole group, SIGKILL after `timeout` s; returns the server's exit status."""
        self._signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            code = self.proc.wait()
        self._signal(signal.SIGKILL)  # anything it started and left behind
        self._done.set()
        return code


def launch(
    argv: Sequence[object],
    *,
    log: Path,
    port: int,
    env: dict[str, str] | None = None,
    max_rss_mb: float | None = 4000,
) -> Server:
    """Start `argv` (which must listen on 127.0.0.1:`port`) without waiting: `start` several, then `wait_ready`
    each, and they load at the same time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: stop() reaches whatever it starts
            preexec_fn=_die_with_parent,
        )
    return Server(proc, port, log, max_rss_mb)


def start(
    argv: Sequence[object],
    *,
    log: Path,
    port: int,
    env: dict[str, str] | None = None,
    ready_timeout: float = 120,
    health: str = "/health",
    max_rss_mb: float | None = 4000,
) -> Server:
    """`launch`, then wait until `health` answers 200."""
    server = launch(argv, log=log, port=port, env=env, max_rss_mb=max_rss_mb)
    server.wait_ready(ready_timeout, health)
    return server


@contextmanager
def serving(argv: Sequence[object], **kwargs: Any) -> Iterator[Server]:
    """`start`, yield, stop: the server is gone when the block ends, whatever happened in it."""
    server = start(argv, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def detaudit_serve_argv(model: Path | str, port: int, *options: object) -> list[object]:
    return [BIN / "detaudit", "serve", "--model", model, "--port", port, *options]


def transformers_serve_argv(
    model: Path | str, port: int, *, num_blocks: int, block_size: int, max_batch_tokens: int, dtype: str = "bfloat16"
) -> list[object]:
    """Continuous batching on the CPU with the KV cache bounded (default settings grow to many GB)."""
    return [
        BIN / "transformers",
        "serve",
        model,
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--continuous-batching",
        "--dtype",
        dtype,
        "--cb-num-blocks",
        num_blocks,
        "--cb-block-size",
        block_size,
        "--cb-max-batch-tokens",
        max_batch_tokens,
    ]


def transformers_serve_env(cache: Path) -> dict[str, str]:
    """Offline, with a hub cache that exists (or /v1/models answers 500: platform.md §5)."""
    cache.mkdir(parents=True, exist_ok=True)
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "TRANSFORMERS_OFFLINE": "1"}


def llama_server_argv(binary: Path | str, gguf: Path | str, port: int, *options: object) -> list[object]:
    return [binary, "-m", gguf, "--host", "127.0.0.1", "--port", port, *options]


def spawn(script: dict[str, Any], workdir: Path, port: int = 0) -> tuple[subprocess.Popen[str], str]:
    """Start tests/scripted_server.py in another process with `script` (ScriptedServer keyword arguments);
    returns the process and its base URL once it printed ``READY``; its stderr goes to workdir/scripted-server.log.
    The caller kills it."""
    path = workdir / "script.json"
    path.write_text(json.dumps(script))
    with open(workdir / "scripted-server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPTED), "--port", str(port), "--script", str(path)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            preexec_fn=_die_with_parent,
        )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"scripted server did not start: {line!r}")
    return proc, line.split()[1]
