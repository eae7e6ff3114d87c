"""A run whose endpoint dies stops early (issue #21 item 3): the circuit breaker over requests that get no HTTP
answer at all ends the run `interrupted` within seconds, names the cause on one line with the command that finishes
it, and that command finishes it once the endpoint is back. Before, every remaining sample waited out its retries
(an hour for -n 1000 -c 1) and the run said `complete`."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

from runhelp import cli
from servers import spawn

from detaudit.rundir.io import load_manifest, read_samples


def _start(tmp_path: Path, port: int = 0) -> tuple[subprocess.Popen[str], str]:
    return spawn({"latency_s": 0.005}, tmp_path, port)


def test_killed_endpoint_stops_the_run_interrupted_and_resume_finishes_it(capsys, tmp_path) -> None:
    proc, base_url = _start(tmp_path)
    out = tmp_path / "run"
    killer = threading.Timer(0.5, proc.send_signal, (signal.SIGKILL,))  # mid-run: 2 x 300 requests take seconds
    killer.start()
    t0 = time.monotonic()
    try:
        args = ("run", "--base-url", base_url, "-p", "hi", "-n", 300, "-c", "1,4", "--retries", 1, "--backoff", 0.05)
        r = cli(capsys, *args, "--out", out)
    finally:
        killer.cancel()
        proc.kill()
        proc.wait()
    took = time.monotonic() - t0
    assert r.code == 3, r.err
    assert took < 20, f"the breaker took {took:.0f} s"
    last = r.err.splitlines()[-1]  # after the progress bars: one line
    assert last.startswith("error: stopped: the endpoint stopped answering"), r.err
    assert "cannot connect" in last or "connection broken" in last
    assert last.endswith(f"finish with: detaudit run --resume --out {out}")
    manifest = load_manifest(out)
    assert manifest.status == "interrupted"
    rows = read_samples(out).to_pylist()
    ok = sum(row["status"] == "ok" for row in rows)
    assert 0 < ok < 600 and len(rows) - ok <= 8  # a handful of failed requests, not thousands

    proc, _ = _start(tmp_path, port=int(base_url.rsplit(":", 1)[1].split("/")[0]))  # the endpoint is back
    try:
        r = cli(capsys, "run", "--resume", "--out", out)
    finally:
        proc.kill()
        proc.wait()
    assert r.code == 0, r.err
    assert load_manifest(out).status == "complete"
    rows = read_samples(out).to_pylist()
    assert len(rows) == 600 and all(row["status"] == "ok" for row in rows)


def test_error_answers_do_not_trip_the_breaker(scripted_server, capsys, tmp_path) -> None:
    """A 500 is an answer: the endpoint is there. Many failed requests still end `complete` (exit 3, with --resume)."""
    server = scripted_server(faults={"rate": 1.0, "kinds": ["500"], "prompts": ["hi"]})
    out = tmp_path / "run"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 12, "--retries", 0, "--out", out)
    assert r.code == 3 and "12 of 12 requests failed" in r.err, r.err
    assert f"resend them with: detaudit run --resume --out {out}" in r.err
    assert load_manifest(out).status == "complete"
