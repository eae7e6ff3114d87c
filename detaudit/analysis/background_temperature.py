"""Background temperature T_bg: the temperature at which an ideal sampler would vary as much as the endpoint did.

Issue #18; Messina & Scotta (arXiv 2604.22411). Pure numpy; docs/background_temperature.md has the method.

Observations. The N samples of one prompt x arm form a prefix trie. At every node v (a prefix that n_v >= 1
samples share and continue past) each continuing sample is one trial, and its outcome is the token it chose.
The node's reference logprobs r_v(t) are the median, over the samples at v that recorded a top-k there, of t's
logprob, a sample whose top-k lacks t counting as -inf (so a token is a candidate only if at least half of
them list it). In an ideal run every sample at v records the same top-k and the median is that record; with
noisy records (a greedy server whose logits move with the batch) each sample's own top-1 is by construction the
token it chose, so only a reference common to the node can show that a choice went against the odds. The
candidates C_v are the tokens with a finite median.

Likelihood. An ideal sampler at temperature T = 1/beta, restricted to the recorded top-k, picks t in C_v with
probability softmax(beta * r_v)_t. With d_vt = r_v(t) - max_C r_v <= 0 (the gap to the node's best) and n_vt the
trials at v that chose t,

    l(beta) = sum_v sum_t n_vt * beta * d_vt  -  sum_v n_v * log sum_{t in C_v} exp(beta * d_vt),

which for two candidates is the issue's sigma(-Delta/T) per trial (Delta the top-1 - top-2 margin). A sample's
joint probability is the product over its positions of P(token | its own prefix); regrouping the N samples'
products by prefix gives exactly the product over trie nodes above. So positions after a sample left the modal
path are neither dropped nor scored against the modal path: they are trials at the nodes of the sample's own
branch, with that branch's reference. l is concave in beta (its second derivative is -sum_v n_v Var_v(d) under
the softmax weights), so the MLE is the one root of l' (a bracketed search on log beta).

Flips are trials with d < 0 (a choice below the node's best). With none, l increases to l(inf) and the MLE is
T = 0; the 95 % upper bound is then exact: the largest T under which "no flip in all these trials" still has
probability >= 5 %, i.e. 2 (l(inf) - l(beta)) <= -2 ln 0.05 (the Clopper-Pearson bound of stats.py when there is
one node). With flips, the 95 % interval is the profile-likelihood one: 2 (l(beta_hat) - l(beta)) <= 3.84; any
flip makes l(inf) = -inf, so the interval then excludes T = 0.

Not scored, but counted: a chosen token that is not a candidate (a non-greedy server, or a top-k too short;
softmax over the top-k gives it probability 0), a sample that ends at a node where others continue (its stop
token is not recorded), and records holding NaN, +inf or null (that sample's record at that position is
ignored).
With no node of two or more candidates (no logprobs, top-k = 1) the answer is "needs-logprobs".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
from numpy.typing import DTypeLike

from detaudit.analysis.stats import Z95

# Deviance bounds of the 95 % intervals: two-sided profile likelihood (chi-square, 1 df), and the exact one-sided
# bound P(no flip) >= 5 % when nothing flipped.
DEVIANCE_TWO_SIDED = Z95 * Z95
DEVIANCE_NO_FLIP = -2.0 * math.log(0.05)
_REL_TOL = 1e-12  # the root search on log beta stops when its bracket is this narrow
_MAX_STEPS = 4000  # bracket widenings or refinement steps: a guard against non-finite input only
_FLAT = 1e-12  # a beta this far below the data's own scale (1 / the median gap) is rounding: beta = 0, T = inf
_CHUNK = 1 << 20  # top-k values handled at once in observe: bounds its transient arrays

Kind = Literal["estimate", "upper-bound", "needs-logprobs"]


@dataclass(frozen=True)
class BackgroundTemperature:
    """T_bg with its 95 % interval. `estimate` is 0 and `lower` 0 for an upper bound; `upper` may be inf (too few
    trials to bound T); all three are None when kind is "needs-logprobs"."""

    kind: Kind
    estimate: float | None
    lower: float | None
    upper: float | None
    trials: int  # scored trials (a sample at a node of two or more candidates)
    flips: int  # trials that chose a candidate below the node's best
    positions: int  # trie nodes scored
    outside_top_k: int  # chosen token not among the node's candidates: not scored
    unscored_ends: int  # samples ending where others continued: not scored
    invalid_logprobs: int  # NaN, +inf or null values met in the records (those records ignored)


@dataclass(frozen=True)
class Observations:
    """The trie's scored nodes: per candidate its node, gap d (<= 0) and how many trials chose it.

    Candidates of a node are contiguous and every node has two or more, so `node` is non-decreasing.
    """

    node: np.ndarray  # int64
    gap: np.ndarray  # float64
    count: np.ndarray  # int64
    outside_top_k: int = 0
    unscored_ends: int = 0
    invalid_logprobs: int = 0

    @property
    def positions(self) -> int:
        return int(self.node[-1]) + 1 if len(self.node) else 0

    @property
    def trials(self) -> int:
        return int(self.count.sum())

    @property
    def flips(self) -> int:
        return int(self.count[self.gap < 0].sum())

    @staticmethod
    def pool(parts: Sequence[Observations]) -> Observations:
        """Several tries (prompts of one arm) as one likelihood: their product, the samples being independent."""
        offsets = np.cumsum([0] + [p.positions for p in parts])
        return Observations(
            node=np.concatenate(
                [p.node + o for p, o in zip(parts, offsets[:-1], strict=True)] or [np.zeros(0, np.int64)]
            ),
            gap=np.concatenate([p.gap for p in parts] or [np.zeros(0)]),
            count=np.concatenate([p.count for p in parts] or [np.zeros(0, np.int64)]),
            outside_top_k=sum(p.outside_top_k for p in parts),
            unscored_ends=sum(p.unscored_ends for p in parts),
            invalid_logprobs=sum(p.invalid_logprobs for p in parts),
        )


def _pack(
    lens: np.ndarray,
    top_ids: Sequence[Sequence[Sequence[int]] | np.ndarray | None],
    top_logprobs: Sequence[Sequence[Sequence[float]] | np.ndarray | None],
) -> tuple[np.ndarray, np.ndarray, int]:
    """Every sample's top-k as (positions, K) arrays stacked over samples: ids (-1 = none) and logprobs (NaN =
    none, and a whole row NaN where the record is missing or held NaN/+inf); with the count of such values."""
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    width = 0
    for n, ids, lps in zip(lens.tolist(), top_ids, top_logprobs, strict=True):
        if ids is None or lps is None:
            rows.append((np.full((n, 0), -1, np.int64), np.full((n, 0), np.nan)))
            continue
        a_ids, a_lps = _rect(ids, -1, np.int64, n), _rect(lps, np.nan, np.float64, n)
        k = min(a_ids.shape[1], a_lps.shape[1])
        rows.append((a_ids[:, :k], a_lps[:, :k]))
        width = max(width, k)
    ids_out = np.full((int(lens.sum()), width), -1, np.int64)
    lps_out = np.full((int(lens.sum()), width), np.nan)
    at = 0
    for (a_ids, a_lps), n in zip(rows, lens.tolist(), strict=True):
        k = a_ids.shape[1]
        ids_out[at : at + n, :k] = a_ids
        lps_out[at : at + n, :k] = np.where(a_ids >= 0, a_lps, np.nan)
        at += n
    bad = (np.isnan(lps_out) | (lps_out == np.inf)) & (ids_out >= 0)
    lps_out[bad.any(axis=1)] = np.nan  # a record holding a bad value is not used at all
    return ids_out, lps_out, int(bad.sum())


def _rect(
    rows: Sequence[Sequence[float]] | Sequence[Sequence[int]] | np.ndarray, fill: float, dtype: DTypeLike, n: int
) -> np.ndarray:
    """A ragged per-position list (or 2-D array) as an (n, k) array padded with `fill`; missing positions too."""
    arr: np.ndarray
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        arr = rows.astype(dtype)[:n]
    else:
        cells = [list(r) if r is not None else [] for r in list(rows)[:n]]
        arr = np.full((len(cells), max((len(c) for c in cells), default=0)), fill, dtype)
        for i, c in enumerate(cells):
            if c:
                arr[i, : len(c)] = [fill if v is None else v for v in c]
    if len(arr) < n:
        arr = np.vstack([arr, np.full((n - len(arr), arr.shape[1]), fill, dtype)])
    return arr


def _median_with_absent(group: np.ndarray, present: np.ndarray, n: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per group, the median of its sorted `values` plus (n - present) values of -inf placed first.

    `group` gives each value's group (values sorted within groups, groups contiguous and in order)."""
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    absent = n - present

    def at(rank: np.ndarray) -> np.ndarray:  # the rank-th smallest of the padded group
        inside = rank >= absent
        return np.where(inside, values[starts + np.where(inside, rank - absent, 0)], -np.inf)

    return 0.5 * (at((n - 1) // 2) + at(n // 2))


def _nodes(lens: np.ndarray, flat_tok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trie: per token (flat, sample-major) the node it was chosen at, and per sample the node it ends at.

    Node ids grow with depth; the returned `by_depth` lists the tokens by node id (so depth by depth).
    """
    start = np.cumsum(lens) - lens
    order = np.argsort(-lens, kind="stable")  # the samples reaching depth p are order[:reach[p]]
    reach = np.cumsum(np.bincount(lens, minlength=int(lens.max(initial=0)) + 1)[::-1])[::-1]
    at_node = np.empty(len(flat_tok), dtype=np.int64)
    end_node = np.empty(len(lens), dtype=np.int64)
    by_depth = []
    node, next_id = np.zeros(len(lens), dtype=np.int64), 1
    for p in range(len(reach)):
        going = int(reach[p + 1]) if p + 1 < len(reach) else 0
        end_node[order[going : reach[p]]] = node[going : reach[p]]
        if not going:
            break
        idx = start[order[:going]] + p
        at_node[idx] = node[:going]
        by_depth.append(idx[np.argsort(node[:going], kind="stable")])
        uniq, inv = np.unique((node[:going] << 32) | (flat_tok[idx] & 0xFFFFFFFF), return_inverse=True)
        node, next_id = next_id + inv.ravel(), next_id + len(uniq)
    return at_node, end_node, np.concatenate(by_depth) if by_depth else np.zeros(0, np.int64)


def observe(
    tokens: Sequence[Sequence[int] | np.ndarray],
    top_ids: Sequence[Sequence[Sequence[int]] | np.ndarray | None],
    top_logprobs: Sequence[Sequence[Sequence[float]] | np.ndarray | None],
) -> Observations:
    """The scored trie nodes of one prompt x arm (module docstring).

    tokens[i]: sample i's generated tokens as integers (token ids, or codes of token strings); top_ids[i] and
    top_logprobs[i]: per position its recorded top-k, identities coded like `tokens` (None: not recorded).
    """
    lens = np.array([len(t) for t in tokens], dtype=np.int64)
    flat_tok = np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens] or [np.zeros(0, np.int64)])
    ids, lps, invalid = _pack(lens, top_ids, top_logprobs)
    at_node, end_node, by_depth = _nodes(lens, flat_tok)
    ends = int(np.isin(end_node, at_node).sum())  # ended where another sample of the same prefix went on
    parts, outside, scored = [], 0, 0
    step = max(1, _CHUNK // max(1, ids.shape[1]))
    lo = 0
    while lo < len(by_depth):  # chunks of whole nodes (node ids grow along by_depth) bound the memory
        hi = min(lo + step, len(by_depth))
        while hi < len(by_depth) and at_node[by_depth[hi]] == at_node[by_depth[hi - 1]]:
            hi += 1
        idx = by_depth[lo:hi]
        node, gap, count, missed = _score(at_node[idx], flat_tok[idx], ids[idx], lps[idx])
        parts.append((node + scored, gap, count))
        scored += int(node[-1]) + 1 if len(node) else 0
        outside += missed
        lo = hi
    cat = [np.concatenate([q[c] for q in parts]) if parts else np.zeros(0) for c in range(3)]
    return Observations(cat[0].astype(np.int64), cat[1], cat[2].astype(np.int64), outside, ends, invalid)


def _score(
    node: np.ndarray, chosen: np.ndarray, ids: np.ndarray, lps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The trials at some whole nodes: per candidate of a node with two or more candidates and a scored trial, its
    node (renumbered 0, 1, ...), gap and count; and the number of chosen tokens that were not candidates."""
    cand_key, cand_lp = _reference(node, ids, lps)
    trial_key = (node << 32) | (chosen & 0xFFFFFFFF)
    j = np.minimum(np.searchsorted(cand_key, trial_key), max(len(cand_key) - 1, 0))
    hit = cand_key[j] == trial_key if len(cand_key) else np.zeros(len(trial_key), bool)
    cand_node = cand_key >> 32
    outside = int((np.isin(node, cand_node) & ~hit).sum())
    count = np.bincount(j[hit], minlength=len(cand_key))
    first = np.r_[True, cand_node[1:] != cand_node[:-1]] if len(cand_node) else np.zeros(0, bool)
    seg = np.cumsum(first) - 1
    keep = (np.bincount(seg)[seg] >= 2) & (np.bincount(seg, weights=count)[seg] > 0)
    if not keep.any():
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), outside
    best = np.maximum.reduceat(cand_lp, np.flatnonzero(first))[seg]
    return np.unique(seg[keep], return_inverse=True)[1].ravel(), (cand_lp - best)[keep], count[keep], outside


def _reference(node: np.ndarray, ids: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The candidates of the given nodes: sorted keys (node << 32 | token) and their median logprob."""
    recorded = ~np.isnan(lps).all(axis=1) if lps.shape[1] else np.zeros(len(node), bool)
    first = int(node.min()) if len(node) else 0  # the nodes of a chunk are contiguous ids
    n_node = np.bincount(node[recorded] - first, minlength=int(node.max()) + 1 - first if len(node) else 0)
    row = np.repeat(np.arange(len(node)), ids.shape[1])
    ok = (ids.ravel() >= 0) & recorded[row]
    row, tok, lp = row[ok], ids.ravel()[ok], lps.ravel()[ok]
    key = (node[row] << 32) | (tok & 0xFFFFFFFF)
    order = np.lexsort((row, key))  # a token listed twice in one record counts once
    key, row, lp = key[order], row[order], lp[order]
    dup = np.zeros(len(key), bool)
    dup[1:] = (key[1:] == key[:-1]) & (row[1:] == row[:-1])
    key, lp = key[~dup], lp[~dup]
    order = np.lexsort((lp, key))
    key, lp = key[order], lp[order]
    uniq, present = np.unique(key, return_counts=True)
    if not len(uniq):
        return uniq, lp
    med = _median_with_absent(key, present, n_node[(uniq >> 32) - first], lp)
    finite = np.isfinite(med)
    return uniq[finite], med[finite]


class _Likelihood:
    """l(beta) and l'(beta) of some observations (module docstring), their arrays prepared once."""

    def __init__(self, obs: Observations) -> None:
        self.starts = np.flatnonzero(np.r_[True, obs.node[1:] != obs.node[:-1]])
        self.gap = obs.gap
        self.trials = np.add.reduceat(obs.count, self.starts).astype(np.float64)  # n_v
        self.chosen = float(obs.count.astype(np.float64) @ obs.gap)  # sum of n_vt d_vt

    def value(self, beta: float) -> float:
        if math.isinf(beta):  # each trial then has probability 1/(ties at the top) if it chose the top, else 0
            tied = np.add.reduceat((self.gap == 0).astype(np.float64), self.starts)
            return -math.inf if self.chosen < 0 else -float(self.trials @ np.log(tied))
        return beta * self.chosen - float(self.trials @ np.log(np.add.reduceat(np.exp(beta * self.gap), self.starts)))

    def slope(self, beta: float) -> float:
        w = np.exp(beta * self.gap)
        mean_gap = np.add.reduceat(w * self.gap, self.starts) / np.add.reduceat(w, self.starts)
        return self.chosen - float(self.trials @ mean_gap)


def _crossing(f: Callable[[float], float], start: float) -> float:
    """The beta > 0 where f goes from > 0 (below) to <= 0 (above): bracketed from `start` by factors of 10, then
    refined on log beta. f must change sign once on the side of `start` that is searched."""
    lo = hi = start
    f_lo = f_hi = f(start)
    for _ in range(_MAX_STEPS):
        if f_hi <= 0:
            break
        lo, f_lo, hi = hi, f_hi, hi * 10.0
        f_hi = f(hi)
    for _ in range(_MAX_STEPS):
        if f_lo > 0:
            break
        hi, f_hi, lo = lo, f_lo, lo / 10.0
        f_lo = f(lo)
    if not (f_lo > 0 >= f_hi):
        raise ArithmeticError("no bracket for the background temperature")
    # Illinois (regula falsi that halves the value kept at the end that did not move twice running) on log beta
    a, b, fa, fb = math.log(lo), math.log(hi), f_lo, f_hi
    moved = 0  # +1: a moved last, -1: b moved last
    for _ in range(_MAX_STEPS):
        if b - a <= _REL_TOL:
            break
        c = b - fb * (b - a) / (fb - fa) if math.isfinite(fa - fb) and fa != fb else 0.5 * (a + b)
        c = min(max(c, a + 0.01 * _REL_TOL), b - 0.01 * _REL_TOL)
        fc = f(math.exp(c))
        if fc > 0:
            a, fa = c, fc
            fb = fb / 2 if moved == 1 else fb
            moved = 1
        else:
            b, fb = c, fc
            fa = fa / 2 if moved == -1 else fa
            moved = -1
    return math.exp(0.5 * (a + b))


def estimate(obs: Observations, level: float = 0.95) -> BackgroundTemperature:
    """T_bg by maximum likelihood with its 95 % interval, or the 95 % upper bound when nothing flipped (`level`:
    another confidence level, for compare's difference of two runs)."""
    two_sided = DEVIANCE_TWO_SIDED if level == 0.95 else NormalDist().inv_cdf(0.5 + level / 2) ** 2
    no_flip = DEVIANCE_NO_FLIP if level == 0.95 else -2.0 * math.log(1.0 - level)
    counts = dict(
        trials=obs.trials,
        flips=obs.flips,
        positions=obs.positions,
        outside_top_k=obs.outside_top_k,
        unscored_ends=obs.unscored_ends,
        invalid_logprobs=obs.invalid_logprobs,
    )
    if not obs.positions:
        return BackgroundTemperature("needs-logprobs", None, None, None, **counts)
    lik = _Likelihood(obs)
    below = obs.gap < 0
    scale = 1.0 / float(np.median(-obs.gap[below])) if below.any() else 1.0  # beta of the data's order: a start
    if obs.flips == 0:  # T = 0; bound: P(no flip) >= 5 %
        top = lik.value(math.inf)

        def beyond(beta: float) -> float:
            return 2.0 * (top - lik.value(beta)) - no_flip

        if beyond(0.0) <= 0:
            return BackgroundTemperature("upper-bound", 0.0, 0.0, math.inf, **counts)
        return BackgroundTemperature("upper-bound", 0.0, 0.0, 1.0 / _crossing(beyond, scale), **counts)
    beta_hat = 0.0 if lik.slope(0.0) <= 0 else _crossing(lik.slope, scale)  # 0: no better than uniform
    if beta_hat < _FLAT * scale:  # l'(0) is 0 up to rounding: as good as uniform
        beta_hat = 0.0
    best = lik.value(beta_hat)

    def inside(beta: float) -> float:  # > 0 inside the interval
        return two_sided - 2.0 * (best - lik.value(beta))

    beta_up = _crossing(inside, beta_hat if beta_hat > 0 else scale)
    beta_low = 0.0 if inside(0.0) > 0 else _crossing(lambda beta: -inside(beta), beta_hat)
    if beta_low < _FLAT * scale:  # the deviance at beta = 0 sits on the bound up to rounding: unbounded T
        beta_low = 0.0
    return BackgroundTemperature("estimate", _inverse(beta_hat), 1.0 / beta_up, _inverse(beta_low), **counts)


def _inverse(beta: float) -> float:
    return math.inf if beta == 0 else 1.0 / beta


def background_temperature(
    tokens: Sequence[Sequence[int] | np.ndarray],
    top_ids: Sequence[Sequence[Sequence[int]] | np.ndarray | None],
    top_logprobs: Sequence[Sequence[Sequence[float]] | np.ndarray | None],
) -> BackgroundTemperature:
    """T_bg of one prompt x arm from its samples (see observe for the arguments)."""
    return estimate(observe(tokens, top_ids, top_logprobs))
