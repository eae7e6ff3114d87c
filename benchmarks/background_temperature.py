"""Validation of the background-temperature estimator (#18) on an ideal sampler at known temperatures.

    python benchmarks/background_temperature.py --out benchmarks/background_temperature.json
    python benchmarks/background_temperature.py --runs 200 --samples 5,20 --out /tmp/bt.json   # quick

For every T in --temperatures and every number of samples N in --samples, --runs independent runs of N samples x
--length tokens are drawn from the synthetic trie of tests/synthetic_tries.py (top-k = --k; log-uniform margins at
a share --tie-shares of positions and clear-cut ones elsewhere: 1 is the dense regime, 0.05 a sparse one of few
flips) and T_bg is estimated from each. Per cell: coverage of the 95 % interval (and on which side it misses); over
runs with a flip, the bias of the estimate (median of T_hat / T, and its geometric mean) and the interval's width
(median of upper / lower, and of (upper - lower) / T); the share of runs without a flip (an upper bound) and its
median over T; flips per run; CPU time per estimate. T = 0 rows give the upper bound only. Synthetic only: the same
validation on a real model, sampled by the local engine at known temperatures, needs the real-model issue (#22).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from synthetic_tries import MARGIN_HIGH, MARGIN_LOW, simulate  # noqa: E402

from detaudit.analysis.background_temperature import background_temperature  # noqa: E402


def cell(temperature: float, n: int, length: int, k: int, runs: int, seed: int, tie_share: float) -> dict:
    """The figures of `runs` runs of n samples at one temperature."""
    rng = np.random.default_rng((seed, n, int(round(temperature * 1e9)), int(round(tie_share * 1e6))))
    results, cpu = [], 0.0
    for _ in range(runs):
        data = simulate(rng, n, length, k, temperature, tie_share)
        t0 = time.process_time()
        results.append(background_temperature(*data))
        cpu += time.process_time() - t0
    lower = np.array([r.lower for r in results])
    upper = np.array([r.upper for r in results])
    est = np.array([r.estimate for r in results])
    out = {
        "tie_share": tie_share,
        "temperature": temperature,
        "samples": n,
        "runs": runs,
        "flips_mean": float(np.mean([r.flips for r in results])),
        "upper_bound_share": float(np.mean([r.kind == "upper-bound" for r in results])),
        "cpu_ms_per_estimate": 1000 * cpu / runs,
    }
    if temperature == 0:
        return out | {"upper_median": float(np.median(upper)), "upper_p95": float(np.quantile(upper, 0.95))}
    fitted = np.array([r.kind == "estimate" for r in results])  # the others are upper bounds (estimate 0)
    ratio = est[fitted] / temperature
    finite = np.isfinite(ratio)
    bounded = fitted & np.isfinite(upper)

    def median(x: np.ndarray) -> float | None:
        return float(np.median(x)) if len(x) else None

    return out | {
        "coverage": float(np.mean((lower <= temperature) & (temperature <= upper))),
        "missed_low": float(np.mean(upper < temperature)),  # interval entirely below T
        "missed_high": float(np.mean(lower > temperature)),
        "unbounded_share": float(np.mean(~np.isfinite(upper))),  # too little evidence to bound T above
        "estimate_median_ratio": median(ratio),  # over runs with a flip
        "estimate_geomean_ratio": float(np.exp(np.mean(np.log(ratio[finite])))) if finite.any() else None,
        "width_ratio_median": median(upper[bounded] / lower[bounded]),  # upper / lower, runs with a flip
        "width_over_t_median": median((upper[bounded] - lower[bounded]) / temperature),
        "upper_bound_over_t_median": median(upper[~fitted] / temperature),  # runs without a flip
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temperatures", default="0,1e-4,1e-3,1e-2,0.05")
    ap.add_argument("--samples", default="5,20,80,320", help="N per run, comma-separated")
    ap.add_argument("--length", type=int, default=30, help="tokens per sample")
    ap.add_argument("--k", type=int, default=5, help="top-k recorded")
    ap.add_argument("--tie-shares", default="1,0.05", help="share of positions with a near-tie margin (regimes)")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cells = []
    grid = [
        (share, n, t)
        for share in [float(x) for x in args.tie_shares.split(",")]
        for n in [int(x) for x in args.samples.split(",")]
        for t in [float(x) for x in args.temperatures.split(",")]
    ]
    for share, n, t in grid:
        c = cell(t, n, args.length, args.k, args.runs, args.seed, share)
        cells.append(c)
        shown = {key: (float(f"{v:.4g}") if isinstance(v, float) else v) for key, v in c.items()}
        print(json.dumps(shown), flush=True)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": sys.version.split()[0],
        },
        "numpy": np.__version__,
        "model": {"length": args.length, "k": args.k, "margins": f"log-uniform [{MARGIN_LOW:g}, {MARGIN_HIGH:g}]"},
        "cells": cells,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
