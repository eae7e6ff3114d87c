"""True verdicts on servers that misbehave the way real ones do (issue #23): truncated answers, non-greedy
"temperature 0", lossy token strings and logprob-only jitter are recognised, never counted as load dependence.

Each scripted server reproduces one behaviour seen on a real server (llama-cpp-python, llama-server); its answers
come in a fixed arrival order (arms run one after another), so every count below is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from detaudit.reports.html import render_html
from detaudit.reports.markdown import render_markdown
from detaudit.reports.pipeline import load_runs
from detaudit.reports.view_model import build_report
from runhelp import FEYNMAN, NYC, QUEENS, cli
from test_analysis import make_run

from detaudit.analysis.summary import summarize_run
from detaudit.rundir.io import read_samples

OTHER = "Say something else"


def run_json(capsys, server, out: Path, *args) -> dict:
    r = cli(capsys, "run", "--base-url", server.base_url, "--out", out, "--json", *args)
    assert r.code == 0, r.err
    return json.loads(r.out)


def arms_of(summary: dict, prompt: int = 0) -> dict[str, dict]:
    return {a["arm"]: a for a in summary["prompts"][prompt]["arms"]}


def test_interrupted_streams_are_truncated_not_load_dependent(scripted_server, capsys, tmp_path) -> None:
    """llama-cpp-python cuts a stream when another request waits, then sends a normal [DONE], no finish_reason."""
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC, "cut": QUEENS[:1]},
        interrupted=["cut"],
        schedules={
            FEYNMAN: ["Q"] * 8 + ["cut"] * 7 + ["Q"],  # c1: 8 whole answers; c8: 7 cut short, 1 whole
            OTHER: ["Q"] * 8 + ["cut"] + ["Q"] * 3 + ["N"] * 4,  # c8: 1 cut short, and a real divergence
        },
    )
    summary = run_json(capsys, server, tmp_path / "r", "-p", FEYNMAN, "-p", OTHER, "-n", 8, "-c", "1,8")
    rows = read_samples(tmp_path / "r").to_pylist()
    assert sum(r["status"] == "ok" and r["finish_reason"] is None for r in rows) == 8  # recorded as ok answers
    feynman, other = summary["prompts"]
    c1, c8 = arms_of(summary).values()
    assert (c1["ok"], c1["truncated"], c1["unique"]) == (8, 0, 1)
    assert (c8["ok"], c8["truncated"], c8["errors"], c8["unique"]) == (1, 7, 0, 1)
    assert feynman["verdict"] == "inconclusive"
    assert feynman["verdict_reason"] == (
        "most answers ended without a stated reason (truncated: c8 7 of 8); nothing to compare"
    )
    o8 = arms_of(summary, 1)["c8"]
    assert (o8["ok"], o8["truncated"], o8["unique"]) == (7, 1, 2)
    assert other["verdict"] == "load-dependent" and other["verdict_reason"].endswith(
        "(1 truncated answers not compared)"
    )
    assert summary["samples"] | {"expected": 0} == {"expected": 0, "rows": 32, "ok": 24, "errors": 0, "truncated": 8}
    assert summary["unique_per_prompt"][0]["by_arm"] == {"c1": 1, "c8": 1}  # the cut answer is no completion
    assert summary["notes"] == [
        "8 of 32 ok answers ended without a stated reason (no finish_reason, or `length` short of max_tokens): "
        f"counted as truncated and not compared ({feynman['prompt_id']}/c8 7/8, {other['prompt_id']}/c8 1/8)"
    ]


def test_length_counts_only_at_the_requested_max_tokens(tmp_path) -> None:
    """`length` at max_tokens (16 here) is a stated end; `length` short of it, `abort` or no reason is truncated."""
    rows = [{"token_ids": list(range(16)), "finish_reason": "length", "completion_tokens": 16}] * 3
    rows += [{"token_ids": [1, 2, 3], "finish_reason": "length", "completion_tokens": 3}]  # the server cut it
    rows += [{"token_ids": [1, 2], "finish_reason": "abort"}, {"token_ids": [1], "finish_reason": None}]
    rows += [{"token_ids": [7, 8], "finish_reason": "stop"}] * 2
    s = summarize_run(make_run(tmp_path, rows))
    arm = s.prompts[0].arms[0]
    assert (arm.ok, arm.truncated, arm.unique) == (5, 3, 2)
    assert [c.count for c in arm.completions] == [3, 2]
    # a run that never states a finish_reason cannot tell: everything is compared, and a note says so
    s = summarize_run(make_run(tmp_path / "none", [{"token_ids": [1, 2]}, {"token_ids": [1]}]))
    assert (s.samples.ok, s.samples.truncated) == (2, 0)
    assert s.notes == ["no answer recorded a finish_reason: truncated answers cannot be told apart, all were compared"]


def test_repeat_penalty_is_not_greedy(scripted_server, capsys, tmp_path) -> None:
    """llama-cpp-python's default repeat_penalty 1.1: the chosen token is below the top-1 at some positions, and the
    top-k list grows the chosen token as an extra entry."""
    penalised = [{"token": t, "penalised": 0.5} if i in (2, 6) else t for i, t in enumerate(QUEENS)]
    server = scripted_server(completions={"P": penalised}, default="P")
    summary = run_json(capsys, server, tmp_path / "r", "-p", FEYNMAN, "-n", 4, "-c", "1,4", "--top-logprobs", 2)
    check = summary["sampling"]
    assert check["greedy"] is False and check["tolerance"] == 1e-4
    assert [(a["arm"], a["rows"], a["positions"], a["below_top1"], a["grown_lists"]) for a in check["arms"]] == [
        ("c1", 4, 40, 8, 8),
        ("c4", 4, 40, 8, 8),
    ]
    assert check["arms"][0]["share"] == 0.2
    assert summary["prompts"][0]["verdict"] == "deterministic"
    (note,) = summary["notes"]
    assert note.startswith("temperature 0 was not greedy: the chosen token was below the reported top-1 at c1 8/40, ")
    assert "16 top-k lists held the chosen token appended" in note and "not comparable" in note
    assert "repeat_penalty=1, presence_penalty=0, frequency_penalty=0 (or top_k=1)" in note


def test_greedy_server_passes_the_check(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    summary = run_json(capsys, server, tmp_path / "r", "-p", FEYNMAN, "-n", 3, "--top-logprobs", 2)
    assert summary["sampling"]["greedy"] is True and summary["sampling"]["arms"][0]["positions"] == 30
    assert summary["notes"] == []


def test_lossy_token_strings_fall_back_to_the_text(scripted_server, capsys, tmp_path) -> None:
    """Token strings decoded with errors="ignore" ('' tokens) and an entry merged into the next: same text, other
    token strings. Compared as strings the loaded arm would show 3 completions; the text says there is one."""
    empty = [{"token": t, "shown": ""} if i == 5 else t for i, t in enumerate(QUEENS)]
    merged = [{"token": t, "merged": True} if i == 3 else t for i, t in enumerate(QUEENS)]
    server = scripted_server(
        completions={"Q": QUEENS, "E": empty, "M": merged},
        schedules={FEYNMAN: ["Q"] * 4 + ["Q", "E", "M", "Q"]},
        capture="openai",
    )
    summary = run_json(capsys, server, tmp_path / "r", "--api", "completions", "-p", FEYNMAN, "-n", 4, "-c", "1,4")
    rows = read_samples(tmp_path / "r").to_pylist()
    assert {len(r["tokens"]) for r in rows} == {9, 10} and all(r["text"] == "".join(QUEENS) for r in rows)
    detail = summary["unit_detail"]
    assert detail["compared_as"] == "text" and detail["fallbacks"] == [{"source": "tokens", "rows": 2}]
    assert summary["unit"] == "text" and arms_of(summary)["c4"]["unique"] == 1
    assert summary["prompts"][0]["verdict"] == "deterministic"
    assert summary["notes"] == [
        "tokens disagreed with the text or usage.completion_tokens on 2 rows: not compared; compared as text instead"
    ]


def test_logprob_only_jitter_is_numerically_load_dependent(scripted_server, capsys, tmp_path) -> None:
    """Identical completions whose first logprob moves by 1e-5 or 2e-5 under load (llama-server -np 8)."""

    def first_lp(lp: float) -> list:
        return [{"token": QUEENS[0], "logprob": lp}, *QUEENS[1:]]

    server = scripted_server(
        completions={"A": QUEENS, "A1": first_lp(-0.04999), "A2": first_lp(-0.04998)},
        schedules={FEYNMAN: ["A"] * 4 + ["A", "A1", "A2", "A1"], OTHER: ["A", "A1"] * 4},
    )
    summary = run_json(capsys, server, tmp_path / "r", "-p", FEYNMAN, "-p", OTHER, "-n", 4, "-c", "1,4")
    feynman, other = summary["prompts"]
    c1, c4 = arms_of(summary).values()
    assert (c1["unique"], c4["unique"]) == (1, 1)
    assert c1["numeric"] == {
        "rows": 4,
        "vectors": 1,
        "vectors_compared": 0,
        "max_abs_delta": None,
        "max_position": None,
        "first_position": None,
    }
    num = c4["numeric"]
    assert (num["rows"], num["vectors"], num["vectors_compared"], num["first_position"], num["max_position"]) == (
        4,
        3,
        3,
        0,
        0,
    )
    assert num["max_abs_delta"] == pytest.approx(2e-5, rel=1e-3)
    assert feynman["verdict"] == "numerically-load-dependent"
    assert feynman["verdict_reason"].startswith(
        "every arm returned one completion, the same in all arms, but its logprobs vary under load: one vector in "
        "the serial arm, 3 over all arms; arm c4: 3 vectors, max |Δ logprob| 2e-05, first at position 0"
    )
    # jitter already in the serial arm is no load dependence
    assert other["verdict"] == "deterministic"
    assert other["verdict_reason"].endswith("its logprobs vary already in the serial arm (2 vectors)")
    (note,) = summary["notes"]
    assert note.startswith("identical completions carry different logprobs (divergence below the tokens): ")
    assert f"{feynman['prompt_id']}/c4 3 vectors, max |Δ| 2e-05 first at position 0" in note

    # the report shows the verdict, the spread and the note
    report = build_report(load_runs([tmp_path / "r"]))
    md = render_markdown(report)
    assert "numerically-load-dependent" in md and "**Below the tokens**" in md
    assert "3 distinct logprob vectors among 4 identical completions: max \\|Δ logprob\\| 2e-05" in md
    assert "**Notes**" in md and "identical completions carry different logprobs" in md
    html = render_html(report)
    assert 'class="verdict v-numerically-load-dependent"' in html
    assert "3 distinct logprob vectors among 4 identical completions" in html


def test_report_shows_truncated_answers(scripted_server, capsys, tmp_path, monkeypatch) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "cut": QUEENS[:1]},
        interrupted=["cut"],
        schedules={FEYNMAN: ["Q"] * 4 + ["cut"] * 3 + ["Q"]},
    )
    run_json(capsys, server, tmp_path / "r", "-p", FEYNMAN, "-n", 4, "-c", "1,4")
    report = build_report(load_runs([tmp_path / "r"]))
    md = render_markdown(report)
    assert "| 1/4 (3 truncated) |" in md and "inconclusive" in md
    assert "3 of 8 ok answers ended without a stated reason" in md
    html = render_html(report)
    assert "<b>3</b> truncated (not compared)" in html
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    r = cli(capsys, "analyze", tmp_path / "r")
    assert r.code == 0 and "1/4 (3 cut)" in r.out and "5 ok, 0 errors, 3 truncated of 8 rows" in r.out
