"""Local-engine benchmark: N target requests under load with stock vs batch-invariant kernels, and engine tokens/s
vs transformers' generate() on the same model and batch. Writes one JSON (updated after every phase, so a run cut
short still leaves its finished figures). Uses `detaudit local`'s workload and load loop (detaudit.audit.workload)
but writes no run directory, so it needs only torch, triton and transformers on the GPU machine.

    python benchmarks/engine.py --out OUT_DIR [--preset qwen3-1.7b] [--device cuda] [-n 1000] [--max-tokens 100] \
        [--phases batch-invariant,stock,batch-invariant-eager,stock-eager,offline-batch-invariant,offline-stock,hf]

Phases `batch-invariant` and `stock` run the engine as users get it (CUDA graphs on a GPU) under `detaudit local`'s
server-like load; `<kernels>-eager` runs every step eagerly. `offline-<kernels>` times what vLLM's and SGLang's
anchors time (`llm.generate` of 1000 prompts): N copies of the prompt submitted at once to Engine.generate, seats
refilled as sequences finish, --max-tokens each. The JSON gets `bi_over_stock_wall` (and `_eager`, `_offline`,
`_offline_eager`) ratios.

No weights can be downloaded on the benchmark machines: the model is a random-weight one of the preset's shapes,
built here with detaudit.tiny (detaudit tiny-model).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

from detaudit.audit.workload import CONTROL, build_workload, drive
from detaudit.engine.llm import Engine, EngineConfig
from detaudit.engine.sequence import SamplingParams
from detaudit.tiny import build_tiny_model

PROMPT = "Tell me about Richard Feynman"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _release(device: str) -> None:
    """Give the last engine's KV cache and graph pool back before the next phase builds its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _variant(name: str) -> tuple[str, bool]:
    """A phase or engine name: kernels, then `-eager` for the engine without CUDA graphs (users get graphs)."""
    kernels = name.removesuffix("-eager")
    return kernels, kernels == name


def _engine(model: Path, name: str, args: argparse.Namespace, **cfg) -> tuple[Engine, float]:
    """The engine of a phase name and its start-up time (weights, KV cache, CUDA-graph capture)."""
    kernels, graphs = _variant(name)
    t0 = time.perf_counter()
    eng = Engine(EngineConfig(str(model), device=args.device, dtype="bfloat16", kernels=kernels, cuda_graphs=graphs,
                              **cfg))  # fmt: skip
    _sync(args.device)
    return eng, round(time.perf_counter() - t0, 2)


def local_phase(model: Path, name: str, args: argparse.Namespace) -> dict:
    """`detaudit local`'s load loop (without the run directory): unique target completions and generation time."""
    eng, start_s = _engine(model, name, args, max_batch=args.max_batch, max_batched_tokens=args.max_batched_tokens,
                           max_model_len=1024)  # fmt: skip
    work = build_workload(args.scenario, [PROMPT], args.n, max_tokens=args.max_tokens, max_batch=args.max_batch,
                          seed=0)  # fmt: skip
    outs: list[tuple[int, ...]] = []
    stats = drive(eng, work, seed=0, top_logprobs=0, max_inflight=1 if args.scenario == CONTROL else None,
                  on_target=lambda _a, seq, _t0, _lat: outs.append(tuple(seq.output_ids)))
    counts = sorted(Counter(outs).values(), reverse=True)
    modal = Counter(outs).most_common(1)[0][0]
    first_div = [next((i for i, (x, y) in enumerate(zip(o, modal, strict=False)) if x != y), None) for o in outs]
    first_div = [d for d in first_div if d is not None]
    return {**stats, "n": len(outs), "unique": len(counts), "counts": counts[:10],
            "first_divergence_min": min(first_div, default=None),
            "tok_per_s": round(stats["generated_tokens"] / stats["wall_s"], 1), "engine_start_s": start_s,
            "engine": eng.info()}  # fmt: skip


def offline_phase(model: Path, name: str, args: argparse.Namespace) -> dict:
    """N prompts submitted at once through Engine.generate (as `llm.generate` of the anchors), after a warm-up
    generate of one full batch: wall time, tokens/s and unique completions."""
    eng, start_s = _engine(model, name.removeprefix("offline-"), args, max_batch=args.max_batch,
                           max_batched_tokens=args.max_batched_tokens, max_model_len=1024)  # fmt: skip
    prompt = eng.encode_chat([{"role": "user", "content": PROMPT}])
    eng.generate([prompt] * args.max_batch, SamplingParams(max_tokens=2, ignore_eos=True))
    _sync(args.device)
    steps0, replays0, prefill0 = eng.steps, eng.graph_replays, eng.prefill_graph_replays
    t0 = time.perf_counter()
    seqs = eng.generate([prompt] * args.n, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    _sync(args.device)
    wall = time.perf_counter() - t0
    tokens = sum(len(s.output_ids) for s in seqs)
    counts = sorted(Counter(tuple(s.output_ids) for s in seqs).values(), reverse=True)
    return {"n": len(seqs), "steps": eng.steps - steps0, "graph_steps": eng.graph_replays - replays0,
            "prefill_graph_steps": eng.prefill_graph_replays - prefill0,
            "generated_tokens": tokens, "wall_s": round(wall, 3), "tok_per_s": round(tokens / wall, 1),
            "unique": len(counts), "counts": counts[:10], "engine_start_s": start_s,
            "engine": eng.info()}  # fmt: skip


def hf_phase(model: Path, args: argparse.Namespace) -> dict:
    """tokens/s of HF generate() vs the engine on the same prompts, batch and length; one engine per name in
    --hf-engine-kernels (the first one gives the top-level figures)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    texts = [f"{PROMPT}, part {i}" for i in range(args.hf_batch)]
    params = SamplingParams(max_tokens=args.hf_tokens, ignore_eos=True)
    engines: dict[str, dict] = {}
    for name in args.hf_engine_kernels.split(","):
        eng, start_s = _engine(model, name, args, max_batch=args.hf_batch, max_batched_tokens=4096,
                               max_model_len=512)  # fmt: skip
        prompts = [eng.encode_chat([{"role": "user", "content": t}]) for t in texts]
        eng.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))  # warm-up: the same prefill shapes
        _sync(args.device)
        t0 = time.perf_counter()
        seqs = eng.generate(prompts, params)
        _sync(args.device)
        engine_s = time.perf_counter() - t0
        n_tokens = sum(len(s.output_ids) for s in seqs)
        engines[name] = {"engine_s": round(engine_s, 3), "engine_tok_per_s": round(n_tokens / engine_s, 1),
                         "engine_start_s": start_s, "cuda_graphs": eng.info()["cuda_graphs"]}  # fmt: skip
        del eng, seqs
        _release(args.device)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to(args.device).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(model)
    tok.padding_side = "left"
    enc = tok([tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
               for t in texts], return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    kw = dict(max_new_tokens=args.hf_tokens, min_new_tokens=args.hf_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)  # fmt: skip
    hf.generate(**{k: v[:2] for k, v in enc.items()}, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    _sync(args.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(**enc, **kw)
    _sync(args.device)
    hf_s = time.perf_counter() - t0
    hf_tok_per_s = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0] / hf_s
    for e in engines.values():
        e["speedup"] = round(e["engine_tok_per_s"] / hf_tok_per_s, 2)
    first = next(iter(engines))
    return {"batch": args.hf_batch, "tokens_each": args.hf_tokens, "engine_kernels": first, **engines[first],
            "hf_generate_s": round(hf_s, 3), "hf_tok_per_s": round(hf_tok_per_s, 1), "engines": engines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="qwen3-1.7b")
    ap.add_argument("--model", type=Path, help="an existing model directory (else one of --preset's shape is built)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--scenario", default="mixed")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--hf-tokens", type=int, default=128)
    ap.add_argument("--hf-engine-kernels", default="batch-invariant",
                    help="comma list of engines to time against HF: kernels, -eager for no CUDA graphs")
    ap.add_argument("--phases", default="batch-invariant,stock,hf",
                    help="comma list: batch-invariant, stock (CUDA graphs on, as users run them), the same with "
                         "-eager (graphs off), offline-<kernels>[-eager] (N prompts at once), hf")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}  # fmt: skip
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    path = args.out / "engine_bench.json"

    def save() -> None:
        path.write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)

    t0 = time.perf_counter()
    model = args.model or build_tiny_model(args.out / "model", "qwen3", preset=args.preset, dtype="bfloat16")
    result["model_build_s"] = round(time.perf_counter() - t0, 1)
    save()
    for phase in args.phases.split(","):
        try:
            if phase == "hf":
                result[phase] = hf_phase(model, args)
            elif phase.startswith("offline-"):
                result[phase] = offline_phase(model, phase, args)
            else:
                result[phase] = local_phase(model, phase, args)
        except Exception:
            result[phase] = {"error": traceback.format_exc(limit=6)}
        _release(args.device)
        # With CUDA graphs (what users get) and, when measured, without; under load and offline.
        for prefix, suffix in (("", ""), ("", "-eager"), ("offline-", ""), ("offline-", "-eager")):
            bi, stock = result.get(f"{prefix}batch-invariant{suffix}", {}), result.get(f"{prefix}stock{suffix}", {})
            if "wall_s" in bi and "wall_s" in stock:
                key = "bi_over_stock_wall" + ("_offline" if prefix else "") + ("_eager" if suffix else "")
                result[key] = round(bi["wall_s"] / stock["wall_s"], 3)
        save()  # after every phase: a run cut short keeps its finished figures and ratios


if __name__ == "__main__":
    main()
