"""The managed-engine lifecycle with a real engine: `detaudit serve` of a tiny offline model on CPU, started by
`detaudit local --engine command`: start, health wait, audit, clean stop; a crash mid-audit; a busy port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from runhelp import cli

from detaudit.rundir.io import load_manifest, read_samples

pytestmark = pytest.mark.slow
DETAUDIT = shutil.which("detaudit") or "detaudit"
SERVE = f"{DETAUDIT} serve --model {{model}} --port {{port}} --dtype float32 --max-batch 8"


def _closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _pids_with_env(mark: str) -> list[int]:
    """Processes whose environment holds `mark` (how the test finds the server detaudit started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_detaudit_serve_start_audit_clean_stop(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    res = cli(
        capsys,
        "local",
        "--engine",
        "command",
        "--model",
        tiny_model_dir,
        "--server-cmd",
        SERVE,
        "--suite",
        "smoke",
        "-n",
        "3",
        "--concurrency",
        "1,3",
        "--max-tokens",
        "8",
        "--out",
        out,
    )
    assert res.code == 0, res.err
    manifest = load_manifest(out)
    eng = manifest.target.engine
    assert manifest.status == "complete" and manifest.capture == "token_ids"
    assert eng["command"][1:4] == ["serve", "--model", str(tiny_model_dir)] and not eng["crashed"]
    assert eng["served_models"] == [str(tiny_model_dir)] and manifest.target.model == str(tiny_model_dir)
    assert read_samples(out, columns=["status"]).column("status").to_pylist() == ["ok"] * 18
    log = (out / "server.log").read_text()
    assert "serving" in log and "shut down cleanly" in log  # SIGTERM reached it and it stopped gracefully
    assert _closed(eng["port"])


def test_detaudit_serve_killed_mid_audit_is_exit_3(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    mark = f"DETAUDIT_TEST_MARK={uuid.uuid4().hex}"
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_when_auditing() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "shards").is_dir():
            time.sleep(0.05)
        for pid in _pids_with_env(mark):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_auditing, daemon=True)
    killer.start()
    res = cli(
        capsys,
        "local",
        "--engine",
        "command",
        "--model",
        tiny_model_dir,
        "--server-cmd",
        SERVE,
        "--server-env",
        mark,
        "--suite",
        "smoke",
        "-n",
        "400",
        "--concurrency",
        "1",
        "--max-tokens",
        "8",
        "--out",
        out,
    )
    killer.join(timeout=10)
    assert killed
    assert res.code == 3, res.err
    assert "server exited with code -9 during the audit" in res.err and "last log lines" in res.err
    manifest = load_manifest(out)
    assert manifest.status == "interrupted" and manifest.target.engine["crashed"]


def test_busy_port_is_refused_before_the_model_loads(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = cli(
            capsys,
            "local",
            "--engine",
            "command",
            "--model",
            tiny_model_dir,
            "--server-cmd",
            SERVE,
            "--port",
            port,
            "--suite",
            "smoke",
            "--out",
            tmp_path / "run",
        )
    assert res.code == 2 and f"--port {port}: something already listens on 127.0.0.1:{port}" in res.err
    assert not (tmp_path / "run").exists()
