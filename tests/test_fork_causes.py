"""Cause labels (#18) on corpora whose causes are known: load, fingerprint switch, drift, cache, near-tie, none."""

from __future__ import annotations

import numpy as np
import pytest

from detaudit.analysis.fork_causes import (
    CAUSES,
    ForkCause,
    ForkRows,
    Samples,
    divergence_shares,
    label_forks,
    near_tie_threshold,
)

MARGIN = 3.0  # far from any tie


def forks_of(completions: list[tuple[str, ...]], margins: dict[int, float] | None = None) -> list[ForkRows]:
    """The forks of the trie of `completions` (one per sample row), branches numbered in token order."""
    out = []

    def walk(rows: np.ndarray, depth: int) -> None:
        ends = [r for r in rows.tolist() if len(completions[r]) == depth]
        groups: dict[str, list[int]] = {}
        for r in rows.tolist():
            if len(completions[r]) > depth:
                groups.setdefault(completions[r][depth], []).append(r)
        children = [ends] * bool(ends) + [groups[t] for t in sorted(groups)]
        if len(children) > 1:
            branch = np.concatenate([np.full(len(c), i) for i, c in enumerate(children)])
            margin = (margins or {}).get(depth, MARGIN)
            out.append(ForkRows(depth, margin, np.array([r for c in children for r in c]), branch))
        for t in sorted(groups):
            walk(np.array(groups[t]), depth + 1)

    walk(np.arange(len(completions)), 0)
    return out


def samples(n: int, arm=None, fingerprint=None, started_at=None, cache=None) -> Samples:
    arm = arm if arm is not None else ["c1"] * n
    return Samples(
        arm=arm,
        concurrency=np.array([1 if a == "c1" else 64 for a in arm]),
        fingerprint=fingerprint if fingerprint is not None else ["fp"] * n,
        started_at=np.asarray(started_at if started_at is not None else np.arange(n), dtype=float),
        cache=cache if cache is not None else [None] * n,
    )


def labels(meta: Samples, completions: list[tuple[str, ...]], margins: dict[int, float] | None = None):
    return [(c.position, c.labels) for c in label_forks(meta, forks_of(completions, margins))]


def shuffled_split(rng: np.random.Generator, n: int, share: float) -> np.ndarray:
    """A random set of round(share * n) of n rows, unrelated to arm, time or anything else."""
    pick = np.zeros(n, bool)
    pick[rng.choice(n, round(share * n), replace=False)] = True
    return pick


def test_near_tie_threshold_is_two_roundings_of_a_logit_of_32():
    assert near_tie_threshold() == 0.25  # bf16: 8 significant bits, 2 * 32 * 2^-8
    assert near_tie_threshold("float16") == 2**-5
    assert near_tie_threshold("float32") == pytest.approx(3.8147e-6, rel=1e-4)
    assert near_tie_threshold("bfloat16", 16.0) == 0.125


def test_load_dependent():
    """Serial: all A B C; under load 20 % take A B D, at random times: load, nothing else."""
    rng = np.random.default_rng(2)
    arm = ["c1"] * 60 + ["c64"] * 60
    away = np.r_[np.zeros(60, bool), shuffled_split(rng, 60, 0.2)]
    comps = [("A", "B", "D") if a else ("A", "B", "C") for a in away]
    assert labels(samples(120, arm=arm, started_at=rng.permutation(120)), comps) == [(2, ("load",))]


def test_load_nested_fork_never_reached_by_the_serial_arm():
    rng = np.random.default_rng(3)
    arm = ["c1"] * 60 + ["c64"] * 60
    comps = [("A", "B")] * 60 + [("A", "B")] * 40 + [("A", "C", "x")] * 12 + [("A", "C", "y")] * 8
    got = labels(samples(120, arm=arm, started_at=rng.permutation(120)), comps)
    assert got == [(1, ("load",)), (2, ("load",))]


def test_no_load_label_when_the_serial_arm_forks_too_or_evidence_is_thin():
    rng = np.random.default_rng(4)
    arm = ["c1"] * 60 + ["c64"] * 60
    away = shuffled_split(rng, 120, 0.2)
    comps = [("A", "D") if a else ("A", "C") for a in away]
    assert labels(samples(120, arm=arm, started_at=rng.permutation(120)), comps) == [(1, ("unexplained",))]
    # 3 serial samples, none away, against 20 % away under load: (0.8)^3 = 0.51, no evidence
    arm = ["c1"] * 3 + ["c64"] * 60
    comps = [("A", "C")] * 3 + [("A", "D") if a else ("A", "C") for a in shuffled_split(rng, 60, 0.2)]
    assert labels(samples(63, arm=arm, started_at=rng.permutation(63)), comps) == [(1, ("unexplained",))]


def test_fingerprint_switch_mid_run():
    """A deployment change halfway through one arm: branches split by fingerprint, and in time."""
    fp = ["fp_a"] * 50 + ["fp_b"] * 50
    comps = [("A", "B")] * 50 + [("A", "X")] * 50
    assert labels(samples(100, fingerprint=fp), comps) == [(1, ("fingerprint", "time"))]


def test_fingerprint_behind_a_load_balancer():
    """Two deployments interleaved at random: the fingerprint splits the branches, time does not."""
    rng = np.random.default_rng(6)
    on_b = shuffled_split(rng, 100, 0.5)
    fp = ["fp_b" if b else "fp_a" for b in on_b]
    comps = [("A", "X") if b else ("A", "B") for b in on_b]
    (cause,) = label_forks(samples(100, fingerprint=fp), forks_of(comps))
    assert cause.labels == ("fingerprint",)
    assert cause.evidence[0].effect == pytest.approx(1.0) and cause.evidence[0].p_value == pytest.approx(1 / 1000)
    assert "fp_a: branch 0 x50" in cause.evidence[0].detail and "fp_b: branch 1 x50" in cause.evidence[0].detail


def test_drift_over_time():
    """No fingerprint change, but the first 40 samples of each arm say B and the rest X."""
    arm = ["c1"] * 80 + ["c64"] * 80
    late = np.r_[np.arange(80) >= 40, np.arange(80) >= 40]
    comps = [("A", "X") if x else ("A", "B") for x in late]
    # serial and loaded both fork, so not load; time within each arm
    assert labels(samples(160, arm=arm), comps) == [(1, ("time",))]


def test_cache_dependent():
    """Cold requests take B, warm ones X, at random times, in two arms whose cold shares differ."""
    rng = np.random.default_rng(8)
    arm = ["c1"] * 60 + ["c64"] * 60
    cold = np.r_[shuffled_split(rng, 60, 0.5), shuffled_split(rng, 60, 0.1)]
    comps = [("A", "B") if c else ("A", "X") for c in cold]
    cache = ["cold" if c else "warm" for c in cold]
    got = labels(samples(120, arm=arm, started_at=rng.permutation(120), cache=cache), comps)
    assert got == [(1, ("cache",))]


def test_near_tie_and_unexplained():
    rng = np.random.default_rng(9)
    away = shuffled_split(rng, 100, 0.3)
    comps = [("A", "B", "x") if a else ("A", "C", "y") for a in away]
    meta = samples(100, started_at=rng.permutation(100))
    assert labels(meta, comps, {1: 0.125}) == [(1, ("near-tie",))]
    assert labels(meta, comps, {1: 0.5}) == [(1, ("unexplained",))]
    assert labels(meta, comps, {1: None}) == [(1, ("unexplained",))]  # margin not recorded


def test_weak_association_is_not_a_cause():
    """A fingerprint that only shifts the odds (30 % vs 45 % away) is not what split the branches."""
    rng = np.random.default_rng(10)
    on_b = np.r_[np.zeros(500, bool), np.ones(500, bool)]
    away = np.r_[shuffled_split(rng, 500, 0.30), shuffled_split(rng, 500, 0.45)]
    order = rng.permutation(1000)  # interleaved in time
    fp = ["fp_b" if b else "fp_a" for b in on_b]
    comps = [("A", "X") if a else ("A", "B") for a in away]
    assert labels(samples(1000, fingerprint=fp, started_at=order), comps) == [(1, ("unexplained",))]


def test_shares_per_prompt_and_run():
    def cause(departures: int, *labels: str) -> ForkCause:
        return ForkCause(0, departures, labels, ())

    prompt_a = [cause(10, "load", "near-tie"), cause(30, "load"), cause(0, "unexplained")]
    prompt_b = [cause(20, "unexplained"), cause(40, "fingerprint", "time")]
    a = divergence_shares(prompt_a)
    assert a is not None and a["load"] == 1.0 and a["near-tie"] == 0.25 and a["unexplained"] == 0.0
    run = divergence_shares(prompt_a + prompt_b)
    assert run == {"near-tie": 0.1, "load": 0.4, "fingerprint": 0.4, "cache": 0.0, "time": 0.4, "unexplained": 0.2}
    assert set(run) == set(CAUSES)
    assert divergence_shares([cause(0, "unexplained")]) is None


def test_departures_and_shares_from_labelled_forks():
    rng = np.random.default_rng(12)
    arm = ["c1"] * 60 + ["c64"] * 60
    comps = [("A", "B")] * 60 + [("A", "B")] * 45 + [("A", "C")] * 15  # 15 departures under load
    (fork,) = label_forks(samples(120, arm=arm, started_at=rng.permutation(120)), forks_of(comps))
    assert fork.departures == 15 and fork.labels == ("load",)
    assert fork.evidence[0].p_value == pytest.approx(0.75**60)
    shares = divergence_shares([fork])
    assert shares is not None and shares["load"] == 1.0 and shares["unexplained"] == 0.0


def test_labels_are_deterministic():
    rng = np.random.default_rng(13)
    away = shuffled_split(rng, 200, 0.5)
    comps = [("A", "X") if a else ("A", "B") for a in away]
    meta = samples(200, fingerprint=["fp_b" if a else "fp_a" for a in away], started_at=rng.permutation(200))
    assert label_forks(meta, forks_of(comps)) == label_forks(meta, forks_of(comps))
