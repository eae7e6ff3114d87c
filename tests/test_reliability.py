"""Reliability of `detaudit run`: faults at 20 %, kill -9 and --resume, SIGINT, many connections, odd output.

The full-size versions (20 kills, 10,000 requests at concurrency 1,024) are benchmarks/crash_loop.py and
benchmarks/load_test.py; their figures are in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from runhelp import DETAUDIT, FEYNMAN, NYC, QUEENS, cli

from detaudit.rundir.io import load_manifest, read_samples


def _check_exactly_once(out: Path, expected: int) -> list[dict]:
    rows = read_samples(out).to_pylist()
    idx = Counter(row["sample_index"] for row in rows)
    assert sorted(idx) == list(range(expected)) and set(idx.values()) == {1}
    for row in rows:
        assert (row["status"] == "ok") == (row["error"] is None)
        assert (row["status"] == "ok") == (row["text"] is not None)
    return rows


def test_twenty_percent_faults_n1000(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC},
        schedules={FEYNMAN: [("Q", 990), ("N", 10)]},
        faults={"rate": 0.2, "seed": 7, "retry_after": 0.02, "hang_s": 2.5, "prompts": [FEYNMAN]},
    )
    out = tmp_path / "faults"
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "-p",
        FEYNMAN,
        "-n",
        1000,
        "-c",
        32,
        "--retries",
        6,
        "--backoff",
        0.01,
        "--timeout",
        2,
        "--out",
        out,
        "--json",
    )
    assert r.code == 0, r.err
    kinds = server.stats["faults"]
    assert sum(kinds.values()) > 150 and len(kinds) == 10  # (truncated_sse resets a non-streamed answer)
    rows = _check_exactly_once(out, 1000)
    ok = [row for row in rows if row["status"] == "ok"]
    failed = [row for row in rows if row["status"] == "error"]
    assert max(row["attempts"] for row in rows) <= 7 and any(row["attempts"] > 1 for row in ok)
    assert all(row["attempts"] == 7 and row["error"] for row in failed)
    summary = json.loads(r.out)
    assert summary["samples"] == {
        "expected": 1000,
        "rows": 1000,
        "ok": len(ok),
        "errors": len(failed),
        "truncated": 0,  # every answer the server completed ended with a stated finish_reason
    }
    counts = Counter(tuple(row["token_ids"]) for row in ok)
    if not failed:  # each answer the server completed is exactly one ok row: the schedule's counts come back
        assert counts == {tuple(server.token_ids("Q")): 990, tuple(server.token_ids("N")): 10}
    # Nothing answered twice or lost: every answer the server completed is one ok row (plus the probe's 4 answers:
    # seed, logprobs alone, logprobs with return_token_ids, a stream).
    # (--timeout 2 s leaves room for a slow CI machine: only the injected 2.5 s hangs time out.)
    assert server.stats["ok"] - len(ok) == 4


def test_streamed_faults_and_retries_flag(scripted_server, capsys, tmp_path) -> None:
    faults = {"rate": 0.2, "seed": 11, "kinds": ["truncated_sse", "reset", "503", "malformed"], "prompts": ["hi"]}
    server = scripted_server(completions={"Q": QUEENS}, default="Q", faults=faults)
    out = tmp_path / "stream"
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "-p",
        "hi",
        "-n",
        200,
        "-c",
        8,
        "--stream",
        "--retries",
        0,
        "--out",
        out,
    )
    assert r.code == 0, r.err
    rows = _check_exactly_once(out, 200)
    failed = [row for row in rows if row["status"] == "error"]
    assert server.stats["faults"]["truncated_sse"] > 0
    assert len(failed) == sum(server.stats["faults"].values())  # --retries 0: every fault is a failed row
    assert {row["attempts"] for row in rows} == {1}
    assert any("truncated" in row["error"] for row in failed)
    assert all(row["text"] == server.text("Q") for row in rows if row["status"] == "ok")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [DETAUDIT, "run", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(pred, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_kill_9_then_resume_loses_and_duplicates_nothing(scripted_server, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 9), ("N", 1)]}, latency_s=0.01
    )
    out = tmp_path / "killed"
    n, rng = 300, random.Random(5)
    proc = _start("--base-url", server.base_url, "-p", FEYNMAN, "-n", n, "-c", "1,8", "--out", out)
    for _ in range(3):
        _wait_for(lambda: (out / "manifest.json").exists())
        time.sleep(rng.uniform(0.3, 1.5))
        if proc.poll() is not None:  # a fast machine finished before this kill: the final checks still apply
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert load_manifest(out).status == "started"  # killed: never got to mark itself
        for part in list((out / "shards").glob("part-*.parquet")) if (out / "shards").exists() else []:
            pq.read_table(part)  # every shard on disk is whole
        proc = _start("--resume", "--out", out)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert load_manifest(out).status == "complete"
    rows = _check_exactly_once(out, 2 * n)
    assert all(row["status"] == "ok" for row in rows)
    assert not (out / "shards").exists()


def test_kill_9_with_a_poisoned_answer_in_the_stream_loses_nothing(scripted_server, tmp_path) -> None:
    """One answer in 50 carries a lone-surrogate token. The parser may make it an error row; if it lets it through,
    the writer keeps it as an `unwritable` error row and the run stops failed (exit 3). Kills and resumes (of
    killed and of failed runs alike) end with every index once, and status and exit code agree each time."""
    poison = [{"token": "\ud800", "bytes": [0xED, 0xA0, 0x80]}]
    server = scripted_server(
        completions={"Q": QUEENS, "P": poison}, schedules={FEYNMAN: [("Q", 49), ("P", 1)]}, latency_s=0.01
    )
    out = tmp_path / "poisoned"
    n, rng = 150, random.Random(3)
    proc = _start("--base-url", server.base_url, "-p", FEYNMAN, "-n", n, "-c", "1,8", "--out", out)
    for _ in range(2):
        _wait_for(lambda: (out / "manifest.json").exists())
        time.sleep(rng.uniform(0.3, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert load_manifest(out).status in ("started", "failed", "complete")
        assert set(Counter(read_samples(out, ["sample_index"]).column(0).to_pylist()).values()) <= {1}
        proc = _start("--resume", "--out", out)
    codes = []
    for _ in range(10):  # each resume may meet the poison again
        proc.communicate(timeout=120)
        status = load_manifest(out).status
        codes.append(proc.returncode)
        assert (proc.returncode, status) in ((0, "complete"), (3, "failed")), (proc.returncode, status)
        if proc.returncode == 0:
            break
        proc = _start("--resume", "--out", out)
    assert codes[-1] == 0, codes
    rows = _check_exactly_once(out, 2 * n)
    assert all(row["status"] == "ok" or row["error_reason"].startswith("malformed") for row in rows)
    assert not (out / "shards").exists()


def test_sigint_flushes_and_prints_the_resume_command(scripted_server, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", latency_s=0.02)
    out = tmp_path / "sigint"
    proc = _start(
        "--base-url",
        server.base_url,
        "-p",
        "hi",
        "-n",
        600,
        "-c",
        4,
        "--out",
        out,
        "--header",
        "X-Team: secret-team-value",
    )
    _wait_for(lambda: (out / "shards").is_dir() and any((out / "shards").glob("part-*.parquet")))
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"detaudit run --resume --out {out} --header 'X-Team: …'" in stderr
    assert "secret-team-value" not in stderr + stdout
    manifest = load_manifest(out)
    assert manifest.status == "interrupted"
    done = read_samples(out).num_rows
    assert 0 < done < 600
    proc = subprocess.run([DETAUDIT, "run", "--resume", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "pass --header again" in proc.stderr
    proc = subprocess.run(
        [DETAUDIT, "run", "--resume", "--out", str(out), "--header", "X-Team: secret-team-value"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _check_exactly_once(out, 600)


def test_sigterm_is_an_interrupt_too(scripted_server, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", latency_s=0.02)
    out = tmp_path / "sigterm"
    proc = _start("--base-url", server.base_url, "-p", "hi", "-n", 400, "-c", 2, "--out", out)
    _wait_for(lambda: (out / "shards").is_dir() and any((out / "shards").glob("part-*.parquet")))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"detaudit run --resume --out {out}" in stderr
    assert load_manifest(out).status == "interrupted" and 0 < read_samples(out).num_rows < 400


def test_many_connections_no_fd_leak(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", latency_s=0.05)
    fds_before = len(os.listdir("/proc/self/fd"))
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 1500, "-c", 256, "--out", tmp_path / "load")
    assert r.code == 0, r.err
    assert server.stats["max_in_flight"] > 128
    _check_exactly_once(tmp_path / "load", 1500)
    # the server (in this process) notices the closed connections within moments
    _wait_for(lambda: server.open_connections == 0 and len(os.listdir("/proc/self/fd")) <= fds_before + 8, 15)


@pytest.mark.parametrize("capture", ["vllm", "text"])
def test_odd_model_output_is_recorded_exactly(capture, scripted_server, capsys, tmp_path) -> None:
    long = [f" w{i}" for i in range(4000)]
    odd = [{"token": "\ufffd", "bytes": [0xE2, 0x82]}, {"token": "\ufffd", "bytes": [0xAC]}, "\x00", "nul\x00end"]
    server = scripted_server(
        completions={"empty": [], "long": long, "odd": odd},
        schedules={"e": "empty", "l": "long", "o": "odd"},
        capture=capture,
    )
    out = tmp_path / capture
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "-p",
        "e",
        "-p",
        "l",
        "-p",
        "o",
        "-n",
        3,
        "-c",
        "1,3",
        "--out",
        out,
        "--json",
    )
    assert r.code == 0, r.err
    rows = _check_exactly_once(out, 18)
    by_prompt = {row["prompt_id"]: row for row in rows}
    assert by_prompt["p0"]["text"] == "" and by_prompt["p1"]["text"] == "".join(long)
    assert by_prompt["p2"]["text"] == "\ufffd\ufffd\x00nul\x00end"
    if capture == "vllm":
        assert by_prompt["p0"]["token_ids"] == [] and len(by_prompt["p1"]["token_ids"]) == 4000
        assert by_prompt["p2"]["token_bytes"][:2] == [b"\xe2\x82", b"\xac"]  # one "€" split over two tokens
    summary = json.loads(r.out)
    assert [p["unique"] for p in summary["unique_per_prompt"]] == [1, 1, 1]


def test_logprobs_missing_half_way_lowers_the_capture(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC},
        schedules={FEYNMAN: [("Q", 19), ("N", 1)]},
        capture="openai",
        drop_logprobs_after=13,  # the probe's 3 answers + 10
    )
    out = tmp_path / "half"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", FEYNMAN, "-n", 20, "--out", out, "--json")
    assert r.code == 0, r.err
    manifest = load_manifest(out)
    assert manifest.probe["capture"] == "tokens" and manifest.capture == "text"
    assert any("capture dropped from tokens to text on 10 of 20" in n for n in manifest.notes)
    rows = read_samples(out).to_pylist()
    assert sum(row["tokens"] is None for row in rows) == 10
    summary = json.loads(r.out)
    assert summary["unit"] == "text" and summary["unique_per_prompt"][0]["unique"] == 2
