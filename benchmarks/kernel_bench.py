"""Benchmark detaudit's batch-invariant kernels against stock torch on a CUDA GPU (run on the H100).

Matmul: ours vs default cuBLAS (``F.linear``, nn.Linear layout) vs thinking-machines-lab's ``matmul_persistent``
(loaded from a checkout outside the repo, ``--tml path/to/batch_invariant_ops.py``; never vendored), on Llama-3-8B
linear shapes. Row-wise: achieved bandwidth of RMSNorm / fused residual RMSNorm / log-softmax against a
device-to-device copy. Attention: decode against ``F.scaled_dot_product_attention`` (flash backend). MoE
(``--only moe``): one Qwen3-30B-A3B layer's experts (128 x 768 wide, top-8 of hidden 2048), the batch-invariant
grouped GEMMs (one fixed tile) against the stock grouped implementation (tile and split-K chosen by tokens per
expert), experts alone and the whole op (router, top-k, experts, combine).
Writes ``kernels.json`` (every number) and prints markdown tables. ``--tune`` also times candidate tile configs.

    python benchmarks/kernel_bench.py --out /tmp/bench --tml .third_party/tml/tml_bio.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kernel_tuning import paged_decode_case  # benchmarks/ is sys.path[0] when run as a script

# Attention split schedules timed beside the shipped one (256-key splits below position 1024, 512 beyond).
ALT_SCHEDULES = {"uniform512": 512, "uniform256": 256}
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256)]  # (K, N)
COLD_BYTES = 256 << 20  # weight copies rotated through for the cold-weight GEMV timings
MS = [1, 4, 16, 64, 256, 1024, 4096, 8192]
TUNE_CANDIDATES = {  # extra tile configs timed with --tune (the shipped table came from earlier sweeps)
    "small": [(16, 64, 128, 8, 4, 4), (16, 32, 256, 8, 4, 4), (16, 64, 256, 8, 4, 3), (16, 32, 512, 8, 4, 3)],
    "mid": [(64, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 3), (64, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4)],
    "large": [(128, 128, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3), (256, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3)],
}


def _bench(fn: Any, rep: int = 60, graph: bool = True) -> float:
    """Median milliseconds. ``graph``: CUDA-graph replays (triton.testing.do_bench_cudagraph), i.e. kernel time
    without Python launch overhead, which an engine hides the same way; else plain do_bench (CUDA events)."""
    import triton.testing

    # do_bench_cudagraph runs fn on a fresh side stream that does not wait for the default stream: without this
    # sync it can read inputs (a paged attention's block table!) before they are written.
    torch.cuda.synchronize()
    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=15, rep=rep, return_mode="median"))


def _cold_ms(fn: Any, ws: list[torch.Tensor]) -> float:
    """ms per call of fn(w) when consecutive calls read different weights whose total exceeds L2 (50 MB on an
    H100): how a decoder's layers meet their weights. Graph replays of one call per weight, divided by the count."""
    return _bench(lambda: [fn(w) for w in ws]) / len(ws)


def _load_tml(path: str | None) -> Any:
    if not path or not Path(path).exists():
        return None
    spec = importlib.util.spec_from_file_location("tml_bio", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and a large bf16 matmul rate."""
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), graph=False)
    ms_g = _bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms_mm = _bench(lambda: a @ b, graph=False)
    return {
        "copy_GBps": 2 * 2 * 1024**3 / ms / 1e6,
        "copy_graph_GBps": 2 * 2 * 1024**3 / ms_g / 1e6,
        "mm8192_bf16_TFLOPs": 2 * 8192**3 / ms_mm / 1e9,
    }


def _rate(m: int, k: int, n: int, ms: float) -> dict[str, float]:
    """TFLOP/s and GB/s (operands + output, bf16) for one matmul timing."""
    return {"ms": ms, "TFLOPs": 2 * m * k * n / ms / 1e9, "GBps": 2 * (m * k + k * n + m * n) / ms / 1e6}


def bench_matmul(tml: Any, dtype: torch.dtype, tune: bool, ms_list: list[int]) -> list[dict[str, Any]]:
    from detaudit.kernels import triton_matmul as tm

    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
        x_all = torch.randn(max(ms_list), k, device="cuda", dtype=dtype)
        for m in ms_list:
            x = x_all[:m]
            row: dict[str, Any] = {"K": k, "N": n, "M": m, "dtype": str(dtype).removeprefix("torch.")}
            ref1 = {"cublas": F.linear(x_all[:1], w), "ours": tm.matmul(x_all[:1], w.t())}
            row["cublas"] = _rate(m, k, n, _bench(lambda x=x, w=w: F.linear(x, w)))
            row["cublas"]["inv"] = bool(torch.equal(F.linear(x, w)[:1], ref1["cublas"]))
            row["ours"] = _rate(m, k, n, _bench(lambda x=x, w=w: tm.matmul(x, w.t())))
            row["ours"]["inv"] = bool(torch.equal(tm.matmul(x, w.t())[:1], ref1["ours"]))
            row["ours"]["config"] = list(tm.select_config(m, dtype, x.device, n, k))
            row["ours"]["max_rel_err"] = float(
                (tm.matmul(x, w.t()).float() - F.linear(x, w).float()).norm() / F.linear(x, w).float().norm()
            )
            if tml is not None:
                row["tml"] = _rate(m, k, n, _bench(lambda x=x, w=w: tml.matmul_persistent(x, w.t())))
                row["tml"]["inv"] = bool(
                    torch.equal(tml.matmul_persistent(x, w.t())[:1], tml.matmul_persistent(x_all[:1], w.t()))
                )
            if tune:
                bucket = "small" if m <= 16 else "mid" if m <= 256 else "large"
                row["tune"] = {}
                for c in TUNE_CANDIDATES[bucket]:
                    cfg = tm.Config(*c)
                    try:
                        row["tune"][str(c)] = _bench(lambda x=x, w=w, cfg=cfg: tm.matmul(x, w.t(), config=cfg), rep=30)
                    except Exception as e:  # a config that does not fit shared memory
                        row["tune"][str(c)] = f"error: {type(e).__name__}"
            row["ratio_ours"] = row["cublas"]["ms"] / row["ours"]["ms"]
            if m <= 4 and w.nbytes < COLD_BYTES:  # the GEMV again with cold weights, as a decoder's layers read them
                ws = [w] + [torch.randn_like(w) for _ in range(COLD_BYTES // w.nbytes)]
                row["cold_ratio_ours"] = _cold_ms(lambda ww, x=x: F.linear(x, ww), ws) / _cold_ms(
                    lambda ww, x=x: tm.matmul(x, ww.t()), ws
                )
                del ws
            if tml is not None:
                row["ratio_tml"] = row["cublas"]["ms"] / row["tml"]["ms"]
            rows.append(row)
            print(
                f"mm K={k} N={n} M={m}: cuBLAS {row['cublas']['ms']:.4f} ms, ours x{row['ratio_ours']:.2f}"
                + (f", tml x{row['ratio_tml']:.2f}" if tml is not None else "")
                + (f", cold weights: ours x{row['cold_ratio_ours']:.2f}" if "cold_ratio_ours" in row else ""),
                flush=True,
            )
    return rows


def bench_rowwise(copy_gbps: float) -> list[dict[str, Any]]:
    from detaudit.kernels import triton_rowwise as tr

    rows = []
    for m, d in [(4096, 4096), (16384, 4096), (16384, 8192)]:
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(d, device="cuda", dtype=torch.bfloat16)
        for name, fn, stock, nbytes in [
            (
                "rms_norm",
                lambda x=x, w=w: tr.rms_norm(x, w, 1e-6),
                lambda x=x, w=w, d=d: F.rms_norm(x, (d,), w, 1e-6),
                2 * m * d * 2,
            ),
            (
                "fused_add_rms_norm",
                lambda x=x, w=w, r=r: tr.rms_norm(x, w, 1e-6, residual=r),
                lambda x=x, w=w, r=r, d=d: F.rms_norm(x + r, (d,), w, 1e-6),
                4 * m * d * 2,
            ),
        ]:
            ms = _bench(fn)
            ms_s = _bench(stock)
            gbps = nbytes / ms / 1e6
            rows.append(
                {
                    "op": name,
                    "M": m,
                    "D": d,
                    "dtype": "bfloat16",
                    "ms": ms,
                    "GBps": gbps,
                    "frac_of_copy": gbps / copy_gbps,
                    "stock_ms": ms_s,
                    "stock_GBps": nbytes / ms_s / 1e6,
                }
            )
            print(f"{name} {m}x{d}: {gbps:.0f} GB/s ({gbps / copy_gbps:.2f} of copy), stock {nbytes / ms_s / 1e6:.0f}")
    for m, v in [(256, 128256), (2048, 128256), (4096, 32000)]:
        x = torch.randn(m, v, device="cuda", dtype=torch.float32)
        nbytes = 2 * m * v * 4
        ms = _bench(lambda x=x: tr.softmax(x, -1, True))
        ms_s = _bench(lambda x=x: torch.log_softmax(x, -1))
        gbps = nbytes / ms / 1e6
        rows.append(
            {
                "op": "log_softmax",
                "M": m,
                "D": v,
                "dtype": "float32",
                "ms": ms,
                "GBps": gbps,
                "frac_of_copy": gbps / copy_gbps,
                "stock_ms": ms_s,
                "stock_GBps": nbytes / ms_s / 1e6,
            }
        )
        print(f"log_softmax {m}x{v}: {gbps:.0f} GB/s ({gbps / copy_gbps:.2f} of copy), stock {nbytes / ms_s / 1e6:.0f}")
    return rows


def bench_attention(batches: list[int], ctxs: list[int]) -> list[dict[str, Any]]:
    from detaudit.kernels import triton_attention as ta
    from detaudit.kernels._dispatch import arch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hkv, d, page = 32, 8, 128, 64
    rows = []
    for ctx in ctxs:
        for b in batches:
            if b * ctx > 4_300_000:
                continue
            q, k, v, (qp, kc, vc, bt, cu, cl, _) = paged_decode_case(b, ctx, hq, hkv, d, page)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ms_sdpa = _bench(
                    lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), graph=False
                )
                ms_sdpa_g = _bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            del k, v

            def ours(qp=qp, kc=kc, vc=vc, bt=bt, cu=cu, cl=cl) -> torch.Tensor:
                return ta.paged_attention(qp, kc, vc, bt, cu, cl, 1 / math.sqrt(d))

            ms = _bench(ours, graph=False)
            ms_g = _bench(ours)
            kv_bytes = 2 * b * ctx * hkv * d * 2
            row = {
                "batch": b,
                "ctx": ctx,
                "schedule": ta.SCHEDULES[arch(qp.device)]._asdict(),
                "ms": ms,
                "sdpa_flash_ms": ms_sdpa,
                "ratio": ms_sdpa / ms,
                "graph_ms": ms_g,
                "sdpa_flash_graph_ms": ms_sdpa_g,
                "graph_ratio": ms_sdpa_g / ms_g,
                "GBps": kv_bytes / ms_g / 1e6,
            }
            for name, split in ALT_SCHEDULES.items():  # other split schedules, same kernels (graph replays)
                ms_alt = _bench(
                    lambda qp=qp, kc=kc, vc=vc, bt=bt, cu=cu, cl=cl, s=split: ta.paged_attention(
                        qp, kc, vc, bt, cu, cl, 1 / math.sqrt(d), schedule=ta.uniform(s)
                    )
                )
                row[f"graph_ratio_{name}"] = ms_sdpa_g / ms_alt
            rows.append(row)
            print(
                f"attn decode b={b} ctx={ctx}: ours {ms:.3f} ms, flash {ms_sdpa:.3f} ms, x{ms_sdpa / ms:.2f}; "
                f"graph replay: ours {ms_g:.3f}, flash {ms_sdpa_g:.3f}, x{ms_sdpa_g / ms_g:.2f}; "
                + ", ".join(f"{a}: x{row[f'graph_ratio_{a}']:.2f}" for a in ALT_SCHEDULES),
                flush=True,
            )
            del kc, vc
    return rows


def _moe_candidates() -> list[Any]:
    """Fixed configs timed beside the bi path's own (triton_moe.BI), to pick it from data."""
    from detaudit.kernels.triton_moe import MoeConfig

    return [MoeConfig(64, 64, 64, 1, 4, 4), MoeConfig(64, 128, 128, 1, 8, 3), MoeConfig(128, 128, 64, 1, 8, 3)]


def bench_moe(tokens: list[int]) -> list[dict[str, Any]]:
    """Qwen3-30B-A3B's MoE layer: ms of the experts' grouped GEMMs and of the whole op, bi vs stock (graph replays)."""
    from detaudit.kernels import triton_moe
    from detaudit.kernels.moe import moe_forward, route

    e, h, inter, k = 128, 2048, 768, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    dev, dt_ = "cuda", torch.bfloat16
    router = torch.randn(e, h, device=dev, generator=g).mul_(h**-0.5).to(dt_)
    w13 = torch.randn(e, 2 * inter, h, device=dev, generator=g).mul_(h**-0.5).to(dt_)
    w2 = torch.randn(e, h, inter, device=dev, generator=g).mul_(inter**-0.5).to(dt_)
    weight_bytes = (w13.numel() + w2.numel()) * 2
    rows = []
    candidates = _moe_candidates()
    for t in tokens:
        x = torch.randn(t, h, device=dev, generator=g).to(dt_)
        ids, _ = route(x, router, k, True, batch_invariant=True)
        row: dict[str, Any] = {"tokens": t, "experts_hit": int(torch.unique(ids).numel())}
        for name, bi in (("bi", True), ("stock", False)):
            experts = lambda x=x, ids=ids, bi=bi: triton_moe.experts(x, ids, w13, w2, batch_invariant=bi)  # noqa: E731
            whole = lambda x=x, bi=bi: moe_forward(x, router, w13, w2, k, True, batch_invariant=bi)  # noqa: E731
            experts(), whole()  # compile and run the one-time checks outside the graph capture
            row[f"experts_{name}_ms"] = _bench(experts)
            row[f"moe_{name}_ms"] = _bench(whole)
        for cfg in candidates:  # other fixed configs for the bi path: time, and whether they give its bits
            name = "x".join(map(str, (cfg.bm, cfg.bn, cfg.bk))) + f"_w{cfg.warps}s{cfg.stages}"
            cand = lambda x=x, ids=ids, cfg=cfg: triton_moe.experts(  # noqa: E731
                x, ids, w13, w2, batch_invariant=True, config=cfg
            )
            row[f"experts_bi_{name}_ms"] = _bench(cand)
            row[f"experts_bi_{name}_same_bits"] = bool(
                torch.equal(cand(), triton_moe.experts(x, ids, w13, w2, batch_invariant=True))
            )
        row["experts_ratio"] = row["experts_stock_ms"] / row["experts_bi_ms"]
        row["moe_ratio"] = row["moe_stock_ms"] / row["moe_bi_ms"]
        hit_bytes = weight_bytes * row["experts_hit"] / e
        row["experts_bi_GBps"] = hit_bytes / row["experts_bi_ms"] / 1e6
        rows.append(row)
        print(
            f"moe T={t}: experts bi {row['experts_bi_ms']:.3f} ms vs stock {row['experts_stock_ms']:.3f} "
            f"(x{row['experts_ratio']:.2f}, {row['experts_bi_GBps']:.0f} GB/s of weights); whole op bi "
            f"{row['moe_bi_ms']:.3f} vs stock {row['moe_stock_ms']:.3f} (x{row['moe_ratio']:.2f})",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tml", default=None, help="path to thinking-machines-lab batch_invariant_ops.py")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--only", default="matmul,rowwise,attention", help="comma list of: matmul,rowwise,attention,moe")
    args = ap.parse_args()
    import triton

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    res: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
    }
    res["ceilings"] = ceilings()
    print(res, flush=True)
    tml = _load_tml(args.tml)
    if "matmul" in only:
        from detaudit.kernels import triton_matmul as tm

        res["matmul_configs_agree_bf16"] = tm.configs_agree(torch.bfloat16, torch.device("cuda"))
        res["matmul_bf16"] = bench_matmul(tml, torch.bfloat16, args.tune, MS)
        ratios = [r["ratio_ours"] for r in res["matmul_bf16"]]
        res["matmul_bf16_geomean_ours"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
        res["matmul_bf16_min_ours"] = min(ratios)
        if tml is not None:
            tr_ = [r["ratio_tml"] for r in res["matmul_bf16"]]
            res["matmul_bf16_geomean_tml"] = math.exp(sum(map(math.log, tr_)) / len(tr_))
            res["matmul_bf16_min_tml"] = min(tr_)
    (out_dir / "kernels.json").write_text(json.dumps(res, indent=1))
    if "rowwise" in only:
        res["rowwise"] = bench_rowwise(res["ceilings"]["copy_GBps"])
    (out_dir / "kernels.json").write_text(json.dumps(res, indent=1))
    if "attention" in only:
        res["attention_decode"] = bench_attention([1, 4, 16, 64, 256], [1024, 4096, 16384, 32768])
    (out_dir / "kernels.json").write_text(json.dumps(res, indent=1))
    if "moe" in only:
        res["moe_qwen3_30b_a3b"] = bench_moe([1, 8, 32, 128, 512, 2048])
    (out_dir / "kernels.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=1))


if __name__ == "__main__":
    main()
