"""Background temperature (#18): closed forms, the trie's bookkeeping, and coverage on an ideal sampler at known T."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic_tries import simulate

import detaudit.analysis.background_temperature as bt
from detaudit.analysis.background_temperature import (
    DEVIANCE_NO_FLIP,
    DEVIANCE_TWO_SIDED,
    Observations,
    background_temperature,
    estimate,
    observe,
)


def one_node(n: int, flips: int, margin: float):
    """n one-token samples at a node of two candidates (ids 0, 1), `flips` of them choosing the runner-up."""
    tokens = [[1] if i < flips else [0] for i in range(n)]
    return tokens, [[[0, 1]]] * n, [[[-0.1, -0.1 - margin]]] * n


def two_candidate_loglik(beta: float, margin: float, n: int, flips: int) -> float:
    """The issue's sigma(-Delta/T) likelihood of one node, written out."""
    return -flips * beta * margin - n * math.log1p(math.exp(-beta * margin))


def test_one_node_closed_form():
    margin, n, flips = 0.3, 30, 3
    r = background_temperature(*one_node(n, flips, margin))
    assert r.kind == "estimate" and (r.trials, r.flips, r.positions) == (n, flips, 1)
    # flip rate f/n = sigma(-Delta beta)  =>  T = Delta / ln((n - f) / f)
    assert r.estimate == pytest.approx(margin / math.log((n - flips) / flips), rel=1e-9)
    best = two_candidate_loglik(1 / r.estimate, margin, n, flips)
    for end in (r.lower, r.upper):  # the profile-likelihood bounds sit where the deviance reaches 3.84
        deviance = 2 * (best - two_candidate_loglik(1 / end, margin, n, flips))
        assert deviance == pytest.approx(DEVIANCE_TWO_SIDED, rel=1e-8)
    assert r.lower < r.estimate < r.upper


def test_two_observations_closed_form():
    """Node A (margin a) flipped, node B (margin 2a) did not: l'(beta) = 0 gives 2x^3 + x^2 - 1 = 0, x = e^{-a beta}."""
    a = 0.2
    node_a = observe([[1]], [[[0, 1]]], [[[0.0, -a]]])
    node_b = observe([[0]], [[[0, 1]]], [[[0.0, -2 * a]]])
    r = estimate(Observations.pool([node_a, node_b]))
    assert (r.trials, r.flips, r.positions) == (2, 1, 2)
    x = next(z.real for z in np.roots([2, 1, 0, -1]) if abs(z.imag) < 1e-12 and 0 < z.real < 1)
    assert r.estimate == pytest.approx(a / -math.log(x), rel=1e-9)


def test_nothing_flipped_gives_the_exact_upper_bound():
    margin = 0.05
    for n in (5, 50, 500):
        r = background_temperature(*one_node(n, 0, margin))
        assert (r.kind, r.estimate, r.lower, r.flips) == ("upper-bound", 0.0, 0.0, 0)
        # largest T with P(no flip in n trials) = sigma(Delta / T)^n >= 5 %
        p = 0.05 ** (1 / n)
        assert r.upper == pytest.approx(margin / math.log(p / (1 - p)), rel=1e-9)
    assert DEVIANCE_NO_FLIP == pytest.approx(2 * math.log(20))


def test_upper_bound_shrinks_with_n_on_a_greedy_trie():
    uppers = []
    for n in (4, 16, 64, 256):
        r = background_temperature(*simulate(np.random.default_rng(3), n, 40, 4, 0.0))
        assert r.kind == "upper-bound" and r.flips == 0 and r.positions == 40
        uppers.append(r.upper)
    assert all(b < a for a, b in pairwise(uppers))
    assert uppers[-1] < 1e-5  # the path's near-ties, passed 256 times without a flip, bound T tightly


def test_too_few_trials_bound_nothing():
    r = background_temperature(*one_node(1, 0, 5.0))
    assert r.kind == "upper-bound" and r.upper == math.inf


def test_needs_logprobs():
    tokens = [[1, 2], [1, 3]]
    assert background_temperature(tokens, [None, None], [None, None]).kind == "needs-logprobs"
    top1 = background_temperature(tokens, [[[1], [2]]] * 2, [[[-0.1], [-0.2]]] * 2)
    assert (top1.kind, top1.estimate, top1.lower, top1.upper) == ("needs-logprobs", None, None, None)
    assert top1.outside_top_k == 1  # position 1 lists token 2 only: token 3 is not a candidate


def test_chosen_token_outside_top_k_is_counted_not_scored():
    tokens = [[0], [0], [9]]  # a sampling server picked token 9, which no record lists
    r = background_temperature(tokens, [[[0, 1]]] * 3, [[[-0.1, -2.0]]] * 3)
    assert (r.outside_top_k, r.trials, r.flips, r.kind) == (1, 2, 0, "upper-bound")


def test_nan_and_inf_records_are_ignored_and_counted():
    tokens = [[0], [1], [0]]
    ids = [[[0, 1]]] * 3
    good = background_temperature(tokens, ids, [[[-0.1, -0.3]]] * 3)
    bad = background_temperature(tokens, ids, [[[-0.1, -0.3]], [[float("nan"), -0.3]], [[-0.1, float("inf")]]])
    assert bad.invalid_logprobs == 2 and good.invalid_logprobs == 0
    assert bad.estimate == pytest.approx(good.estimate)  # the one clean record gives the reference
    assert background_temperature(tokens, ids, [[[float("nan"), -0.3]]] * 3).kind == "needs-logprobs"


def test_reference_is_the_median_of_the_records_absent_as_minus_infinity():
    """Greedy with noisy records: each sample's own top-1 is what it chose; the node's median says which flipped."""
    tokens = [[0], [0], [1]]
    ids = [[[0, 1, 5]], [[0, 1]], [[1, 0]]]
    lps = [[[-0.5, -0.9, -3.0]], [[-0.4, -1.2]], [[-0.6, -0.7]]]
    obs = observe(tokens, ids, lps)
    # token 0: median(-0.5, -0.4, -0.7) = -0.5; token 1: median(-0.9, -1.2, -0.6) = -0.9; token 5: listed once
    assert obs.gap.tolist() == pytest.approx([0.0, -0.4]) and obs.count.tolist() == [2, 1] and obs.flips == 1


def test_samples_after_leaving_the_modal_path_are_trials_on_their_own_branch():
    tokens = [[0, 0], [0, 0], [1, 2]]  # the third left at position 0, then chose at its own node
    ids = [[[0, 1], [0, 3]], [[0, 1], [0, 3]], [[0, 1], [2, 4]]]
    lps = [[[-0.1, -0.5], [-0.1, -9.0]], [[-0.1, -0.5], [-0.1, -9.0]], [[-0.1, -0.5], [-0.2, -0.3]]]
    obs = observe(tokens, ids, lps)
    assert obs.positions == 3 and obs.trials == 6 and obs.flips == 1
    assert obs.node.tolist() == [0, 0, 1, 1, 2, 2]  # root; then the modal branch's node and the leaver's node
    assert obs.count.tolist() == [2, 1, 2, 0, 1, 0]


def test_samples_that_end_where_others_go_on_are_counted():
    tokens = [[0, 0], [0], [0, 0]]
    r = background_temperature(tokens, [[[0, 1], [0, 1]], [[0, 1]], [[0, 1], [0, 1]]], [[[-0.1, -0.2]] * 2] * 3)
    assert r.unscored_ends == 1 and r.trials == 5


def test_chunked_observation_is_the_same(monkeypatch: pytest.MonkeyPatch):
    """observe works through whole nodes a bounded number of top-k values at a time: the result does not change."""
    data = simulate(np.random.default_rng(5), 40, 25, 4, 0.01)
    whole = observe(*data)
    monkeypatch.setattr(bt, "_CHUNK", 16)
    parts = observe(*data)
    assert whole.positions > 100 and whole.flips > 10
    for a, b in ((whole.node, parts.node), (whole.gap, parts.gap), (whole.count, parts.count)):
        assert np.array_equal(a, b)


def test_ragged_records_with_nulls():
    """Arrow's to_pylist shapes: top-k lists of varying length, null entries, a missing record, a short list."""
    tokens = [[0, 1], [0, 1], [1]]
    ids = [[[0, 1, 2], [1, 0]], [[0, 1], None], [[0, 1]]]
    lps = [[[-0.1, -0.4, -3.0], [-0.2, -0.9]], [[-0.1, None], None], [[-0.1, -0.4]]]
    obs = observe(tokens, ids, lps)
    assert obs.invalid_logprobs == 1  # sample 1's first record holds a null: ignored
    assert obs.positions == 2 and obs.trials == 5 and obs.flips == 1


def test_pooling_prompts_multiplies_likelihoods():
    a, b = observe(*one_node(10, 3, 0.3)), observe(*one_node(10, 1, 0.3))
    both = estimate(Observations.pool([a, b]))
    assert both.estimate == pytest.approx(0.3 / math.log(16 / 4), rel=1e-9)  # 4 flips in 20 at one margin
    assert (both.trials, both.flips, both.positions) == (20, 4, 2)


@pytest.mark.parametrize("temperature", [1e-4, 1e-3, 1e-2, 0.05])
def test_interval_covers_the_true_temperature(temperature: float):
    """200 runs of 10 samples x 30 tokens per T. Coverage measured here: 94.0-96.0 %; the benchmark's cells of 1,000
    runs give 93.6-96.1 %, mean 94.9 % (benchmarks/RESULTS.md): the profile-likelihood interval is asymptotic. The
    bar, 93 %, is 1.3 binomial standard errors (1.5 points at 200 runs) below 95 %."""
    rng = np.random.default_rng(2026)
    covered, estimates = 0, []
    for _ in range(200):
        r = background_temperature(*simulate(rng, 10, 30, 4, temperature))
        assert r.kind == "estimate" and r.lower is not None and r.estimate is not None and r.upper is not None
        assert r.lower <= r.estimate <= r.upper
        covered += r.lower <= temperature <= r.upper
        estimates.append(r.estimate)
    assert covered / 200 >= 0.93
    assert np.median(estimates) == pytest.approx(temperature, rel=0.1)


margins = st.floats(1e-4, 5.0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 40),
    flip_share=st.floats(0.0, 1.0),
    margin_a=margins,
    margin_b=margins,
    scale=st.floats(1e-3, 1e3),
)
def test_properties(n: int, flip_share: float, margin_a: float, margin_b: float, scale: float):
    """The interval holds the estimate; scaling every logprob by c scales T and its bounds by c."""
    flips = round(flip_share * n)
    tokens = [[1 if i < flips else 0, 0 if i % 3 else 2] for i in range(n)]
    ids = [[[0, 1], [0, 1, 2]]] * n
    lps = np.array([[-0.01, -0.01 - margin_a, -50.0], [-0.02, -0.02 - margin_b, -0.02 - margin_a - margin_b]])

    def fit(c: float):
        return background_temperature(tokens, ids, [[(lps[0, :2] * c).tolist(), (lps[1] * c).tolist()]] * n)

    r, s = fit(1.0), fit(scale)
    assert r.lower is not None and r.estimate is not None and r.upper is not None
    assert r.lower <= r.estimate <= r.upper
    for x, y in ((r.estimate, s.estimate), (r.lower, s.lower), (r.upper, s.upper)):
        assert y == pytest.approx(x * scale, rel=1e-8) or (x == y == math.inf)
