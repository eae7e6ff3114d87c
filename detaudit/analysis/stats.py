"""How much N samples can say: bounds on the divergence rate, and the chance that a rare fork went unseen.

"k unique in N" means little without N (auditing.md §6.1 item 4), so every arm carries these figures.
"""

from __future__ import annotations

import math

from detaudit.analysis.summary_schema import ArmStats

Z95 = 1.959963984540054  # two-sided 95% normal quantile
# Divergence rates for which the summary states the chance of having seen none in N samples.
HINT_RATES = (0.001, 0.01, 0.05)


def clopper_pearson_upper(n: int, alpha: float = 0.05) -> float | None:
    """One-sided upper bound on the divergence probability after N agreeing samples: 1 - alpha^(1/N)."""
    if n <= 0:
        return None
    return 1.0 - alpha ** (1.0 / n)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion; well-behaved near 0 and 1 where the normal interval is not."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def miss_probability(rate: float, n: int) -> float:
    """Chance that N independent samples show no divergence although each diverges with probability `rate`."""
    return (1.0 - rate) ** n


def samples_needed(rate: float, confidence: float = 0.95) -> int:
    """Smallest N whose samples show a divergence of this rate at least once with the given confidence."""
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - rate))


def arm_stats(n_ok: int, modal_count: int, unique: int) -> ArmStats:
    """The statistics block of one arm (docs/summary.md, "stats")."""
    interval = wilson_interval(modal_count, n_ok)
    return ArmStats(
        modal_share=modal_count / n_ok if n_ok else None,
        modal_share_wilson95=list(interval) if interval else None,
        divergence_rate_upper95=clopper_pearson_upper(n_ok) if unique == 1 else None,
        miss_probability={str(r): miss_probability(r, n_ok) for r in HINT_RATES} if n_ok else None,
        samples_needed95={str(r): samples_needed(r) for r in HINT_RATES},
    )
