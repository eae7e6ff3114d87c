"""The release gate on hand-built summaries: every rule's pass and fail, baseline matching, exit codes, spec parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from detaudit.analysis.stats import arm_stats
from detaudit.analysis.summary_schema import RunSummary
from detaudit.errors import UsageError
from detaudit.gate import GateThresholds, evaluate_gate, parse_gate_spec


def arm(concurrency: int, counts: list[int], *, errors: int = 0, first: int | None = None, texts=None) -> dict:
    """One arm of a detaudit.summary/1 dict: `counts` of each distinct completion, modal first."""
    ok = sum(counts)
    texts = texts or [f"completion {i}" for i in range(len(counts))]
    return {
        "concurrency": concurrency,
        "arm": f"c{concurrency}",
        "expected": ok + errors,
        "n": ok + errors,
        "ok": ok,
        "errors": errors,
        "unique": len(counts),
        "completions": [
            {
                "count": c,
                "share": c / ok,
                "first_divergence": None if i == 0 else first,
                "length": len(t),
                "text": t,
                "text_chars": len(t),
            }
            for i, (c, t) in enumerate(zip(counts, texts, strict=True))
        ],
        "first_divergence": {
            "min": first,
            "median": first,
            "histogram": {str(first): ok - counts[0]} if first else {},
            "samples": ok - counts[0] if counts else 0,
        },
        "forks": [],
        "forks_total": 0,
        "earliest_fork": first,
        "stats": arm_stats(ok, counts[0] if counts else 0, len(counts)).model_dump(),
        "system_fingerprints": None,
    }


def summary(*arms: dict, prompt_id: str = "p") -> RunSummary:
    """A summary of one prompt, built by hand: it leaves out the prompt's count across arms (unique_all_arms)."""
    prompt = {
        "prompt_id": prompt_id,
        "prompt": None,
        "unique_all_arms": None,
        "arms": list(arms),
        "verdict": "inconclusive",
        "verdict_reason": "built by hand",
    }
    n, ok = sum(a["n"] for a in arms), sum(a["ok"] for a in arms)
    agreement = {"prompts": 0, "all_identical": 0, "share": None, "by_arm": [], "by_system_fingerprint": None}
    return RunSummary.model_validate(
        {
            "schema": "detaudit.summary/1",
            "run_id": "run",
            "run_status": "complete",
            "model": "m",
            "system_fingerprints": [],
            "unit": "token",
            "unit_detail": {"compared_as": "token_ids", "capture": "token_ids", "positions": "tokens"},
            "samples": {"expected": n, "rows": n, "ok": ok, "errors": n - ok},
            "unique_per_prompt": [],
            "agreement": agreement,
            "earliest_fork": None,
            "limits": {"completions": 20, "forks": 50, "branches": 10},
            "prompts": [prompt],
        }
    )


STABLE = summary(arm(1, [100]), arm(16, [100]))
SHAKY = summary(arm(1, [100]), arm(16, [90, 8, 2], first=12))


def test_max_unique_also_counts_completions_across_arms():
    s = summary(arm(1, [100], texts=["A"]), arm(16, [100], texts=["B"]))
    s.prompts[0].unique_all_arms = 2
    result = evaluate_gate(s, GateThresholds(max_unique=1))
    assert result.lines() == ["FAIL max-unique ≤ 1: p@all-arms 2 unique across arms"]
    assert evaluate_gate(s, GateThresholds(max_unique=2)).exit_code == 0


def test_gate_passes_when_every_arm_is_within_max_unique():
    result = evaluate_gate(STABLE, GateThresholds(max_unique=1))
    assert result.exit_code == 0
    assert result.lines() == ["PASS max-unique ≤ 1 (2 checks)"]


def test_gate_fails_max_unique_with_one_line_naming_the_arm():
    result = evaluate_gate(SHAKY, GateThresholds(max_unique=2))
    assert result.exit_code == 1
    assert result.lines() == ["FAIL max-unique ≤ 2: p@c16 3 unique in 100"]


@pytest.mark.parametrize(("share", "code"), [(0.9, 0), (0.91, 1)])
def test_min_modal_share_boundary(share, code):
    assert evaluate_gate(SHAKY, GateThresholds(min_modal_share=share)).exit_code == code


@pytest.mark.parametrize(("position", "code"), [(12, 0), (13, 1)])
def test_min_first_divergence_boundary(position, code):
    result = evaluate_gate(SHAKY, GateThresholds(min_first_divergence=position))
    assert result.exit_code == code
    if code:
        assert result.lines() == [f"FAIL min-first-divergence ≥ {position} tokens: p@c16 first divergence at token 12"]


def test_min_first_divergence_passes_without_any_divergence():
    assert evaluate_gate(STABLE, GateThresholds(min_first_divergence=10**6)).exit_code == 0


def test_error_rate_over_the_limit_means_cannot_judge_exit_3():
    s = summary(arm(1, [100]), arm(16, [70], errors=30))
    assert evaluate_gate(s, GateThresholds(max_error_rate=0.3)).exit_code == 0
    result = evaluate_gate(s, GateThresholds(max_error_rate=0.2, max_unique=1))
    assert result.exit_code == 3
    assert result.lines()[0] == "CANNOT JUDGE max-error-rate ≤ 0.2: p@c16 30/100 errors (30.0%)"


def test_cannot_judge_outranks_a_failed_rule():
    s = summary(arm(1, [50, 50], first=0), arm(16, [10], errors=90))
    result = evaluate_gate(s, GateThresholds(max_error_rate=0.5, max_unique=1))
    assert result.exit_code == 3
    assert [line.split(" ")[0] for line in result.lines()] == ["CANNOT", "FAIL"]


def test_an_arm_with_no_successful_sample_cannot_be_judged_even_without_error_rule():
    s = summary(arm(1, [100]), {**arm(16, [1]), "n": 100, "ok": 0, "errors": 100, "unique": 0, "completions": []})
    result = evaluate_gate(s, GateThresholds(max_unique=1))
    assert result.exit_code == 3
    assert result.lines()[0] == "CANNOT JUDGE successful-samples ≥ 1 in every arm: p@c16 has 0 ok of 100"


def test_an_arm_whose_answers_were_mostly_cut_short_cannot_be_judged():
    """Truncated answers are not compared (docs/summary.md): 1 unique among the 40 complete answers of an arm that
    lost 60 to truncation passes max-unique, yet says nothing about the model."""
    cut = {**arm(16, [40]), "n": 100, "truncated": 60}
    result = evaluate_gate(summary(arm(1, [100]), cut), GateThresholds(max_unique=1))
    assert result.exit_code == 3
    rule = "complete-answers more than half of every arm's answers not truncated"
    assert result.lines()[0] == f"CANNOT JUDGE {rule}: p@c16 has 60 truncated of 100"
    fewer = {**arm(16, [60]), "n": 100, "truncated": 40}  # the verdict's rule too: half or fewer cut short is judged
    assert evaluate_gate(summary(arm(1, [100]), fewer), GateThresholds(max_unique=1)).exit_code == 0


def test_require_same_modal_compares_with_the_baseline_arm_of_the_same_concurrency():
    base = summary(arm(1, [100], texts=["A"]), arm(16, [100], texts=["A"]))
    same = summary(arm(1, [100], texts=["A"]), arm(16, [60, 40], first=3, texts=["A", "B"]))
    moved = summary(arm(1, [100], texts=["A"]), arm(16, [60, 40], first=3, texts=["B", "A"]))
    t = GateThresholds(require_same_modal=True, baseline=Path("base"))
    assert evaluate_gate(same, t, base, baseline_label="base").exit_code == 0
    result = evaluate_gate(moved, t, base, baseline_label="base")
    assert result.exit_code == 1
    assert result.lines() == ["FAIL require-same-modal as base: p@c16 vs baseline@c16 modal completion differs"]


def test_release_arm_missing_in_baseline_is_compared_with_the_baselines_most_serial_arm():
    base = summary(arm(1, [100], texts=["A"]), arm(8, [50, 50], first=0, texts=["B", "A"]))
    release = summary(arm(64, [100], texts=["A"]))
    t = GateThresholds(require_same_modal=True, baseline=Path("base"))
    result = evaluate_gate(release, t, base)
    assert result.passed
    assert result.rules[0].checks[0].where == "p@c64 vs baseline@c1"


def test_max_unique_increase_over_baseline():
    base = summary(arm(1, [100]), arm(16, [98, 2], first=5))
    release = summary(arm(1, [100]), arm(16, [90, 8, 2], first=12))
    ok = GateThresholds(max_unique_increase=1, baseline=Path("b"))
    assert evaluate_gate(release, ok, base).exit_code == 0
    tight = GateThresholds(max_unique_increase=0, baseline=Path("b"))
    result = evaluate_gate(release, tight, base, baseline_label="b")
    assert result.exit_code == 1
    assert result.lines() == ["FAIL max-unique-increase ≤ +0 over b: p@c16 vs baseline@c16 2 → 3 unique"]


def test_baseline_without_the_prompt_is_a_usage_error():
    base = summary(arm(1, [100]), prompt_id="other")
    with pytest.raises(UsageError, match="no prompt 'p'"):
        evaluate_gate(STABLE, GateThresholds(require_same_modal=True, baseline=Path("b")), base)


def test_every_failed_rule_gets_its_own_line():
    result = evaluate_gate(SHAKY, GateThresholds(max_unique=1, min_modal_share=0.95, min_first_divergence=20))
    assert [line.split(":")[0] for line in result.lines()] == [
        "FAIL max-unique ≤ 1",
        "FAIL min-modal-share ≥ 0.95",
        "FAIL min-first-divergence ≥ 20 tokens",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no gate rule given"),
        ({"max_unique": 0}, "--max-unique must be at least 1"),
        ({"min_modal_share": 1.5}, "--min-modal-share must be between 0 and 1"),
        ({"max_error_rate": -0.1}, "--max-error-rate must be between 0 and 1"),
        ({"min_first_divergence": -1}, "--min-first-divergence must be 0 or more"),
        ({"require_same_modal": True}, "need --baseline"),
        ({"max_unique_increase": 2}, "need --baseline"),
    ],
)
def test_bad_thresholds_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        GateThresholds(**kwargs)


def test_gate_spec_for_detaudit_run():
    t = parse_gate_spec(["max-unique=1,min-modal-share=0.99", "baseline=runs/rc0", "require-same-modal"])
    assert t == GateThresholds(max_unique=1, min_modal_share=0.99, require_same_modal=True, baseline=Path("runs/rc0"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("max-uniq=1", "unknown rule 'max-uniq'"),
        ("max-unique", "needs a value"),
        ("max-unique=x", "not a valid int"),
        ("require-same-modal=no", "takes no value"),
    ],
)
def test_bad_gate_specs_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_gate_spec([spec])
