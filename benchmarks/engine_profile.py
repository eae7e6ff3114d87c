"""Where a decode step of the local engine spends its time, stock vs batch-invariant kernels (issue #16).

For each kernel set, one engine as users run it (CUDA graphs) on `--model`; for each batch size B, B copies of a
chat prompt generate `--tokens` tokens together. Recorded per B: the wall time of the decode-only `Engine.step`s
past `--skip` tokens (host work, graph replay, sampling; the sampler's `.tolist()` synchronises), the decode graph's
GPU time alone (CUDA events around replays of B's graph, inputs as last filled), the sampler alone, and a
torch.profiler table of the kernels of one eager decode forward plus sampling, grouped by what they compute.
With ``--mixed B,...`` it also times steps that mix decode and prefill, as the `single` load makes them: B sequences
decoding while one new chat prompt is prefilled in the same step (it asks for one token, so the next step mixes
again), against the decode-only steps between them; host and GPU time of those steps come from torch.profiler
(kernels inside CUDA graphs included). Writes ``engine_profile.json`` under ``--out``.

    python benchmarks/engine_profile.py --model /tmp/model-qwen3-8b --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from detaudit.engine.config import kernel_context
from detaudit.engine.llm import Engine, EngineConfig
from detaudit.engine.sampler import sample
from detaudit.engine.sequence import SamplingParams, Sequence

# Kernel name pattern -> group, first match wins.
GROUPS = [
    (r"_mm_tma_kernel|_mm_kernel", "matmul (ours)"),
    (r"gemm|gemv|cutlass|xmma|nvjet|cublas", "matmul (cuBLAS)"),
    (r"_moe_\w+_kernel", "moe route/experts/combine (Triton)"),
    (r"_attn_kernel|_combine_kernel", "attention"),
    (r"_rms_kernel|rms_norm|RmsNorm|rmsnorm", "rms_norm"),
    (r"softmax", "log_softmax"),
    (r"argmax|reduce_kernel|Reduce", "argmax/reductions"),
    (r"index|gather|scatter|copy|Copy|cat|Cat", "copies/gather"),
    (r"elementwise|vectorized|Elementwise", "elementwise"),
]


def _group(name: str) -> str:
    return next((g for pat, g in GROUPS if re.search(pat, name)), "other")


def _events_ms(fn: Any, n: int = 20) -> float:
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n


def profile_kernels(kernels: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    eng = Engine(
        EngineConfig(
            str(args.model),
            device="cuda",
            dtype="bfloat16",
            kernels=kernels,
            max_batch=128,
            max_batched_tokens=2048,
            max_model_len=1024,
        )
    )
    res: dict[str, Any] = {"engine_start_s": round(time.perf_counter() - t0, 1), "batches": {}}
    graphs = eng.runner.decode_graphs
    assert graphs is not None, "decode graphs are captured on CUDA"
    prompt = eng.encode_chat([{"role": "user", "content": "Tell me about Richard Feynman"}])
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    for b in args.batches:
        seqs = [eng.add(Sequence(list(prompt), params)) for _ in range(b)]
        step_ms = []
        while eng.scheduler.has_work():
            decode = all(s.num_cached + 1 == len(s) for s in seqs)
            t = time.perf_counter()
            eng.step()
            if decode and len(seqs[0].output_ids) > args.skip:
                step_ms.append((time.perf_counter() - t) * 1e3)
        bs = graphs.bucket(b)
        row: dict[str, Any] = {
            "bucket": bs,
            "context": len(seqs[0]),
            "step_ms": statistics.median(step_ms),
            "decode_steps_timed": len(step_ms),
            "graph_gpu_ms": _events_ms(graphs.graphs[bs].replay),
        }
        logits = graphs.logits[:b]
        with torch.inference_mode(), kernel_context(kernels):
            t = time.perf_counter()
            for _ in range(10):
                sample(logits, [params] * b, [0] * b)
            row["sample_ms"] = (time.perf_counter() - t) * 100
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                graphs._forward(bs)
                sample(logits, [params] * b, [0] * b)
                torch.cuda.synchronize()
        per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for ev in prof.key_averages():
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            if us > 0:
                per[ev.key][0] += ev.count
                per[ev.key][1] += us
        groups: dict[str, float] = defaultdict(float)
        for name, (_, us) in per.items():
            groups[_group(name)] += us
        row["kernel_us_by_group"] = {g: round(us, 1) for g, us in sorted(groups.items(), key=lambda x: -x[1])}
        row["kernel_us_total"] = round(sum(groups.values()), 1)
        row["top_kernels"] = [
            [name[:90], n, round(us, 1)] for name, (n, us) in sorted(per.items(), key=lambda x: -x[1][1])[:14]
        ]
        res["batches"][b] = row
        print(
            f"{kernels} B={b}: step {row['step_ms']:.2f} ms, graph GPU {row['graph_gpu_ms']:.3f} ms, sample "
            f"{row['sample_ms']:.3f} ms; kernels {row['kernel_us_total']:.0f} us: {row['kernel_us_by_group']}",
            flush=True,
        )
    res["mixed"] = {b: profile_mixed(eng, kernels, b, args) for b in args.mixed}
    res["engine"] = eng.info()
    del eng, graphs, logits
    gc.collect()  # the engine's KV cache and graph pool go before the next engine is built
    torch.cuda.empty_cache()
    return res


def profile_mixed(eng: Engine, kernels: str, b: int, args: argparse.Namespace) -> dict[str, Any]:
    """B sequences decoding; every other step also prefills one new prompt (one token asked). Wall time of the
    mixed and the decode-only steps, and a kernel table of `args.profile_steps` mixed steps."""
    prompt = eng.encode_chat([{"role": "user", "content": "Tell me about Richard Feynman"}])
    long = SamplingParams(max_tokens=args.tokens * 4, ignore_eos=True)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    seqs = [eng.add(Sequence(list(prompt), long)) for _ in range(b)]
    while not all(s.num_cached + 1 == len(s) for s in seqs):
        eng.step()
    mixed_ms: list[float] = []
    decode_ms: list[float] = []
    for i in range(2 * args.tokens):
        if i % 2 == 0:
            eng.add(Sequence(list(prompt), one))
        torch.cuda.synchronize()
        t = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        (mixed_ms if i % 2 == 0 else decode_ms).append((time.perf_counter() - t) * 1e3)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.profile_steps):
            eng.add(Sequence(list(prompt), one))
            eng.step()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.key_averages():
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if us > 0:
            per[ev.key][0] += ev.count
            per[ev.key][1] += us
    groups: dict[str, float] = defaultdict(float)
    for name, (_, us) in per.items():
        groups[_group(name)] += us / args.profile_steps
    for s in seqs:
        eng.scheduler.abort(s)
    row = {
        "context": len(seqs[0]),
        "prompt_tokens": len(prompt),
        "mixed_step_ms": statistics.median(mixed_ms),
        "decode_step_ms": statistics.median(decode_ms),
        "kernel_us_per_mixed_step": round(sum(groups.values()), 1),
        "kernel_us_by_group": {g: round(us, 1) for g, us in sorted(groups.items(), key=lambda x: -x[1])},
        "top_kernels": [
            [name[:90], n / args.profile_steps, round(us / args.profile_steps, 1)]
            for name, (n, us) in sorted(per.items(), key=lambda x: -x[1][1])[:16]
        ],
    }
    print(
        f"{kernels} mixed B={b}: mixed step {row['mixed_step_ms']:.2f} ms, decode step {row['decode_step_ms']:.2f} "
        f"ms; kernels {row['kernel_us_per_mixed_step']:.0f} us a mixed step: {row['kernel_us_by_group']}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kernels", default="stock,batch-invariant")
    ap.add_argument("--batches", default="1,8,32,64,96,128")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip", type=int, default=32, help="decode steps before timing starts")
    ap.add_argument("--mixed", default="", help="batch sizes for the mixed decode + prefill steps (empty: none)")
    ap.add_argument("--profile-steps", type=int, default=5, help="mixed steps under torch.profiler")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.mixed = [int(b) for b in args.mixed.split(",") if b]
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for k in args.kernels.split(","):
        res[k] = profile_kernels(k, args)
        (args.out / "engine_profile.json").write_text(json.dumps(res, indent=1))
    if "stock" in res and "batch-invariant" in res and args.batches:
        res["bi_over_stock"] = {
            b: {
                m: round(res["batch-invariant"]["batches"][b][m] / res["stock"]["batches"][b][m], 3)
                for m in ("step_ms", "graph_gpu_ms", "sample_ms", "kernel_us_total")
            }
            for b in args.batches
        }
        print("bi / stock:", res["bi_over_stock"], flush=True)
    (args.out / "engine_profile.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
