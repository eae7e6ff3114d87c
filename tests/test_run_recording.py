"""The recorder never loses a row, the run's status and exit code tell the truth, and run directories are checked
before anything trusts them (#15): through real runs against the scripted server, as the user would see them.

Manifest status vs exit code vs rows on disk:

- complete: exit 0 (3 when more than half the requests failed), rows on disk == expected, each index once;
- interrupted: exit 130 (Ctrl-C, SIGTERM), every finished row on disk (tests/test_reliability.py);
- failed: exit 3, recording failed (a shard that could not be written, a value Parquet refuses); what could be kept
  is on disk and `--resume` finishes the run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from runhelp import DETAUDIT, QUEENS, cli, tree_snapshot
from scripted_server import ScriptedServer

from detaudit.rundir.io import load_manifest, read_samples, rows_to_table

# What a server's JSON "\ud800" decodes to: a lone surrogate, which no UTF-8 column can hold. (The answer parser
# may refuse it first; the writer must survive it either way.)
POISON = [{"token": "\ud800", "bytes": [0xED, 0xA0, 0x80]}, {"token": " tail"}]


def _indices(out: Path) -> Counter:
    return Counter(read_samples(out, ["sample_index"]).column("sample_index").to_pylist())


PROGRESS = re.compile(r"arm \S+: \d+/\d+ ")


def _one_error_line(err: str) -> str:
    # progress aside: bars on a terminal, plain "arm c1: 3/10 (30%), ..." lines elsewhere
    lines = [line for line in err.strip().splitlines() if line.strip() and not PROGRESS.match(line) and "━" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


def test_a_poisoned_answer_never_costs_a_row_and_the_status_tells(scripted_server, capsys, tmp_path):
    """Either the answer parser turns the poison into an error row (or retries it), and the run completes; or it
    lets it through and the writer keeps that row as an `unwritable` error row, stops the run (exit 3, failed) and
    --resume finishes it. Both ways every index is on disk exactly once and status, exit code and rows agree."""
    server = scripted_server(completions={"Q": QUEENS, "P": POISON}, schedules={"hi": [("Q", 29), ("P", 1)]})
    out = tmp_path / "poisoned"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 30, "-c", 4, "--out", out)
    assert all(n == 1 for n in _indices(out).values())
    errors = [row for row in read_samples(out).to_pylist() if row["status"] == "error"]
    if r.code == 0:  # the parser caught it
        assert load_manifest(out).status == "complete" and _indices(out) == Counter(range(30))
        assert all(row["error_reason"].startswith("malformed") for row in errors) and len(errors) <= 1
        return
    line = _one_error_line(r.err)
    assert r.code == 3 and "recording failed, run stopped:" in line and "status failed" in line
    assert line.endswith(f"finish with: detaudit run --resume --out {out}")
    assert load_manifest(out).status == "failed" and not (out / "summary.json").exists()
    assert [row["error_reason"] for row in errors] == ["unwritable"] and "\\ud800" in errors[0]["error"]
    # The same endpoint, now well: --resume takes the failed run and finishes it.
    port = server.port
    server.stop()
    with ScriptedServer(completions={"Q": QUEENS}, default="Q", port=port) as well:
        r = cli(capsys, "run", "--resume", "--out", out, "--json")
        assert r.code == 0, r.err
        assert well.stats["ok"] >= 1
    assert load_manifest(out).status == "complete" and _indices(out) == Counter(range(30))
    assert all(row["status"] == "ok" for row in read_samples(out).to_pylist())


def test_a_shard_directory_that_cannot_be_written_stops_the_run_at_once(scripted_server, tmp_path):
    """The flush that fails is retried once, then the run stops (it does not go on answering into the void)."""
    server = scripted_server(completions={"Q": QUEENS}, default="Q", latency_s=0.05)
    out = tmp_path / "unwritable"
    cmd = [DETAUDIT, "run", "--base-url", server.base_url, "-p", "hi", "-n", "400", "-c", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ((out / "shards").is_dir() and any((out / "shards").glob("part-*.parquet"))):
        assert time.monotonic() < deadline and proc.poll() is None, "no shard written"
        time.sleep(0.02)
    (out / "shards").rename(out / "kept")  # root ignores permission bits: a file where the directory was stops it
    (out / "shards").write_text("in the way")
    _, err = proc.communicate(timeout=60)
    line = _one_error_line(err)
    assert proc.returncode == 3 and "cannot write" in line and "NotADirectoryError" in line
    assert f"detaudit run --resume --out {out}" in line
    assert load_manifest(out).status == "failed"
    (out / "shards").unlink()
    (out / "kept").rename(out / "shards")
    kept = _indices(out)
    assert 0 < len(kept) < 400 and set(kept.values()) == {1}  # stopped long before the end, nothing twice
    r = subprocess.run([DETAUDIT, "run", "--resume", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_manifest(out).status == "complete" and _indices(out) == Counter(range(400))


def _good_run(server: ScriptedServer, capsys, out: Path, n: int = 4) -> Path:
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", n, "-c", "1,2", "--out", out)
    assert r.code == 0, r.err
    return out


def test_resume_refuses_a_stray_shard_before_touching_the_manifest(scripted_server, capsys, tmp_path):
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    run = _good_run(server, capsys, tmp_path / "run")
    (run / "shards").mkdir()
    shutil.copy(run / "samples.parquet", run / "shards" / "part-x.parquet")  # a real detaudit file, wrong name
    before = tree_snapshot(run)
    r = cli(capsys, "run", "--resume", "--out", run)
    assert r.code == 2 and "part-x.parquet: not a shard detaudit wrote" in _one_error_line(r.err)
    assert tree_snapshot(run) == before


def test_force_through_a_symlink_or_over_foreign_files_is_refused(scripted_server, capsys, tmp_path):
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    run = _good_run(server, capsys, tmp_path / "run")
    link = tmp_path / "link"
    link.symlink_to(run)
    before = tree_snapshot(run)
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 2, "--out", link, "--force")
    assert r.code == 2 and "is a symlink" in _one_error_line(r.err)
    (run / "my-notes.md").write_text("mine")
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 2, "--out", run, "--force")
    assert r.code == 2 and "my-notes.md was not written by detaudit" in _one_error_line(r.err)
    assert tree_snapshot(run) == {**before, "my-notes.md": b"mine"}
    (run / "my-notes.md").unlink()
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 2, "--out", run, "--force")
    assert r.code == 0 and _indices(run) == Counter(range(2))  # a run directory alone is replaced


def _rewrite(run: Path, edit) -> None:
    rows = read_samples(run).to_pylist()
    edit(rows)
    pq.write_table(rows_to_table(rows), run / "samples.parquet")


EDITS = {
    "negative index": (lambda rows: rows[0].update(sample_index=-5), "sample_index -5 is outside 0..7"),
    "huge index": (lambda rows: rows[0].update(sample_index=10**12), "sample_index 1000000000000 is outside 0..7"),
    "unknown status": (lambda rows: rows[3].update(status="maybe"), "sample 3 has status 'maybe'"),
    "arm moved": (lambda rows: rows[0].update(arm="c2"), "sample 0 has arm 'c2', but the manifest's sample 0 is arm"),
}


@pytest.mark.parametrize("command", ["analyze", "report", "gate", "compare"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_analysis_refuses_an_edited_run_directory(scripted_server, capsys, tmp_path, command, edit):
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    good = _good_run(server, capsys, tmp_path / "good")
    run = _good_run(server, capsys, tmp_path / "edited")
    mutate, message = EDITS[edit]
    _rewrite(run, mutate)
    args = {"compare": [good, run], "gate": [run, "--max-unique", 1]}.get(command, [run])
    r = cli(capsys, command, *args)
    assert r.code == 2 and message in _one_error_line(r.err), r.err


def test_a_manifest_without_arms_or_nested_too_deeply_is_exit_2(scripted_server, capsys, tmp_path):
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    run = _good_run(server, capsys, tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "arms": []}))
    r = cli(capsys, "analyze", run)
    assert r.code == 2 and "invalid manifest at arms: List should have at least 1 item" in _one_error_line(r.err)
    (run / "manifest.json").write_text('{"schema": "detaudit.run/1", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    for args in (["analyze", run], ["run", "--resume", "--out", run]):
        r = cli(capsys, *args)
        assert r.code == 2 and "nested too deeply" in _one_error_line(r.err)
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 2, "--out", run, "--force")
    assert r.code == 2 and "not a detaudit run directory" in _one_error_line(r.err)
