"""A cause for every fork (issue #18): labels with the evidence behind them, and the share of divergence per cause.

A fork is a trie node of one prompt's samples, all arms pooled, where the samples take two or more branches. The
labels (several may apply; docs/background_temperature.md has the method):

- `near-tie`: the top-1 - top-2 margin at the fork is within what rounding the logits to the model's dtype can
  erase. A logit x in a format of p significant bits (bf16: 8, fp16: 11, fp32: 24) is rounded by up to
  |x| * 2^-p; two logits rounded in opposite directions move their difference by up to 2 |x| 2^-p. With
  |x| = 32 (top logits of current LLMs sit between about 10 and 40) that is 0.25 in bf16, 2^-5 in fp16 and
  3.8e-6 in fp32: a margin at or below it can flip from rounding alone.
- `load`: the fork appears in loaded arms, never in the serial arm (concurrency 1). Where the serial arm
  reaches the fork's prefix with n_s samples that all take one branch while loaded samples take another at
  rate r, the chance that the serial arm shows none were it as noisy is (1 - r)^n_s; where the serial arm
  (N_s samples) never reaches the prefix that a share q of loaded samples reach, it is (1 - q)^N_s. Labelled
  when that chance is below alpha.
- `fingerprint`: the branches split by system_fingerprint: a permutation test (chi-square statistic) of branch
  against fingerprint, with Cramer's V as the effect.
- `cache`: the same against the cold/warm cache state, permuting among samples of equal concurrency (so load
  does not pass for cache; a cold arm and a warm arm of one concurrency are compared with each other, and within
  a load arm the first, cold request with the warm rest).
- `time`: the branches cluster in time within an arm: the Kolmogorov-Smirnov distance between the start times
  of the modal branch's samples and the others', averaged over arms weighted by samples, against a permutation
  of the branches within each arm (between arms, time differs by design: arms run one after another). It
  catches a drift (one branch before a time, another after) as well as a burst.
- `unexplained`: none of the above.
A permutation label needs p < alpha (0.01: a few tests run per fork) and an effect >= 0.5 (the cause must
account for most of the split, not merely be associated with it in a large run).

Share of divergence: a fork's departures are the samples that reach it and do not take its modal branch; a
prompt's (or run's) divergence is the sum over its forks. The share of a cause is the departures at forks
carrying that label over all departures. Labels overlap, so the shares of the causes other than `unexplained`
can add up to more than 1; `unexplained` is 1 - the share of forks with any label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

CAUSES = ("near-tie", "load", "fingerprint", "cache", "time", "unexplained")
SIGNIFICAND_BITS = {"bfloat16": 8, "float16": 11, "float32": 24}  # implicit leading bit included
LOGIT_MAGNITUDE = 32.0
_PERMUTED_CELLS = 1 << 22  # permuted labels held at once in a permutation test


def near_tie_threshold(dtype: str = "bfloat16", logit_magnitude: float = LOGIT_MAGNITUDE) -> float:
    """The largest margin two roundings of logits of this magnitude to `dtype` can erase (module docstring)."""
    return 2.0 * logit_magnitude * 2.0 ** -SIGNIFICAND_BITS[dtype]


@dataclass(frozen=True)
class Samples:
    """One prompt's ok samples, all arms: one entry per sample row (row i of every field is sample i)."""

    arm: Sequence[str]
    concurrency: np.ndarray  # int: 1 is the serial arm
    fingerprint: Sequence[str | None]
    started_at: np.ndarray  # float seconds; NaN where unknown
    cache: Sequence[str | None]  # "cold" / "warm"; None where unknown


@dataclass(frozen=True)
class ForkRows:
    """A fork: the sample rows that reach it and the branch each took (0, 1, ...; ending there is a branch)."""

    position: int
    margin: float | None  # top-1 - top-2 logprob at the fork on the modal branch; None if not recorded
    rows: np.ndarray
    branch: np.ndarray


@dataclass(frozen=True)
class Evidence:
    label: str
    detail: str
    p_value: float | None = None
    effect: float | None = None


@dataclass(frozen=True)
class ForkCause:
    position: int
    departures: int
    labels: tuple[str, ...]
    evidence: tuple[Evidence, ...]


@dataclass(frozen=True)
class CauseConfig:
    dtype: str = "bfloat16"
    logit_magnitude: float = LOGIT_MAGNITUDE
    alpha: float = 0.01
    min_effect: float = 0.5
    permutations: int = 999
    seed: int = 0


def _modal(branch: np.ndarray) -> int:
    """The branch most samples took; the lowest-numbered one on a tie."""
    return int(np.argmax(np.bincount(branch)))


def label_forks(samples: Samples, forks: Sequence[ForkRows], config: CauseConfig = CauseConfig()) -> list[ForkCause]:
    """Every fork of one prompt with its labels and their evidence (module docstring)."""
    out = []
    for fork in forks:
        rng = np.random.default_rng((config.seed, fork.position, len(fork.rows)))
        found = [
            e
            for e in (
                _near_tie(fork, config),
                _load(samples, fork, config),
                _categorical("fingerprint", samples.fingerprint, None, fork, config, rng),
                _categorical("cache", samples.cache, np.asarray(samples.concurrency), fork, config, rng),
                _time(samples, fork, config, rng),
            )
            if e is not None
        ]
        if not found:
            found = [Evidence("unexplained", "no margin near a tie, no split by load, fingerprint, cache or time")]
        departures = len(fork.branch) - int(np.bincount(fork.branch).max())
        out.append(ForkCause(fork.position, departures, tuple(e.label for e in found), tuple(found)))
    return out


def divergence_shares(causes: Iterable[ForkCause]) -> dict[str, float] | None:
    """Per cause, its forks' departures over all departures (module docstring); None when nothing diverged.

    Pass one prompt's forks for the prompt's shares, every prompt's for the run's."""
    causes = list(causes)
    total = sum(c.departures for c in causes)
    if not total:
        return None
    return {label: sum(c.departures for c in causes if label in c.labels) / total for label in CAUSES}


def _near_tie(fork: ForkRows, config: CauseConfig) -> Evidence | None:
    limit = near_tie_threshold(config.dtype, config.logit_magnitude)
    if fork.margin is None or fork.margin > limit:
        return None
    detail = (
        f"margin {fork.margin:.3g} <= {limit:.3g}: two {config.dtype} roundings of logits ~{config.logit_magnitude:g}"
    )
    return Evidence("near-tie", detail, effect=fork.margin)


def _load(samples: Samples, fork: ForkRows, config: CauseConfig) -> Evidence | None:
    all_serial = np.asarray(samples.concurrency) == 1
    serial = all_serial[fork.rows]
    loaded_branch = fork.branch[~serial]
    if not all_serial.any() or not len(loaded_branch):
        return None
    n_s = int(serial.sum())
    if n_s:
        taken = np.unique(fork.branch[serial])
        if len(taken) > 1:
            return None  # the serial arm forks here too
        rate = float(np.mean(loaded_branch != taken[0]))
        chance = (1.0 - rate) ** n_s
        detail = (
            f"the serial arm's {n_s} samples all take branch {taken[0]}; loaded samples take another "
            f"{rate:.1%} of the time (chance of none in the serial arm at that rate: {chance:.2g})"
        )
    else:
        n_all = int(all_serial.sum())
        rate = len(loaded_branch) / int((~all_serial).sum())
        chance = (1.0 - rate) ** n_all
        detail = (
            f"the serial arm ({n_all} samples) never reaches this prefix; {rate:.1%} of loaded samples do "
            f"(chance that none of the serial samples would at that rate: {chance:.2g})"
        )
    return Evidence("load", detail, p_value=chance, effect=rate) if rate > 0 and chance < config.alpha else None


def _permuted(branch: np.ndarray, strata: np.ndarray, times: int, rng: np.random.Generator) -> np.ndarray:
    """`times` copies of `branch` (rows), each shuffled within the strata."""
    out = np.tile(branch, (times, 1))
    for s in np.unique(strata):
        at = np.flatnonzero(strata == s)
        out[:, at] = rng.permuted(out[:, at], axis=1)
    return out


def _by_permutation(
    x: np.ndarray, strata: np.ndarray, times: int, rng: np.random.Generator, stat: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """`stat` of x (first) and of `times` copies of x shuffled within the strata, the copies made a chunk at a time
    (at most _PERMUTED_CELLS labels held at once: a fork of 100k samples does not take 999 x 100k of memory)."""
    out = [stat(x[None, :])]
    chunk = max(1, _PERMUTED_CELLS // max(1, len(x)))
    for start in range(0, times, chunk):
        out.append(stat(_permuted(x, strata, min(chunk, times - start), rng)))
    return np.concatenate(out)


def _p_value(observed: float, permuted: np.ndarray) -> float:
    return float((1 + np.sum(permuted >= observed - 1e-12)) / (len(permuted) + 1))


def _categorical(
    label: str,
    values: Sequence[str | None],
    strata_of: np.ndarray | None,
    fork: ForkRows,
    config: CauseConfig,
    rng: np.random.Generator,
) -> Evidence | None:
    """Branch against a categorical value of the samples (fingerprint, cache state): chi-square by permutation."""
    known = np.array([values[r] is not None for r in fork.rows.tolist()], dtype=bool)
    rows, branch = fork.rows[known], fork.branch[known]
    names, value = np.unique(np.array([values[r] for r in rows.tolist()], dtype=object), return_inverse=True)
    if len(names) < 2 or len(np.unique(branch)) < 2:
        return None
    strata = strata_of[rows] if strata_of is not None else np.zeros(len(rows), np.int64)
    _, strata = np.unique(strata, return_inverse=True)
    _, branch = np.unique(branch, return_inverse=True)
    nb, nv = int(branch.max()) + 1, len(names)
    expected = np.outer(np.bincount(branch, minlength=nb), np.bincount(value.ravel(), minlength=nv)) / len(rows)

    def tables(perms: np.ndarray) -> np.ndarray:
        cells = perms * nv + value.ravel() + (np.arange(len(perms)) * nb * nv)[:, None]
        return np.bincount(cells.ravel(), minlength=len(perms) * nb * nv).reshape(len(perms), nb, nv)

    def chi2_of(perms: np.ndarray) -> np.ndarray:
        return (((tables(perms) - expected) ** 2) / np.where(expected > 0, expected, 1.0)).sum(axis=(1, 2))

    chi2 = _by_permutation(branch, strata.ravel(), config.permutations, rng, chi2_of)
    table = tables(branch[None, :])
    p = _p_value(chi2[0], chi2[1:])
    v = float(np.sqrt(chi2[0] / (len(rows) * (min(nb, nv) - 1))))
    if p >= config.alpha or v < config.min_effect:
        return None
    split = "; ".join(
        f"{name}: " + ", ".join(f"branch {b} x{int(n)}" for b, n in enumerate(table[0][:, j]) if n)
        for j, name in enumerate(names.tolist())
    )
    return Evidence(label, f"{split} (Cramer's V {v:.2f}, permutation p = {p:.2g})", p_value=p, effect=v)


def _time(samples: Samples, fork: ForkRows, config: CauseConfig, rng: np.random.Generator) -> Evidence | None:
    """Start times of the modal branch's samples against the others', within each arm: KS distance by permutation."""
    t = np.asarray(samples.started_at, dtype=np.float64)[fork.rows]
    arm = np.asarray(samples.arm)[fork.rows]
    known = np.isfinite(t)
    modal = (fork.branch == _modal(fork.branch))[known]
    t, arm = t[known], arm[known]
    order = np.lexsort((t, arm))
    t, arm, modal = t[order], arm[order], modal[order]
    arms = [at for a in np.unique(arm) if 0 < int(modal[at := np.flatnonzero(arm == a)].sum()) < len(at)]
    if not arms:
        return None
    weight = sum(len(at) for at in arms)

    def ks_of(perms: np.ndarray) -> np.ndarray:
        total = np.zeros(len(perms))
        for at in arms:
            n_m = int(modal[at].sum())
            g = perms[:, at].astype(np.float64)
            gap = np.cumsum(g, axis=1) / n_m - np.cumsum(1.0 - g, axis=1) / (len(at) - n_m)
            last_of_tie = np.r_[t[at][1:] != t[at][:-1], True]  # the CDFs step only after the last of equal times
            total += len(at) * np.abs(gap[:, last_of_tie]).max(axis=1)
        return total / weight

    ks = _by_permutation(modal, arm, config.permutations, rng, ks_of)
    p = _p_value(ks[0], ks[1:])
    if p >= config.alpha or ks[0] < config.min_effect:
        return None
    detail = (
        f"start times of the modal branch and the others differ within arms (KS {ks[0]:.2f}, permutation p = {p:.2g})"
    )
    return Evidence("time", detail, p_value=p, effect=float(ks[0]))
