"""Positions say their unit everywhere (a text-only run counts characters), partial runs say they are partial, the
gate's lines read as English, and `compare` refuses runs of different models or APIs unless told otherwise."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from detaudit.reports.html import render_html
from detaudit.reports.junit import report_junit
from detaudit.reports.markdown import render_markdown
from detaudit.reports.pipeline import load_runs
from detaudit.reports.view_model import build_report
from runhelp import FEYNMAN, NYC, QUEENS, cli
from test_analysis import ids_rows, make_run
from test_report import MODAL
from test_report import make_run as make_report_run

from detaudit.rundir.io import load_manifest, write_manifest

# "Richard Feynman was born in" and the space of " Queens" / " New": a text run forks at character 28, a token run
# at token 5.
TEXT_FORK = len("".join(QUEENS[:5])) + 1


def _run(capsys, server, out: Path, n: int = 8) -> Path:
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", FEYNMAN, "-n", n, "-c", 1, "--out", out)
    assert r.code == 0, r.err
    return out


@pytest.fixture
def text_run(scripted_server, capsys, tmp_path) -> Path:
    """A run against a server without logprobs (capture="text"): 7 × Queens, 1 × New York City, compared as text."""
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 7), ("N", 1)]}, capture="text"
    )
    run = _run(capsys, server, tmp_path / "text")
    assert load_manifest(run).capture == "text"
    return run


# ---------------------------------------------------------------- item 6: units


def test_a_text_run_counts_characters_in_every_output(text_run, capsys):
    r = cli(capsys, "analyze", text_run)
    assert r.code == 0, r.err
    assert "forks in c1 (@ characters):" in r.out and f"@{TEXT_FORK} " in r.out

    report = build_report(load_runs([text_run]))
    md = render_markdown(report)
    assert f"first fork is at character {TEXT_FORK}" in md
    assert f"| character {TEXT_FORK} (median {TEXT_FORK}) |" in md
    assert f"- **text · c1**: character {TEXT_FORK}: “Q” ×7 / “N” ×1" in md
    assert "at token" not in md and "first div. (character)" in md

    page = render_html(report)
    assert f"character {TEXT_FORK} · 8 samples" in page and "Aligned character view" in page
    assert f"diverges at character {TEXT_FORK}" in page and "at token" not in page

    failure = next(ET.fromstring(report_junit(report)).iter("failure"))
    assert failure.get("message") == f"2 unique completions in 8; first divergence at character {TEXT_FORK}"


def test_the_gate_reads_and_states_a_text_runs_threshold_in_characters(text_run, capsys):
    r = cli(capsys, "gate", text_run, "--min-first-divergence", 32)
    assert r.code == 1
    assert f"FAIL min-first-divergence ≥ 32 characters: p0@c1 first divergence at character {TEXT_FORK}" in r.out, r.out
    r = cli(capsys, "gate", text_run, "--min-first-divergence", TEXT_FORK)
    assert r.code == 0 and f"PASS min-first-divergence ≥ {TEXT_FORK} characters (1 check)" in r.out, r.out


def test_a_token_run_keeps_tokens(scripted_server, capsys, tmp_path):
    server = scripted_server(completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 7), ("N", 1)]})
    run = _run(capsys, server, tmp_path / "tokens")
    r = cli(capsys, "gate", run, "--min-first-divergence", 6)
    assert r.code == 1 and "FAIL min-first-divergence ≥ 6 tokens: p0@c1 first divergence at token 5" in r.out


def test_a_baseline_in_another_unit_is_refused_for_unique_counts(text_run, scripted_server, capsys, tmp_path):
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    tokens = _run(capsys, server, tmp_path / "tokens")
    r = cli(capsys, "gate", text_run, "--baseline", tokens, "--max-unique-increase", 0)
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    assert "compares completions as token_ids (positions in tokens), the run as text (characters)" in r.err
    assert "not comparable" in r.err
    # the modal text is the one record both have: that rule still runs
    r = cli(capsys, "gate", text_run, "--baseline", tokens, "--require-same-modal")
    assert r.code == 0, r.out + r.err


# ---------------------------------------------------------------- item 7: partial runs


def _interrupted(tmp_path: Path) -> Path:
    """8 identical samples recorded of 48 asked, the run interrupted."""
    run = make_report_run(tmp_path / "cut", {"c1": (1, [(MODAL, 8)])})
    manifest = load_manifest(run)
    write_manifest(run, manifest.model_copy(update={"repeats": 48, "status": "interrupted"}))
    return run


def test_an_interrupted_run_says_so_and_claims_no_agreement(tmp_path, capsys):
    run = _interrupted(tmp_path)
    report = build_report(load_runs([run]))
    assert report.runs[0].incomplete == "interrupted: 8 of 48 samples recorded"
    md = render_markdown(report)
    assert "> **cut is incomplete** (interrupted: 8 of 48 samples recorded)" in md
    assert "| c1 (one request at a time) | 8/48 |" in md
    assert "(incomplete run, interrupted: 8 of 48 samples recorded: only those are judged)" in md
    page = render_html(report)
    assert "not claimed: the run is incomplete" in page and "fully identical" not in page
    assert "8/48 asked" in page

    r = cli(capsys, "analyze", run)
    assert r.code == 0, r.err
    assert "incomplete run (interrupted): 8 of 48 samples recorded" in r.out and "8/48" in r.out


def test_gate_lines_are_grammatical(tmp_path, capsys):
    run = make_report_run(tmp_path / "r", {"c1": (1, [(MODAL, 4)]), "c4": (4, [])}, errors={"c4": 4})
    r = cli(capsys, "gate", run, "--max-unique", 1)
    assert r.code == 3, r.out + r.err
    assert "CANNOT JUDGE successful-samples ≥ 1 in every arm: feynman@c4 has 0 ok of 4" in r.out, r.out
    assert "PASS max-unique ≤ 1 (1 check)" in r.out


# ---------------------------------------------------------------- compare: different model or API


def _with_target(run: Path, **update) -> Path:
    manifest = load_manifest(run)
    write_manifest(run, manifest.model_copy(update={"target": manifest.target.model_copy(update=update)}))
    return run


def test_compare_refuses_different_models_or_apis_unless_allowed(tmp_path, capsys):
    a = make_run(tmp_path / "a", ids_rows([[1, 2, 3]] * 3))
    b = _with_target(make_run(tmp_path / "b", ids_rows([[1, 2, 3]] * 3)), model="other", api="completions")
    r = cli(capsys, "compare", a, b)
    assert r.code == 2 and "models differ: m vs other" in r.out and "APIs differ: chat vs completions" in r.out
    assert r.err.count("\n") == 1 and "differ in models (m vs other) and APIs (chat vs completions)" in r.err
    assert "--allow-different" in r.err
    r = cli(capsys, "compare", a, b, "--allow-different")
    assert r.code == 0 and "APIs differ" in r.out
    c = _with_target(make_run(tmp_path / "c", ids_rows([[1, 2, 3]] * 3)), api="completions")
    r = cli(capsys, "compare", a, c, "--json")
    assert r.code == 2 and '"same_api": false' in r.out and "differ in APIs (chat vs completions)" in r.err
    assert cli(capsys, "compare", a, a).code == 0
