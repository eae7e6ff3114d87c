"""One device call that retunes the bundled kernels for the H200 (issue #16), every section in one process.

Matmul: tile configs on the Llama-3-8B shapes of benchmarks/kernel_bench.py and (``--qwen``) the Qwen3-8B linear shapes
at the engine's decode and prefill sizes, timed with the weight reused (warm, as benchmarks/kernel_bench.py times) and,
where the weight fits in L2, rotating through copies larger than L2 together (cold, as a decoder's layers meet their
weights).
Attention: decode at the 19 points of benchmarks/kernel_bench.py under uniform and mixed split schedules (sizes fixed by
absolute position) and split-launch pipeline depths. Log-softmax: segment width and warps. Every candidate runs on a
NaN-poisoned output first and must give the shipped configuration's bits (matmul: a config that changes them may
never be dispatched; attention: the split launch must give the one-program launch's bits; softmax: the fused
launch the two-launch form's), then is timed against the stock kernel in the same process.

Triton compiles each candidate on first use, one at a time. ``--warm I/P`` runs the I-th of P shares of every
candidate once without timing, so P processes started together fill Triton's on-disk cache first and the timed
process compiles nothing:

    for i in 0 1 2 3; do python benchmarks/kernel_tuning_h200.py --warm $i/4 & done; wait
    python benchmarks/kernel_tuning_h200.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

T0 = time.time()
C = tuple[int, int, int, int, int, int, bool, bool]  # bm, bn, bk, group, warps, stages, tma, ws
QWEN = [
    (4096, 6144, "qkv"),
    (4096, 4096, "o_proj"),
    (4096, 24576, "gate_up"),
    (12288, 4096, "down"),
    (4096, 151936, "lm_head"),
]  # (K, N, layer) of Qwen3-8B, q/k/v and gate/up fused as the engine runs them
QWEN_MS = [1, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 2048]
LLAMA = [
    (4096, 4096, "llama qkv-like"),
    (4096, 14336, "llama up"),
    (14336, 4096, "llama down"),
    (4096, 128256, "llama lm_head"),
]
LLAMA_MS = [1, 4, 16, 64, 256, 1024, 4096, 8192]
GEMV: list[C] = [
    (16, 32, 512, 8, 4, 4, False, False),
    (16, 32, 512, 8, 4, 5, False, False),
    (16, 32, 256, 8, 2, 5, False, False),
    (16, 64, 256, 8, 4, 3, False, False),
    (16, 32, 256, 8, 4, 8, True, False),
    (16, 32, 256, 8, 4, 6, True, False),
    (16, 64, 256, 8, 4, 4, True, False),
    (16, 64, 256, 8, 4, 6, True, False),
    (16, 32, 128, 8, 4, 8, True, False),
    (16, 64, 128, 8, 4, 8, True, False),
    (16, 16, 256, 8, 4, 8, True, False),
    (16, 128, 128, 8, 4, 6, True, False),
]
MID: list[C] = [
    (32, 32, 256, 8, 4, 4, False, False),
    (32, 64, 128, 8, 4, 4, False, False),
    (32, 128, 128, 8, 4, 4, False, False),
    (64, 64, 128, 8, 4, 4, False, False),
    (32, 32, 256, 8, 4, 6, True, False),
    (32, 64, 256, 8, 4, 4, True, False),
    (32, 64, 128, 8, 4, 6, True, False),
    (64, 32, 256, 8, 4, 4, True, False),
    (64, 64, 128, 8, 4, 4, True, False),
    (64, 64, 128, 8, 4, 6, True, False),
    (64, 64, 64, 8, 4, 8, True, False),
    (64, 128, 64, 8, 4, 6, True, False),
    (128, 32, 128, 8, 4, 4, True, False),
    (128, 64, 64, 8, 4, 6, True, False),
    (128, 64, 128, 8, 8, 4, True, False),
    (128, 128, 64, 8, 8, 4, True, False),
]
BIG: list[C] = [
    (64, 128, 64, 8, 4, 6, True, False),
    (64, 128, 64, 8, 4, 4, True, False),
    (128, 64, 64, 8, 4, 6, True, False),
    (128, 128, 64, 8, 4, 4, True, False),
    (128, 128, 64, 8, 4, 4, True, True),
    (128, 128, 64, 8, 8, 4, True, False),
    (128, 256, 64, 8, 8, 3, True, False),
    (128, 256, 64, 8, 8, 4, True, False),
    (128, 256, 64, 8, 8, 3, True, True),
    (256, 128, 64, 8, 8, 3, True, False),
]
# --wide: more shapes for 16 < M <= 128 (the engine's decode batches; bi's matmul at M = 96 was 0.73-0.84 of
# cuBLAS with the MID set): other pipeline depths, tile-order groups, 8 warps, warp specialisation.
WIDE: list[C] = [(64, 128, 64, 8, 4, s, True, False) for s in (3, 4, 5, 7, 8)] + [
    (64, 128, 64, 1, 4, 6, True, False),
    (64, 128, 64, 16, 4, 6, True, False),
    (64, 128, 64, 8, 8, 6, True, False),
    (64, 128, 64, 8, 4, 4, True, True),
    (64, 128, 128, 8, 8, 4, True, False),
    (64, 64, 128, 8, 4, 5, True, False),
    (64, 64, 128, 8, 4, 8, True, False),
    (64, 64, 256, 8, 4, 4, True, False),
    (64, 256, 64, 8, 8, 3, True, False),
    (64, 256, 64, 8, 8, 4, True, False),
    (32, 128, 64, 8, 4, 6, True, False),
    (32, 128, 128, 8, 4, 5, True, False),
    (32, 256, 64, 8, 4, 4, True, False),
    (32, 64, 256, 8, 4, 6, True, False),
    (128, 64, 128, 8, 4, 4, True, False),
    (128, 128, 64, 8, 8, 3, True, False),
    (128, 128, 64, 8, 4, 4, True, True),
]
# --wide for 128 < M <= 512: the engine's steps with prefill pad to token buckets of 192, 256, 384, ... rows (bi's
# piecewise graph at 192 replayed 18 % slower than stock's on the H200; BIG gives 96 programs there on N = 4096/6144).
PREFILL: list[C] = [
    (64, 128, 64, 8, 4, 5, True, False),
    (64, 128, 64, 8, 4, 4, True, True),
    (64, 128, 128, 8, 8, 4, True, False),
    (64, 256, 64, 8, 8, 3, True, False),
    (64, 256, 64, 8, 8, 4, True, False),
    (64, 64, 128, 8, 4, 4, True, False),
    (64, 64, 128, 8, 4, 6, True, False),
    (64, 64, 64, 8, 4, 8, True, False),
    (128, 64, 64, 8, 4, 4, True, False),
    (128, 64, 64, 8, 4, 4, True, True),
    (128, 64, 128, 8, 8, 4, True, False),
    (128, 64, 128, 8, 4, 4, True, False),
    (128, 128, 64, 8, 4, 5, True, False),
    (128, 128, 64, 8, 8, 5, True, False),
    (128, 128, 64, 1, 8, 4, True, False),
    (128, 128, 64, 16, 8, 4, True, False),
    (128, 128, 128, 8, 8, 3, True, False),
    (128, 256, 64, 8, 8, 4, True, True),
    (256, 64, 64, 8, 8, 4, True, False),
]
COLD_BYTES = 256 << 20  # weight copies rotated through for cold timings (H200 L2: 60 MB)
ATTN_POINTS = [(b, c) for c in (1024, 4096, 16384, 32768) for b in (1, 4, 16, 64, 256) if b * c <= 4_300_000]
UNIFORM = [256, 512, 1024, 2048]
STAGES = [2, 3, 4]
# (short, short_end, mid, mid_end, long): the H100's and a few that lengthen splits with the position.
TIERED = [
    (256, 1024, 512, 1024, 512),
    (256, 1024, 512, 4096, 1024),
    (256, 1024, 512, 8192, 1024),
    (256, 1024, 512, 4096, 2048),
    (256, 1024, 1024, 1024, 1024),
    (256, 1024, 512, 8192, 2048),
]
SEGS = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16), (16384, 32), (32768, 32)]
SOFTMAX_SHAPES = [(256, 128256), (256, 151936), (2048, 128256), (128, 151936)]


def gbench(fn: Callable[[], Any], target_ms: float = 1.5, reps: int = 7) -> float:
    """Median ms per call over `reps` replays of a CUDA graph of n calls (n: about `target_ms` of work): kernel time
    without launch gaps, a few times cheaper than triton.testing.do_bench_cudagraph's ten 20-ms rounds."""
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(3):
            fn()
        e1.record()
        torch.cuda.synchronize()
        n = max(3, min(400, int(target_ms / max(e0.elapsed_time(e1) / 3, 1e-4))))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for _ in range(n):
                fn()
        g.replay()
        times = []
        for _ in range(reps):
            e0.record()
            g.replay()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) / n)
    torch.cuda.current_stream().wait_stream(s)
    return statistics.median(times)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def header() -> dict[str, Any]:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(),
        "sms": p.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def ceilings() -> dict[str, float]:
    """Device-to-device copy (bytes read + written) and an 8192^3 bf16 cuBLAS product on random data."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy = gbench(lambda d=dst, s=src: d.copy_(s), target_ms=20, reps=5)
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = gbench(lambda: a @ b, target_ms=20, reps=5)
    return {"copy_GBps": 2 * (2 << 30) / copy / 1e6, "mm8192_bf16_TFLOPs": 2 * 8192**3 / mm / 1e9}


def _cands(m: int, wide: bool = False) -> list[C]:
    if m <= 16:
        return GEMV
    if m <= 128:
        return MID + WIDE if wide else MID
    return BIG + PREFILL if wide and m <= 512 else BIG


def mm_points(
    qwen: bool, ms: list[int] | None = None, layers: list[str] | None = None
) -> Iterator[tuple[int, int, str, int]]:
    """The Llama-3-8B points of benchmarks/kernel_bench.py; with `qwen`, Qwen3-8B's decode and prefill sizes first;
    with `ms`, the Qwen3-8B shapes at those M only (`layers`: only those of them)."""
    for k, n, what in [q for q in QWEN if layers is None or q[2] in layers] if qwen or ms else []:
        for m in ms or QWEN_MS:
            yield k, n, f"qwen3-8b {what}", m
    for k, n, what in LLAMA if not ms else []:
        for m in LLAMA_MS:
            if not (qwen and (k, n) == (4096, 4096) and m in QWEN_MS):  # 4096x4096 is Qwen3's o_proj too
                yield k, n, what, m


def tune_matmul(
    res: dict[str, Any],
    save: Callable[[], None],
    share: tuple[int, int] | None,
    qwen: bool,
    ms: list[int] | None = None,
    wide: bool = False,
    layers: list[str] | None = None,
) -> None:
    from detaudit.kernels import triton_matmul as tm
    from detaudit.kernels._dispatch import arch

    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = arch(torch.device("cuda"))
    rows: list[dict[str, Any]] = res.setdefault("matmul", [])
    weights: dict[tuple[int, int], torch.Tensor] = {}
    xs: dict[int, torch.Tensor] = {}
    job = 0
    if share is not None and share[0] == 0:
        tm.configs_agree(torch.bfloat16, torch.device("cuda"))  # every shipped config, as the timed run's first call
    for k, n, what, m in mm_points(qwen, ms, layers):
        if (k, n) not in weights:
            weights = {(k, n): torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)}
        if k not in xs:
            xs[k] = torch.randn(8192, k, device="cuda", dtype=torch.bfloat16)
        w, x = weights[(k, n)], xs[k][:m]
        cands = _cands(m, wide)
        if share is not None:  # compile only: this process's share of the candidates
            for c in cands:
                job += 1
                if job % share[1] == share[0]:
                    try:
                        tm.matmul(x, w.t(), config=tm.Config(*c))
                    except Exception:  # the timed process records why
                        pass
            continue
        base = tm.select_config(m, torch.bfloat16, x.device, n, k)
        ref = tm.matmul(x, w.t(), config=base)
        row: dict[str, Any] = {
            "K": k,
            "N": n,
            "M": m,
            "what": what,
            "base": list(base),
            "base_rel_err": rel_err(ref, F.linear(x.float(), w.float())),
            "cublas_ms": gbench(lambda x=x, w=w: F.linear(x, w)),
        }
        cold = m <= 256 and w.nbytes < COLD_BYTES // 2
        if cold:
            ws = [w] + [torch.randn_like(w) for _ in range(COLD_BYTES // w.nbytes)]
            row["cold_cublas_ms"] = gbench(lambda x=x, ws=ws: [F.linear(x, ww) for ww in ws]) / len(ws)
        row["cands"] = {}
        for c in cands:
            cfg = tm.Config(*c)
            e: dict[str, Any] = {}
            try:
                o = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                tm.matmul(x, w.t(), out=o, config=cfg)
                e["same_bits"] = bool(torch.equal(o, ref))
                e["ratio"] = row["cublas_ms"] / gbench(lambda x=x, w=w, cfg=cfg: tm.matmul(x, w.t(), config=cfg))
                if cold:
                    e["cold_ratio"] = row["cold_cublas_ms"] / (
                        gbench(lambda x=x, ws=ws, cfg=cfg: [tm.matmul(x, ww.t(), config=cfg) for ww in ws]) / len(ws)
                    )
            except Exception as ex:  # out of shared memory, ...
                e["error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
            row["cands"][str(c)] = e
        if cold:
            del ws
        ok = {c: e for c, e in row["cands"].items() if e.get("same_bits")}
        best = max(ok, key=lambda c: ok[c]["ratio"]) if ok else None
        row["best"] = best
        base_e = row["cands"].get(str(tuple(base)))
        rows.append(row)
        print(
            f"mm {what} K={k} N={n} M={m}: base {tuple(base)[:7]} x{base_e['ratio'] if base_e else 0:.3f}; best {best} "
            f"x{ok[best]['ratio'] if best else 0:.3f} cold x{ok[best].get('cold_ratio', 0) if best else 0:.3f}; "
            f"bits differ: {[c for c, e in row['cands'].items() if e.get('same_bits') is False]} "
            f"({time.time() - T0:.0f} s)",
            flush=True,
        )
        save()
    res["mm_gpu_kind"] = gpu


def _attn_case(b: int, ctx: int, dense: bool) -> tuple[Any, Any, Any, tuple[Any, ...]]:
    """bf16 decode: q [b, 32, 1, 128] and the keys/values in a paged cache (pages of 64, scattered) as
    paged_attention's positional arguments; with `dense`, the same keys as k/v [b, 8, ctx, 128] for SDPA too."""
    hq, hkv, d, page = 32, 8, 128, 64
    npg = ctx // page
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    bt = torch.randperm(b * npg, device="cuda").to(torch.int32).reshape(b, npg)
    k = v = None
    if dense:
        k = torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
        kc, vc = torch.empty(2, b * npg, page, hkv, d, device="cuda", dtype=torch.bfloat16)
        kc[bt.flatten().long()] = k.permute(0, 2, 1, 3).reshape(b * npg, page, hkv, d)  # page bt[i, j]: block (i, j)
        vc[bt.flatten().long()] = v.permute(0, 2, 1, 3).reshape(b * npg, page, hkv, d)
    else:  # compile-only runs: the same shapes, no SDPA
        kc, vc = torch.randn(2, b * npg, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    cl = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    return q, k, v, (q[:, :, 0].contiguous(), kc, vc, bt, cu, cl, 1 / math.sqrt(d))


def _schedules() -> list[tuple[str, tuple[int, ...]]]:
    return [(f"uniform{s}", (s, 0, s, 0, s)) for s in UNIFORM] + [(f"tiered{t}", t) for t in TIERED]


def tune_attention(res: dict[str, Any], save: Callable[[], None], share: tuple[int, int] | None) -> None:
    from detaudit.kernels import triton_attention as ta
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows: list[dict[str, Any]] = res.setdefault("attention", [])
    job = 0
    for b, ctx in ATTN_POINTS:
        q, k, v, args = _attn_case(b, ctx, dense=share is None)
        if share is None:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                flash_ms = gbench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            bb = min(b, 4)  # an fp32 reference of the first sequences (the math backend repeats K/V per query head)
            ref = F.scaled_dot_product_attention(q[:bb].float(), k[:bb].float(), v[:bb].float(), enable_gqa=True)
            ref = ref[:, :, 0]
        del k, v
        row: dict[str, Any] = {"batch": b, "ctx": ctx, "flash_ms": flash_ms if share is None else None, "v": {}}
        for name, t in _schedules():
            sch = ta.Schedule(*t)
            launches = [("one", False, 2)] + ([("split", True, s) for s in STAGES] if b * 8 < 4 * 132 else [])
            one = None
            for lname, launch, stages in launches:
                job += 1
                if share is not None:
                    if job % share[1] == share[0]:
                        ta.paged_attention(*args, split_launch=launch, schedule=sch, stages=stages)
                    continue
                try:
                    out = ta.paged_attention(*args, split_launch=launch, schedule=sch, stages=stages)
                    e: dict[str, Any] = {
                        "ratio": flash_ms
                        / gbench(
                            lambda args=args, launch=launch, sch=sch, stages=stages: ta.paged_attention(
                                *args, split_launch=launch, schedule=sch, stages=stages
                            )
                        )
                    }
                    if one is None:
                        one = out
                        e["rel_err"] = rel_err(out[: ref.shape[0]], ref)
                    else:
                        e["same_bits"] = bool(torch.equal(out, one))
                except Exception as ex:
                    e = {"error": f"{type(ex).__name__}: {str(ex)[:200]}"}
                row["v"][f"{name} {lname} s{stages}"] = e
        if share is None:
            ok = {n: e for n, e in row["v"].items() if "ratio" in e and e.get("same_bits", True)}
            best = max(ok, key=lambda n: ok[n]["ratio"]) if ok else ""
            row["best"] = [best, ok[best]["ratio"] if ok else 0.0]
            rows.append(row)
            print(
                f"attn b={b} ctx={ctx}: flash {flash_ms * 1e3:.1f} us; best {best} x{row['best'][1]:.3f}; "
                + " ".join(
                    f"{n.replace('uniform', 'u').replace('tiered', 't')}={e.get('ratio', 0):.2f}"
                    f"{'' if e.get('same_bits', True) else '!BITS'}"
                    for n, e in row["v"].items()
                ),
                flush=True,
            )
            save()
        del args


def tune_softmax(res: dict[str, Any], save: Callable[[], None], share: tuple[int, int] | None) -> None:
    from detaudit.kernels import triton_rowwise as tr

    rows: list[dict[str, Any]] = res.setdefault("log_softmax", [])
    for i, seg in enumerate(SEGS):
        if share is not None:
            if i % share[1] == share[0]:
                for m, v in SOFTMAX_SHAPES + [(3, 1_000_000)]:
                    x = torch.randn(m, v, device="cuda")
                    for fused in (None, False):  # the launch the timed run picks, and the two-launch form
                        tr._seg_softmax(x, torch.empty_like(x), v, True, fused=fused, seg=seg)
            continue
        e: dict[str, Any] = {"seg": seg[0], "warps": seg[1]}
        try:
            x = torch.randn(37, 151936, device="cuda") * 4
            x[0, ::7] = -float("inf")
            y = torch.full_like(x, float("nan"))
            tr._seg_softmax(x, y, x.shape[1], True, seg=seg)
            two = torch.empty_like(x)
            tr._seg_softmax(x, two, x.shape[1], True, fused=False, seg=seg)
            fin = torch.isfinite(y)
            e["rel_err"] = rel_err(y[fin], x.double().log_softmax(-1)[fin])
            e["fused_eq_two_launch"] = bool(torch.equal(y, two))
            y1 = torch.empty_like(x[1:2])
            tr._seg_softmax(x[1:2], y1, x.shape[1], True, seg=seg)
            e["row_invariant"] = bool(torch.equal(y1, y[1:2]))
            for m, v in SOFTMAX_SHAPES:
                x = torch.randn(m, v, device="cuda")
                y = torch.empty_like(x)
                nbytes = 2 * m * v * 4
                e[f"{m}x{v}_frac_of_copy"] = (
                    nbytes
                    / gbench(lambda x=x, y=y, v=v, seg=seg: tr._seg_softmax(x, y, v, True, seg=seg))
                    / 1e6
                    / res["ceilings"]["copy_GBps"]
                )
                e[f"{m}x{v}_stock_frac_of_copy"] = (
                    nbytes / gbench(lambda x=x: torch.log_softmax(x, -1)) / 1e6 / res["ceilings"]["copy_GBps"]
                )
        except Exception as ex:
            e["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
        rows.append(e)
        print("log_softmax", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()}, flush=True)
        save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="folder for tuning_h200.json (the timed run)")
    ap.add_argument("--warm", help="I/P: compile the I-th of P shares of the candidates, time nothing")
    ap.add_argument("--only", default="matmul,attention,softmax")
    ap.add_argument("--qwen", action="store_true", help="matmul: Qwen3-8B's shapes too (benchmarks/h200/ has a sweep)")
    ap.add_argument("--ms", help="matmul: only Qwen3-8B's shapes, at these M (comma-separated)")
    ap.add_argument(
        "--wide",
        action="store_true",
        help="matmul: the WIDE candidates too for 16 < M <= 128, PREFILL for 128 < M <= 512",
    )
    ap.add_argument("--layers", help="matmul with --ms: only these Qwen3-8B layers (comma-separated, e.g. qkv,down)")
    args = ap.parse_args()
    share = tuple(int(v) for v in args.warm.split("/")) if args.warm else None
    res: dict[str, Any] = header()
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        res["ceilings"] = ceilings()
        print(res, flush=True)

    def save() -> None:
        if out is not None:
            (out / "tuning_h200.json").write_text(json.dumps(res, indent=1))

    sections = {
        "softmax": tune_softmax,
        "attention": tune_attention,
        "matmul": lambda r, sv, sh: tune_matmul(
            r,
            sv,
            sh,
            args.qwen,
            [int(v) for v in args.ms.split(",")] if args.ms else None,
            args.wide,
            args.layers.split(",") if args.layers else None,
        ),
    }
    for name in args.only.split(","):
        try:
            sections[name](res, save, share)
        except Exception as ex:  # keep the other sections' numbers
            res[f"{name}_error"] = f"{type(ex).__name__}: {str(ex)[:500]}"
            print(f"{name} FAILED: {res[f'{name}_error']}", flush=True)
        print(f"{name} done at {time.time() - T0:.0f} s", flush=True)
        save()


if __name__ == "__main__":
    main()
