"""Validation of the background temperature (#18) on the local engine sampling a model at known temperatures.

    python benchmarks/background_temperature_engine.py --out benchmarks/background_temperature_engine.json
    python benchmarks/background_temperature_engine.py --model smollm2 --kernels stock --samples 16 --trials 10 \
        --load-samples 0 --out benchmarks/background_temperature_smollm2.json
    python benchmarks/background_temperature_engine.py --model smollm2 --device cuda --samples 16,64 --trials 60,30 \
        --out benchmarks/background_temperature_smollm2_h200.json                                  # on a GPU

Known temperatures: for every T in --temperatures and N in --samples, --trials trials each draw N samples of one
prompt (a prompt per trial) at temperature T from the engine (fp32, batch-invariant kernels, a seed per sample;
tests/engine_temperature.py) and estimate T_bg from their tokens and top-k logprobs alone. Coverage counts a trial
as covered when T lies in its 95 % interval; a trial where nothing flipped gives the upper bound [0, upper], covered
when T <= upper (at small T that is most trials: few near-ties are close enough to flip). Per cell: coverage, the
trials that gave an estimate, the median T_hat / T over those and their median upper / lower (interval width), the
median upper bound over the others.

Load: `detaudit local` runs of the same model at temperature 0 under the mixed load scenario (16 in flight, the
serial arm beside it): with batch-invariant kernels every sample agrees, T_bg is an upper bound near 0; with stock
kernels the logits move with the batch, samples flip at near-ties, and T_bg > 0 with an interval excluding 0.
Without the engine's prefix cache, so that every request's prefill is batched with whatever else runs.

Without --model, a tiny random qwen3 (detaudit.tiny) with its output layer scaled by --sharpen (random-init logits
are nearly flat; scaled, their top-1 - top-2 margins are of order 1 like a trained model's) samples at known
temperatures, and the plain one (whose flat logits are full of near-ties, as in tests/test_local.py) runs under load.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from engine_temperature import covers, engine, sharpen, trial  # noqa: E402

from detaudit.cli.app import main as detaudit_main  # noqa: E402


def cell(eng, temperature: float, n: int, trials: int, first: int, max_tokens: int, top_k: int) -> dict:
    results, cpu = [], 0.0
    for i in range(trials):
        t0 = time.process_time()
        results.append(trial(eng, first + i, n, temperature, max_tokens, top_k))
        cpu += time.process_time() - t0
    fitted = [r for r in results if r.kind == "estimate"]
    bounds = [r.upper for r in results if r.kind == "upper-bound"]
    out = {
        "temperature": temperature,
        "samples": n,
        "trials": trials,
        "covered": sum(covers(r, temperature) for r in results),
        "estimates": len(fitted),
        "upper_bounds": len(bounds),
        "covered_estimates": sum(covers(r, temperature) for r in fitted),
        "flips_mean": float(np.mean([r.flips for r in results])),
        "outside_top_k": int(sum(r.outside_top_k for r in results)),
        "cpu_s_per_trial": cpu / trials,
    }
    if fitted:
        ratio = np.array([r.estimate / temperature for r in fitted])
        width = np.array([r.upper / r.lower for r in fitted])
        out |= {
            "median_estimate_over_t": float(np.median(ratio)),
            "geomean_estimate_over_t": float(np.exp(np.mean(np.log(ratio)))),
            "median_upper_over_lower": float(np.median(width)),
        }
    if bounds:
        out["median_upper_bound"] = float(np.median(bounds))
    return out


def load_run(model: Path, out: Path, kernels: str, n: int, max_tokens: int, device: str) -> dict:
    """`detaudit local` at temperature 0, serial and mixed (16 in flight); the summary's T_bg per arm."""
    detaudit_main(
        ["local", "--model", str(model), "--kernels", kernels, "--out", str(out), "--prompt",
         "Tell me about Richard Feynman", "-n", str(n), "--scenario", "serial,mixed", "--max-tokens",
         str(max_tokens), "--max-batch", "16", "--max-batched-tokens", "32", "--dtype", "bfloat16",
         "--top-logprobs", "20", "--device", device, "--no-prefix-cache"]
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    bg = summary["background"]
    return {
        "kernels": kernels,
        "samples_per_arm": n,
        "unique": {a["arm"]: a["unique"] for a in summary["prompts"][0]["arms"]},
        "arms": {a["arm"]: a["temperature"] for a in bg["arms"]},
        "shares": bg["shares"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a model directory (default: a sharpened tiny random qwen3)")
    ap.add_argument("--sharpen", type=float, default=10.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kernels", default="batch-invariant", help="stock serves too: a trial's N samples share batches")
    ap.add_argument("--temperatures", default="1e-4,1e-3,1e-2,0.05")
    ap.add_argument("--samples", default="4,16,64")
    ap.add_argument("--trials", default="40,60,15", help="trials per cell, one per --samples value (or one for all)")
    ap.add_argument("--first-trial", type=int, default=0, help="number of the first trial (prompt and seeds)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--load-samples", type=int, default=100, help="samples per arm of the load runs (0: skip)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bt-engine-"))
    model = load_model = args.model
    if model is None:  # the load runs take the plain tiny model: its flat logits are full of near-ties
        from detaudit.tiny import build_tiny_model

        load_model = build_tiny_model(work / "tiny", "qwen3")
        model = sharpen(build_tiny_model(work / "sharp", "qwen3"), args.sharpen)
    temps = [float(t) for t in args.temperatures.split(",")]
    ns = [int(n) for n in args.samples.split(",")]
    trials = [int(t) for t in args.trials.split(",")]
    trials = trials * len(ns) if len(trials) == 1 else trials
    eng = engine(model, max_batch=max(ns), device=args.device, kernels=args.kernels)
    cells, first = [], args.first_trial
    for n, r in zip(ns, trials, strict=True):
        for t in temps:
            c = cell(eng, t, n, r, first, args.max_tokens, args.top_k)
            first += r
            cells.append(c)
            print(json.dumps(c), flush=True)
    loads = []
    if args.load_samples:
        for kernels in ("batch-invariant", "stock"):
            loads.append(load_run(load_model, work / kernels, kernels, args.load_samples, args.max_tokens, args.device))
            print(json.dumps(loads[-1]), flush=True)
    doc = {
        "benchmark": "background_temperature_engine",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version},
        "torch": torch.__version__,
        "model": str(args.model) if args.model else f"tiny random qwen3, output layer x{args.sharpen:g}",
        "engine": {"device": args.device, "dtype": "float32", "kernels": args.kernels, "top_k": args.top_k},
        "max_tokens": args.max_tokens,
        "cells": cells,
        "coverage": {
            "covered": sum(c["covered"] for c in cells),
            "trials": sum(c["trials"] for c in cells),
            "estimates_covered": sum(c["covered_estimates"] for c in cells),
            "estimates": sum(c["estimates"] for c in cells),
        },
        "load_runs": loads,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["coverage"]))


if __name__ == "__main__":
    main()
