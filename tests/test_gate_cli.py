"""`detaudit gate` and `detaudit run --gate` end to end: real run directories, exit codes 0/1/2/3, one line per
rule, $GITHUB_STEP_SUMMARY, JUnit, baseline comparison, and bad input."""

from __future__ import annotations

import json
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from runhelp import FEYNMAN, NYC, QUEENS, cli
from test_report import MODAL, NEW_YORK, make_run


def stable(tmp_path, name="stable", text=MODAL):
    return make_run(tmp_path / name, {"c1": (1, [(text, 20)]), "c8": (8, [(text, 20)])})


def shaky(tmp_path, name="shaky"):
    return make_run(tmp_path / name, {"c1": (1, [(MODAL, 20)]), "c8": (8, [(MODAL, 17), (NEW_YORK, 3)])})


def test_gate_passes_exit_0_and_prints_one_line_per_rule(tmp_path, capsys):
    r = cli(capsys, "gate", stable(tmp_path), "--max-unique", "1", "--min-modal-share", "1")
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        "PASS max-unique ≤ 1 (3 checks)",
        "PASS min-modal-share ≥ 1 (2 checks)",
        "gate passed: 2 rules",
    ]


def test_gate_fails_exit_1_with_the_reason_per_failed_rule(tmp_path, capsys):
    r = cli(
        capsys, "gate", shaky(tmp_path), "--max-unique", "1", "--min-first-divergence", "3", "--min-modal-share", "0.8"
    )
    assert r.code == 1
    assert r.out.splitlines() == [
        "FAIL max-unique ≤ 1: feynman@all-arms 2 unique across arms; feynman@c8 2 unique in 20",
        "PASS min-modal-share ≥ 0.8 (2 checks)",
        "PASS min-first-divergence ≥ 3 tokens (2 checks)",
    ]
    assert r.err.strip() == "error: gate failed: 1 of 3 rules"


def test_gate_cannot_judge_exit_3_on_too_many_errors(tmp_path, capsys):
    run = make_run(tmp_path / "errs", {"c1": (1, [(MODAL, 20)]), "c8": (8, [(MODAL, 5)])}, errors={"c8": 15})
    r = cli(capsys, "gate", run, "--max-unique", "1", "--max-error-rate", "0.1")
    assert r.code == 3
    assert r.out.splitlines()[0] == "CANNOT JUDGE max-error-rate ≤ 0.1: feynman@c8 15/20 errors (75.0%)"
    assert "too many endpoint errors" in r.err


def test_gate_against_baseline_same_modal_and_unique_increase(tmp_path, capsys):
    base = stable(tmp_path, "base")
    r = cli(capsys, "gate", shaky(tmp_path), "--baseline", base, "--require-same-modal", "--max-unique-increase", "1")
    assert r.code == 0, r.out + r.err
    r = cli(capsys, "gate", shaky(tmp_path, "shaky2"), "--baseline", base, "--max-unique-increase", "0")
    assert r.code == 1
    assert r.out.splitlines() == [f"FAIL max-unique-increase ≤ +0 over {base}: feynman@c8 vs baseline@c8 1 → 2 unique"]
    moved = stable(tmp_path, "moved", text=NEW_YORK)
    r = cli(capsys, "gate", moved, "--baseline", base, "--require-same-modal")
    assert r.code == 1
    assert "FAIL require-same-modal" in r.out and "modal completion differs" in r.out


def test_gate_refuses_a_baseline_of_other_prompts(tmp_path, capsys):
    other = make_run(tmp_path / "other", {"c1": (1, [(MODAL, 5)])}, prompt="Something else")
    r = cli(capsys, "gate", stable(tmp_path), "--baseline", other, "--require-same-modal")
    assert r.code == 2
    assert "prompt 'feynman' differs between the run and baseline" in r.err


def test_gate_bad_input_exits_2(tmp_path, capsys):
    r = cli(capsys, "gate", tmp_path / "missing", "--max-unique", "1")
    assert (r.code, "no such run directory" in r.err) == (2, True)
    (tmp_path / "empty").mkdir()
    r = cli(capsys, "gate", tmp_path / "empty", "--max-unique", "1")
    assert (r.code, "not a detaudit run directory" in r.err) == (2, True)
    run = stable(tmp_path)
    (run / "samples.parquet").write_bytes(b"PAR1 garbage")
    r = cli(capsys, "gate", run, "--max-unique", "1")
    assert (r.code, "corrupt or unreadable Parquet" in r.err) == (2, True)
    r = cli(capsys, "gate", stable(tmp_path, "ok"))
    assert (r.code, "no gate rule given" in r.err) == (2, True)
    r = cli(capsys, "gate", stable(tmp_path, "ok2"), "--require-same-modal")
    assert (r.code, "need --baseline" in r.err) == (2, True)
    unfinished = make_run(tmp_path / "unfinished", {"c1": (1, [(MODAL, 5)])}, status="started")
    r = cli(capsys, "gate", unfinished, "--max-unique", "1")
    assert (r.code, "run is started, not complete" in r.err) == (2, True)


def test_gate_outputs_never_replace_the_run_files(tmp_path, capsys):
    run = stable(tmp_path)
    manifest = (run / "manifest.json").read_bytes()
    r = cli(capsys, "gate", run, "--max-unique", "1", "--md", run / "manifest.json")
    assert (r.code, r.err.count("\n"), "belongs to the run directory" in r.err) == (2, 1, True)
    assert (run / "manifest.json").read_bytes() == manifest
    r = cli(capsys, "gate", run, "--max-unique", "1", "--junit", tmp_path)
    assert (r.code, r.err.count("\n"), "is a directory" in r.err) == (2, 1, True)


def test_gate_refuses_bad_output_paths_before_printing_or_writing(tmp_path, capsys):
    run = shaky(tmp_path)
    missing_parent = tmp_path / "no-such-dir" / "gate.md"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        ("--md", missing_parent, "directory " + str(missing_parent.parent) + " does not exist"),
        ("--junit", tmp_path, "is a directory"),
        ("--md", a_file / "gate.md", "is not a directory"),
        ("--junit", Path("/proc/self/gate.xml"), "is not writable"),  # not even root may create files there
    ]
    for option, path, message in cases:
        good = tmp_path / f"good{option}"  # the other output, valid: it must not be written either
        other = "--junit" if option == "--md" else "--md"
        r = cli(capsys, "gate", run, "--max-unique", "1", option, path, other, good)
        assert (r.code, r.out, r.err.count("\n")) == (2, "", 1), (option, path, r)
        assert message in r.err and option in r.err, r.err
        assert not good.exists() and not missing_parent.parent.exists()
    r = cli(capsys, "gate", run, "--max-unique", "1", "--md", tmp_path / "same", "--junit", tmp_path / "same")
    assert (r.code, r.out, "--md and --junit name the same file" in r.err) == (2, "", True)


def test_gate_writes_through_links_and_into_pipes_without_replacing_them(tmp_path, capsys):
    """The atomic rename replaced a symlink, a FIFO, and as root /dev/null or /dev/stdout, with a regular file."""
    run = stable(tmp_path)
    target = tmp_path / "real.md"
    target.write_text("old")
    link = tmp_path / "link.md"
    link.symlink_to(target)
    fifo = tmp_path / "pipe.xml"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader waits, as `cat pipe.xml` would
    try:
        r = cli(capsys, "gate", run, "--max-unique", "1", "--md", link, "--junit", fifo)
        assert r.code == 0, r.err
        assert link.is_symlink() and "detaudit gate" in target.read_text()
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and b"<testsuites" in os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    into_run = tmp_path / "sneaky.md"
    into_run.symlink_to(run / "manifest.json")
    r = cli(capsys, "gate", run, "--max-unique", "1", "--md", into_run)
    assert (r.code, r.out, "points into the run directory" in r.err) == (2, "", True)
    dangling = tmp_path / "dangling.md"
    dangling.symlink_to(tmp_path / "nowhere" / "x.md")
    r = cli(capsys, "gate", run, "--max-unique", "1", "--md", dangling)
    assert (r.code, r.out, "which does not exist" in r.err) == (2, "", True)


def test_gate_writes_step_summary_junit_and_markdown(tmp_path, capsys, monkeypatch):
    step = tmp_path / "step_summary.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    r = cli(
        capsys, "gate", shaky(tmp_path), "--max-unique", "1", "--min-modal-share", "0.5", "--junit", junit, "--md", md
    )
    assert r.code == 1
    summary = step.read_text()
    assert summary.startswith("earlier step\n## detaudit gate ❌ failed\n")
    failed = "feynman@all-arms: 2 unique across arms; feynman@c8: 2 unique in 20"
    assert f"| max-unique | ≤ 1 | **FAIL** ({failed}) |" in summary
    assert "### Audit" in summary
    assert "| shaky | endpoint http://127.0.0.1:9/v1 (chat) | c8 (8 requests in flight) | 20/20 | **2** |" in summary
    assert md.read_text() in summary
    root = ET.parse(junit).getroot()
    assert [(c.get("name"), c.find("failure") is not None) for c in root.iter("testcase")] == [
        ("feynman@all-arms ≤ 1", True),
        ("feynman@c1 ≤ 1", False),
        ("feynman@c8 ≤ 1", True),
        ("feynman@c1 ≥ 0.5", False),
        ("feynman@c8 ≥ 0.5", False),
    ]


def test_run_with_gate_judges_the_finished_run(scripted_server, capsys, tmp_path):
    server = scripted_server(completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 18), ("N", 2)]})
    args = ["run", "--base-url", server.base_url, "-p", FEYNMAN, "-n", 20, "--json"]
    r = cli(capsys, *args, "--out", tmp_path / "a", "--gate", "max-unique=2,min-first-divergence=5")
    assert r.code == 0, r.err
    assert json.loads(r.out)["schema"] == "detaudit.summary/1"  # gate lines went to stderr
    assert "PASS max-unique ≤ 2" in r.err and "PASS min-first-divergence ≥ 5 tokens" in r.err
    r = cli(
        capsys,
        *args,
        "--out",
        tmp_path / "b",
        "--gate",
        "max-unique=1",
        "--gate",
        f"baseline={tmp_path / 'a'}",
        "--gate",
        "require-same-modal",
    )
    assert r.code == 1
    assert "FAIL max-unique ≤ 1: " in r.err and "PASS require-same-modal" in r.err
    r = cli(capsys, *args, "--out", tmp_path / "c", "--gate", "max-uniq=1")
    assert r.code == 2 and "unknown rule 'max-uniq'" in r.err
    assert not (tmp_path / "c").exists()  # refused before any request
