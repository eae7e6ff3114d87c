"""One device call that tunes the matmul tile configs for the local engine's Qwen3-1.7B shapes (run on the H100).

The shipped configs were tuned on Llama-3-8B shapes (K, N >= 4096); the engine's decode steps (M = 1..128) on a
Qwen3-1.7B-shaped model have N = 2048 and K = 2048 / 6144, where the shipped tiles leave most of the 132 SMs idle
(no split-K allowed). For each (K, N) and M every candidate is first run on a NaN-poisoned output and checked
bitwise against the shipped config (a config that changes the bits may never be dispatched), then timed against
cuBLAS (``F.linear``) in the same process with CUDA-graph medians. A last pass checks every candidate against the
shipped config in fp16 too (bias in the epilogue), as ``tests/gpu`` does. Writes ``tuning_qwen3.json`` under
``--out`` after each point.

    python benchmarks/kernel_tuning_qwen3.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kernel_tuning import bench, device_header, rel_err, try_candidate  # benchmarks/ is sys.path[0] as a script

ROOT = Path(__file__).resolve().parents[1]
# (K, N, what): qkv (16 q + 2 x 8 kv heads of 128) == the tiny tokenizer's 4096-wide lm_head, o_proj, gate_up, down,
# and the real Qwen3 vocabulary.
SHAPES = [
    (2048, 4096, "qkv / lm_head(4096)"),
    (2048, 2048, "o_proj"),
    (2048, 12288, "gate_up"),
    (6144, 2048, "down"),
    (2048, 151936, "lm_head(151936)"),
]
# Most important first (offline decode is mostly M = 128), so a budget cut drops the least useful points.
MS = [128, 1, 64, 16, 96, 32, 8, 256, 512, 2048]
C = tuple[int, int, int, int, int, int, bool, bool]  # bm, bn, bk, group, warps, stages, tma, ws
GEMV: list[C] = [
    (16, 32, 512, 8, 4, 4, False, False),
    (16, 32, 256, 8, 2, 5, False, False),
    (16, 16, 512, 8, 4, 4, False, False),
    (16, 16, 256, 8, 2, 6, False, False),
    (16, 64, 256, 8, 4, 3, False, False),
    (16, 32, 256, 8, 4, 4, False, False),
    (16, 16, 128, 8, 2, 8, False, False),
    (16, 32, 128, 8, 2, 6, False, False),
]
MID: list[C] = [
    (16, 64, 256, 8, 4, 3, False, False),
    (32, 32, 256, 8, 4, 4, False, False),
    (32, 64, 128, 8, 4, 4, False, False),
    (32, 64, 256, 8, 4, 3, False, False),
    (32, 128, 128, 8, 4, 4, False, False),
    (64, 32, 128, 8, 4, 4, False, False),
    (64, 64, 128, 8, 4, 4, False, False),
    (64, 64, 64, 8, 4, 5, False, False),
    (64, 128, 128, 8, 4, 3, False, False),
    (32, 32, 128, 8, 2, 5, False, False),
    (64, 64, 128, 8, 4, 4, True, False),
]
BIG: list[C] = [
    (64, 128, 128, 8, 4, 3, False, False),
    (64, 64, 128, 8, 4, 4, False, False),
    (128, 128, 64, 8, 4, 4, True, False),
    (128, 128, 64, 8, 4, 4, True, True),
    (128, 256, 64, 8, 8, 4, True, False),
    (128, 256, 64, 8, 8, 3, True, False),
    (64, 128, 64, 8, 4, 4, True, False),
    (128, 128, 64, 8, 8, 4, True, False),
    (64, 64, 128, 8, 4, 4, True, False),
]

T0 = time.time()
REP = 20  # CUDA-graph replays per timing (fewer than kernel_tuning.py's 30: ten times more points)


def _cands(m: int) -> list[C]:
    return GEMV if m <= 16 else MID if m <= 128 else BIG


def sweep(tm: Any, res: dict[str, Any], out: Path, budget: float) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = {
        k_n: torch.randn(k_n[1], k_n[0], device="cuda", dtype=torch.bfloat16, generator=g) / math.sqrt(k_n[0])
        for k_n in {(k, n) for k, n, _ in SHAPES}
    }
    xs = {
        k: torch.randn(max(MS), k, device="cuda", dtype=torch.bfloat16, generator=g) for k in {k for k, _, _ in SHAPES}
    }
    rows: list[dict[str, Any]] = res["points"]
    for m in MS:
        for k, n, what in SHAPES:
            if time.time() - T0 > budget:
                res["cut_at"] = [m, k, n]
                return
            w, x = ws[(k, n)], xs[k][:m]
            base = tm.select_config(m, torch.bfloat16, x.device, n, k)
            ref = tm.matmul(x, w.t(), config=base)
            row: dict[str, Any] = {
                "K": k,
                "N": n,
                "M": m,
                "what": what,
                "base": list(base),
                "base_rel_err": rel_err(ref, F.linear(x.float(), w.float())),
                "cublas_ms": bench(lambda x=x, w=w: F.linear(x, w), rep=REP),
            }
            row["base_ms"] = bench(lambda x=x, w=w, c=base: tm.matmul(x, w.t(), config=c), rep=REP)
            row["base_ratio"] = row["cublas_ms"] / row["base_ms"]
            row["cands"] = {
                str(c): try_candidate(tm, x, w, tm.Config(*c), ref, row["cublas_ms"], rep=REP) for c in _cands(m)
            }
            ok = {c: e for c, e in row["cands"].items() if e.get("same_bits") and "ms" in e}
            best = min(ok, key=lambda c: ok[c]["ms"]) if ok else None
            row["best"], row["best_ratio"] = best, (ok[best]["ratio"] if best else None)
            rows.append(row)
            print(
                f"K={k} N={n} M={m}: cuBLAS {row['cublas_ms'] * 1e3:.1f} us; base x{row['base_ratio']:.3f} "
                f"{tuple(base)[:6]}; best x{row['best_ratio'] or float('nan'):.3f} {best}; differing: "
                f"{[c for c, e in row['cands'].items() if e.get('same_bits') is False]}; "
                f"errors {sum('error' in e for e in row['cands'].values())} ({time.time() - T0:.0f} s)",
                flush=True,
            )
            (out / "tuning_qwen3.json").write_text(json.dumps(res, indent=1))


def agreement(tm: Any, res: dict[str, Any]) -> None:
    """Every candidate vs the shipped config in fp16 (bf16 is checked at every swept point), with a bias."""
    cands = list(dict.fromkeys(GEMV + MID + BIG))
    table: dict[str, Any] = {}
    g = torch.Generator().manual_seed(1)
    dtype = torch.float16
    m, k, n = 300, 2048, 2048
    a = torch.randn(m, k, generator=g).to("cuda", dtype)
    w = torch.randn(n, k, generator=g).to("cuda", dtype)
    b = torch.randn(n, generator=g).to("cuda", dtype)
    ref = tm.matmul(a, w.t(), b, config=tm.select_config(m, dtype, a.device, n, k))
    for c in cands:
        try:
            table[str(c)] = bool(torch.equal(tm.matmul(a, w.t(), b, config=tm.Config(*c)), ref))
        except Exception as ex:
            table[str(c)] = f"{type(ex).__name__}: {str(ex)[:200]}"
    res["agreement"] = table
    print("agreement failures:", {c: v for c, v in table.items() if v is not True}, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds after which no new point is timed")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "kernels"))  # triton_matmul imports nothing from detaudit
    import triton_matmul as tm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {
        **device_header(),
        "configs_agree_bf16": tm.configs_agree(torch.bfloat16, torch.device("cuda")),
        "points": [],
    }
    try:
        sweep(tm, res, out, args.budget)
    except Exception as ex:  # keep the points measured so far
        res["sweep_error"] = f"{type(ex).__name__}: {str(ex)[:500]}"
        print("sweep FAILED:", res["sweep_error"], flush=True)
    try:
        agreement(tm, res)
    except Exception as ex:
        res["agreement_error"] = f"{type(ex).__name__}: {str(ex)[:500]}"
    res["seconds"] = time.time() - T0
    (out / "tuning_qwen3.json").write_text(json.dumps(res, indent=1))
    print(f"done at {res['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
