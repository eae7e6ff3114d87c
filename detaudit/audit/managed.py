"""Managed engines: start vLLM, SGLang or any OpenAI-compatible server as a child, audit it, stop it.

A 235B MoE model does not fit detaudit's own engine, so `detaudit local --engine vllm|sglang|command` drives the
engines users already run across many GPUs instead of growing a distributed runtime. The child listens on
127.0.0.1 only, on a free port; detaudit waits for its health endpoint, runs the normal audit through the runner's
OpenAI-compatible pipeline, and stops the whole process group afterwards — also on Ctrl-C, SIGTERM or failure.

How a child is started (its command line, environment and secrets) is launch.py's; this module supervises it. It
inherits only an allowlist of detaudit's environment (`child_env`, docs/scale.md): never an API key or token. The
server's output is captured to RUN/server.log through the session scrubber (every secret-looking value of
detaudit's environment, the launch's own secrets). A server that fails to start, or dies during the audit, ends the
command with exit 3 and the log's last lines. The manifest records the exact command line and the environment
switches (secret-looking values masked) and the engine version the server reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from detaudit.audit.endpoint import RunOutcome, execute_run
from detaudit.audit.launch import LaunchSpec, child_env, free_port
from detaudit.audit.request import RunRequest
from detaudit.errors import DetauditError, EndpointError, UsageError
from detaudit.redact import session_scrubber
from detaudit.rundir.io import load_manifest, write_manifest
from detaudit.rundir.recorder import check_out_dir, load_resumable
from detaudit.rundir.schema import MANIFEST_FILE, SERVER_LOG, RunManifest
from detaudit.termsafe import safe

LOG_TAIL_LINES = 25
_PORT_IN_USE = re.compile(r"address already in use|errno 98|eaddrinuse|port .* (is )?(already )?in use", re.I)


class ManagedServer:
    """One running child server: started by `start()`, stopped (whole process group) by `stop()`.

    The log is written to `log_path` as it arrives, through the session scrubber (which learns the launch's
    secrets here), and its last lines are kept in memory for error messages.
    """

    def __init__(self, spec: LaunchSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.scrubber = session_scrubber()
        for secret in spec.secrets:
            self.scrubber.add(secret)
        self.stopped_by_us = False
        self.version: str | None = None
        self.served_models: list[str] = []
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        env = child_env(self.spec.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = subprocess.Popen(
                self.spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: engine workers are stopped with it
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except FileNotFoundError:
            hint = {
                "vllm": "install vLLM (pip install vllm) on this machine",
                "sglang": "install SGLang (pip install sglang) in this Python environment",
                "command": "check the program name in --server-cmd",
            }[self.spec.engine]
            raise UsageError(f"cannot start {self.spec.argv[0]!r}: not found; {hint}") from None
        except PermissionError:
            raise UsageError(f"cannot start {self.spec.argv[0]!r}: permission denied") from None
        self._reader = threading.Thread(target=self._pump, name="detaudit-server-log", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with open(fd, "a", encoding="utf-8") as log:
            log.write(f"# detaudit: started {shlex.join(self.spec.redacted_argv())}\n")
            log.flush()
            for raw in iter(self.proc.stdout.readline, b""):
                line = self.scrubber.scrub(raw.decode("utf-8", errors="replace").rstrip("\n"))
                self.tail.append(line)
                log.write(line + "\n")
                log.flush()

    def exited(self) -> int | None:
        """The child's exit code, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll the health endpoint until it answers 200; the child dying or the timeout ends it with exit 3."""
        deadline = time.monotonic() + timeout_s
        url = self.spec.origin + self.spec.health_path
        while True:
            code = self.exited()
            if code is not None:
                raise self.failure(f"the {self.spec.engine} server exited with code {code} before it was ready")
            if _http_status(url) == 200:
                break
            if time.monotonic() > deadline:
                raise self.failure(f"the {self.spec.engine} server was not ready within {timeout_s:g} s ({url})")
            time.sleep(0.25)
        self.served_models = _served_models(self.spec.origin)
        self.version = _engine_version(self.spec.origin, self.spec.engine)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout_s`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.stopped_by_us = True
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Workers that ignored SIGTERM after the leader exited: the group must not outlive us.
        _signal_group(self.proc.pid, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(timeout=10)
        return self.proc.returncode

    def failure(self, what: str) -> EndpointError:
        """An exit-3 error with the log's last lines (scrubbed), for start-up failures and crashes."""
        if self._reader is not None and self.exited() is not None:
            self._reader.join(timeout=5)  # so the tail holds the child's last words
        # Each line made terminal-safe here: the message keeps its line breaks, the child's own control codes go.
        lines = "\n".join(f"  | {safe(line)}" for line in list(self.tail)[-LOG_TAIL_LINES:]) or "  | (no output)"
        return EndpointError(f"{what}; command: {shlex.join(self.spec.redacted_argv())}\nlast log lines:\n{lines}")

    def looks_like_port_clash(self) -> bool:
        return any(_PORT_IN_USE.search(line) for line in self.tail)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when detaudit dies, even by SIGKILL, so no server keeps the GPUs."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    # Loopback only: never let a proxy from the environment see or answer these requests.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, b""


def _http_status(url: str) -> int:
    return _http_get(url)[0]


def _json_at(url: str) -> Any:
    status, body = _http_get(url)
    if status != 200:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _served_models(origin: str) -> list[str]:
    data = _json_at(origin + "/v1/models")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return []
    return [m["id"] for m in data["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _engine_version(origin: str, engine: str) -> str | None:
    """What the server says it is: vLLM and others serve /version; SGLang puts it in /get_server_info."""
    for path in ("/version", "/get_server_info"):
        data = _json_at(origin + path)
        if isinstance(data, dict) and isinstance(data.get("version"), str):
            return data["version"]
    if engine in ("vllm", "sglang"):
        from importlib import metadata

        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(engine)
    return None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to detaudit unwinds like Ctrl-C, so the child is stopped instead of orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def managed_server(spec: LaunchSpec, log_path: Path, *, startup_timeout_s: float) -> Iterator[ManagedServer]:
    """Start the server, wait until healthy, yield it, and always stop it.

    When detaudit picked the port and the child dies complaining that the address is in use (another process took
    the port between our check and its bind), it is retried on a fresh port, up to three times.
    """
    with _sigterm_as_interrupt():
        for attempt in range(3):
            server = ManagedServer(spec, log_path)
            server.start()
            try:
                server.wait_healthy(startup_timeout_s)
            except EndpointError:
                server.stop()
                if spec.port_chosen and attempt < 2 and server.looks_like_port_clash():
                    spec = dataclasses.replace(spec, port=free_port())
                    continue
                raise
            except BaseException:
                server.stop()
                raise
            break
        try:
            yield server
        finally:
            server.stop()


def stash_log(out: Path) -> Path:
    """Where the server log goes while the run directory does not exist yet (the runner creates it)."""
    return out.parent / f".{out.name}.server.log.part"


def file_log(tmp: Path, out: Path) -> Path | None:
    """Move the stashed log into RUN/server.log (appending on --resume); without a run directory, next to it."""
    if not tmp.exists():
        return None
    if out.is_dir():
        dest = out / SERVER_LOG
        if dest.exists():
            with open(dest, "ab") as d, open(tmp, "rb") as s:
                shutil.copyfileobj(s, d)
            tmp.unlink()
        else:
            os.replace(tmp, dest)
        return dest
    dest = out.parent / f"{out.name}.{SERVER_LOG}"
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------------------- the audit around a managed server


class _Watchdog:
    """Stops the runner (through its own SIGINT path) when the server dies mid-audit, instead of letting every
    remaining request fail through its retries against a closed port."""

    def __init__(self, server: ManagedServer) -> None:
        self.server = server
        self.active = True
        self.fired = False
        self._thread = threading.Thread(target=self._watch, name="detaudit-server-watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        self._thread.join(timeout=2)

    def _watch(self) -> None:
        while self.active:
            if self.server.exited() is not None and not self.server.stopped_by_us:
                if self.active:
                    self.fired = True
                    os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)


def run_managed(
    launch: LaunchSpec,
    req: RunRequest,
    *,
    startup_timeout_s: float,
    make_progress: Callable[[], Any] | None = None,
    resumed: RunManifest | None = None,
) -> RunOutcome:
    """Start the server, run the audit against it through the runner, stop it, and file its log in the run dir.

    `req.out` must be set (the log needs a home); `req.base_url` is filled in here. Bad arguments and an occupied
    --out are refused before the server starts, because a large model can take minutes to load.
    """
    assert req.out is not None
    out = req.out
    req.validate()
    if resumed is None:
        check_out_dir(out, req.force)  # the runner repeats this check before it writes
    stash = stash_log(out)
    stash.unlink(missing_ok=True)
    crash: EndpointError | None = None
    outcome: RunOutcome | None = None
    facts: dict[str, Any] = {}
    try:
        with managed_server(launch, stash, startup_timeout_s=startup_timeout_s) as server:
            req.base_url = server.spec.base_url
            if launch.engine == "command" and len(server.served_models) == 1 and req.model not in server.served_models:
                # `--model` went into {model} (often a path); the server names the model its own way.
                req.model = server.served_models[0]
            try:
                with _Watchdog(server):
                    outcome = execute_run(req, make_progress, resumed=resumed)
            except (DetauditError, KeyboardInterrupt):
                if server.exited() is None or server.stopped_by_us:
                    raise
            code = server.exited()
            if code is not None and not server.stopped_by_us:
                crash = server.failure(f"the {launch.engine} server exited with code {code} during the audit")
            facts = {
                **server.spec.record(),
                "engine_version": server.version,
                "served_models": server.served_models,
                "crashed": crash is not None,
            }
    except EndpointError as e:
        logged = file_log(stash, out)
        raise EndpointError(f"{e}\nfull server log: {logged}") from None
    except BaseException:
        file_log(stash, out)
        raise
    logged = file_log(stash, out)
    if (out / MANIFEST_FILE).exists():
        _record(out, facts, crash, resumed is not None)
    if crash is not None:
        raise EndpointError(f"{crash}\nfull server log: {logged}")
    assert outcome is not None
    return outcome


def _record(out: Path, facts: dict[str, Any], crash: EndpointError | None, resumed: bool) -> None:
    """Mark the run as audited through a managed server: kind local, and the engine facts in target.engine."""
    manifest = load_manifest(out)
    notes = list(manifest.notes)
    if resumed:
        notes.append(f"resumed with a new {facts['engine']} server session: target.engine describes the last one")
    if crash is not None:
        notes.append(f"the {facts['engine']} server crashed during the audit: see {SERVER_LOG}")
    target = manifest.target.model_copy(update={"kind": "local", "engine": facts})
    write_manifest(out, manifest.model_copy(update={"target": target, "notes": notes}))


def request_for_resume(out: Path, launch: LaunchSpec, *, backoff: float) -> tuple[RunRequest, RunManifest]:
    """The unfinished managed run's request, from its manifest, aimed at the new server."""
    manifest = load_resumable(out)  # checked before the server starts, as `detaudit run --resume` does
    recorded = manifest.target.engine.get("engine") if manifest.target.engine.get("managed") else None
    if recorded != launch.engine:
        what = f"a managed {recorded} run" if recorded else "not a managed-engine run"
        raise UsageError(f"{out} is {what}; resume it with the command that made it")
    req = RunRequest(
        out=out,
        base_url=launch.base_url,
        model=manifest.target.model,
        api=manifest.target.api,
        prompts=manifest.prompts,
        repeats=manifest.repeats,
        concurrency=[a.concurrency for a in manifest.arms],
        params=manifest.params,
        stream=bool(manifest.environment.get("stream", False)),
        backoff=backoff,
        resume=True,
        suite=manifest.suite,
    )
    return req, manifest
