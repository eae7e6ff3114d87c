"""Ctrl-C stops `detaudit demo` at once, whatever step it is in (issue #21 item 4): exit 130 with one line saying
what was kept and how to start over, and the next demo in that directory needs no --force. Before, the first Ctrl-C
ended only the audit step and the demo went on into its minutes-long rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from runhelp import DETAUDIT

from detaudit.demo import DemoSettings, _prepare, missing_parts

pytestmark = pytest.mark.skipif(bool(missing_parts()), reason="the demo needs the local extra")


def _interrupt_demo(out: Path, when: str) -> tuple[int, str, str, float]:
    """Start a real `detaudit demo`, send SIGINT once a stdout line contains `when`; returns exit code, stdout,
    stderr and the seconds from SIGINT to exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [DETAUDIT, "demo", "--out", str(out), "--model", "tiny", "-n", "200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines, sent = [], 0.0
    try:
        for line in proc.stdout:
            lines.append(line)
            if when in line and not sent:
                proc.send_signal(signal.SIGINT)
                sent = time.monotonic()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert sent, "".join(lines)
    return proc.returncode, "".join(lines), proc.stderr.read(), time.monotonic() - sent


def test_ctrl_c_during_the_audit_stops_the_whole_demo_and_the_next_one_needs_no_force(tmp_path) -> None:
    out = tmp_path / "demo"
    # The audit's first progress line past 0: the endpoint is served and answering.
    code, stdout, stderr, took = _interrupt_demo(out, "arm c1: ")
    assert code == 130, stderr
    assert took < 10, f"the demo took {took:.1f} s to stop"
    assert "rerunning it locally" not in stdout and not (out / "runs" / "local-batch-invariant").exists()
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted during the endpoint audit: the demo stopped."), stderr
    assert f"Kept in {out} (unfinished): model, runs/endpoint-stock." in last
    assert f"`detaudit demo --out {out}` starts over and replaces it, no --force needed." in last
    assert "status: interrupted" in (out / ".detaudit-demo").read_text()

    _prepare(DemoSettings(out=out))  # what the next `detaudit demo --out DIR` does first: no --force asked
    assert not (out / "model").exists() and not (out / "runs").exists()
    assert "status: running" in (out / ".detaudit-demo").read_text()


def test_ctrl_c_while_the_model_is_built_stops_the_demo_too(tmp_path) -> None:
    code, stdout, stderr, took = _interrupt_demo(tmp_path / "demo", "model: a tiny qwen3")
    assert code == 130 and took < 10, stderr
    assert "auditing it" not in stdout
    assert stderr.strip().splitlines()[-1].startswith("interrupted during the model build: the demo stopped.")
