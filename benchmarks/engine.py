"""Local-engine benchmark: N target requests under load with stock vs batch-invariant kernels, and engine tokens/s
vs transformers' generate() on the same model and batch. Writes one JSON (updated after every phase, so a run cut
short still leaves its finished figures). Uses `detaudit local`'s workload and load loop (detaudit.audit.workload)
but writes no run directory, so it needs only torch, triton and transformers on the GPU machine.

    python benchmarks/engine.py --out OUT_DIR [--preset qwen3-1.7b] [--device cuda] [-n 1000] [--max-tokens 100] \
        [--phases batch-invariant,stock,batch-invariant-eager,stock-eager,offline-batch-invariant,offline-stock,hf] \
        [--shared-prefix-tokens 2048]

Phases `batch-invariant` and `stock` run the engine as `detaudit serve` users get it (CUDA graphs on a GPU, steps
fitted to them by StepFit) under `detaudit local`'s server-like load; `<kernels>-eager` runs every step eagerly.
`offline-<kernels>` times what vLLM's and SGLang's anchors time (`llm.generate` of 1000 prompts): N copies of the
prompt submitted at once to Engine.generate, seats refilled as sequences finish, --max-tokens each. The JSON gets
`bi_over_stock_wall` (and `_eager`, `_offline`, `_offline_eager`) ratios. A phase name ending in `-nocache` runs its
engine without the prefix cache (on by default, as users get it); `<phase>_cache_over_nocache_wall` compares the two.
A `-nofit` before it runs the engine without StepFit (every step filled to --max-batched-tokens):
`<phase>_fit_over_nofit_wall` and `bi_over_stock_wall_nofit`. `--shared-prefix-tokens K` puts the same K-token system
prompt before every request (prompt tokens computed vs taken from the cache: `computed_tokens`,
`cached_prompt_tokens`). Each load phase first runs --warmup requests of its load untimed through its engine (then
empties the prefix cache), so no phase pays a process's first compilations; `--rounds R` runs the phase list R times,
every other round in reverse, so that no phase always runs first. On a GPU each phase also gets its physical floor
(see `floor`): the weights and the KV cache each step must read at the measured copy bandwidth, or its FLOPs at the
measured bf16 matmul rate, whichever is longer, summed over the phase's steps; and the wall time as a multiple of it.

No weights can be downloaded on the benchmark machines: the model is a random-weight one of the preset's shapes,
built here with detaudit.tiny (detaudit tiny-model); a Mixture-of-Experts preset (qwen3-30b-a3b) builds a Qwen3-MoE,
with --weights-at-load drawn on the device as the engine loads (too big to write).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from detaudit.audit.workload import CONTROL, build_workload, drive
from detaudit.engine.llm import Engine, EngineConfig
from detaudit.engine.sequence import SamplingParams
from detaudit.tiny import PRESETS, build_tiny_model

PROMPT = "Tell me about Richard Feynman"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _release(device: str) -> None:
    """Give the last engine's KV cache and graph pool back before the next phase builds its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _variant(name: str) -> tuple[str, bool, bool, bool]:
    """A phase or engine name: kernels, then `-eager` for the engine without CUDA graphs, `-nofit` for the one that
    fills every step to the token budget (no StepFit) and `-nocache` for the one without a prefix cache (users get
    graphs, fitting and the cache); returns (kernels, graphs, step fitting, prefix cache)."""
    rest = name.removesuffix("-nocache")
    unfit = rest.removesuffix("-nofit")
    kernels = unfit.removesuffix("-eager")
    return kernels, kernels == unfit, unfit == rest, rest == name


def _system(args: argparse.Namespace) -> list[dict[str, str]]:
    """The shared system message of --shared-prefix-tokens (none for 0), about K tokens of the model's tokenizer."""
    if not args.shared_prefix_tokens:
        return []
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(args.model_dir)
    words = " ".join(f"rule {i}: answer plainly and cite the source." for i in range(args.shared_prefix_tokens))
    return [{"role": "system", "content": tok.decode(tok.encode(words)[: args.shared_prefix_tokens])}]


def _max_model_len(args: argparse.Namespace) -> int:
    return 1024 + args.shared_prefix_tokens


def ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and an 8192^3 bf16 matmul rate, timed here."""
    import triton.testing

    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda d=dst, s=src: d.copy_(s), warmup=15, rep=60, return_mode="median")
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=15, rep=60, return_mode="median")
    return {
        "copy_GBps": round(2 * (2 << 30) / copy_ms / 1e6, 1),
        "mm8192_bf16_TFLOPs": round(2 * 8192**3 / mm_ms / 1e9, 1),
    }


Step = tuple[int, int, int, int, float]
# Bands of the step-time split (`step_split`): decode-only steps by sequences, steps with prefill by tokens.
DECODE_BANDS = (8, 64, 96, 128)
PREFILL_BANDS = (128, 192, 256, 512)


def log_steps(eng: Engine) -> list[Step]:
    """Record each step's work as (sequences, new tokens, keys read, query-key pairs) and its wall milliseconds:
    the engine's runner is wrapped so the batch is read just before it runs (sequences' cached counts are those
    before the step). A step ends reading its tokens back to the host, so its wall time holds its GPU work."""
    steps: list[Step] = []
    run = eng.runner.step

    def logged(batch: Any, eos_ids: set[int]) -> float | None:
        keys = pairs = 0
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            keys += seq.num_cached + n
            pairs += n * seq.num_cached + n * (n + 1) // 2
        t0 = time.perf_counter()
        replay = run(batch, eos_ids)
        steps.append((len(batch.seqs), batch.num_tokens, keys, pairs, (time.perf_counter() - t0) * 1e3))
        return replay

    eng.runner.step = logged
    return steps


def _band(x: int, edges: tuple[int, ...]) -> str:
    lo = 1
    for hi in edges:
        if x <= hi:
            return f"{lo}-{hi}"
        lo = hi + 1
    return f"{lo}+"


def step_split(steps: list[Step]) -> dict[str, list[float]]:
    """Steps and their summed runner seconds by kind: `decode <sequences>` (one new token per sequence) and
    `prefill <tokens>` (steps with prompt tokens), so two phases of one schedule show where their gap sits."""
    split: dict[str, list[float]] = {}
    for seqs, tokens, _, _, ms in steps:
        kind = f"decode {_band(seqs, DECODE_BANDS)}" if tokens == seqs else f"prefill {_band(tokens, PREFILL_BANDS)}"
        entry = split.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += ms / 1e3
    return {k: [n, round(sec, 4)] for k, (n, sec) in sorted(split.items())}


def floor(eng: Engine, steps: list[Step], ceil: dict[str, float]) -> dict[str, float]:
    """The phase's physical floor: per step, max(bytes / copy bandwidth, FLOPs / matmul rate), summed. Bytes: every
    weight but the embedding (whose gathered rows are negligible) plus the KV cache read and written; FLOPs: the
    linear layers on the step's tokens (the lm_head on one row per sequence) and attention's two products. A
    Mixture-of-Experts layer reads the experts its tokens pick (as many as uniform routing of tokens x top-k picks
    would hit on average: a random model's router is near uniform) and computes top-k of them per token."""
    s = eng.spec
    d, lay, width = s.head_dim, s.num_layers, s.num_heads * s.head_dim
    attn = s.hidden_size * (width + 2 * s.num_kv_heads * d) + width * s.hidden_size
    moe, dense = len(s.moe_layers), lay - len(s.moe_layers)
    mlp, expert, router = 3 * s.hidden_size * s.intermediate_size, 3 * s.hidden_size * s.moe_intermediate_size, 0
    if moe:
        router = s.num_experts * s.hidden_size
    head = s.hidden_size * s.vocab_size
    elt = 2  # bf16
    kv_token = 2 * lay * s.num_kv_heads * d * elt
    bw, peak = ceil["copy_GBps"] * 1e9, ceil["mm8192_bf16_TFLOPs"] * 1e12
    mem = comp = total = 0.0
    for seqs, tokens, keys, pairs, _ in steps:
        hit = s.num_experts * (1 - (1 - 1 / s.num_experts) ** (tokens * s.num_experts_per_tok)) if moe else 0
        weights = lay * attn + dense * mlp + moe * (hit * expert + router) + head
        t_mem = (weights * elt + (keys + tokens) * kv_token) / bw
        per_token = lay * attn + dense * mlp + moe * (s.num_experts_per_tok * expert + router)
        t_comp = (2 * per_token * tokens + 2 * head * seqs + 4 * lay * s.num_heads * d * pairs) / peak
        mem, comp, total = mem + t_mem, comp + t_comp, total + max(t_mem, t_comp)
    return {"floor_s": round(total, 3), "bytes_s": round(mem, 3), "flops_s": round(comp, 3), "steps": len(steps)}


def _floor(eng: Engine, steps: list[Step], wall: float, args: argparse.Namespace) -> dict:
    """The floor of a phase and its wall time as a multiple of it (GPU runs only)."""
    if not args.ceilings:
        return {}
    f = floor(eng, steps, args.ceilings)
    return {"floor": f, "wall_over_floor": round(wall / f["floor_s"], 2)}


def _engine(model: Path, name: str, args: argparse.Namespace, **cfg) -> tuple[Engine, float]:
    """The engine of a phase name and its start-up time (weights, KV cache, CUDA-graph capture)."""
    kernels, graphs, fit, cache = _variant(name)
    t0 = time.perf_counter()
    eng = Engine(
        EngineConfig(
            str(model),
            device=args.device,
            dtype="bfloat16",
            kernels=kernels,
            cuda_graphs=graphs,
            fit_steps=fit,
            prefix_cache=cache,
            **cfg,
        )
    )
    _sync(args.device)
    return eng, round(time.perf_counter() - t0, 2)


def local_phase(model: Path, name: str, args: argparse.Namespace) -> dict:
    """`detaudit local`'s load loop (without the run directory): unique target completions and generation time."""
    eng, start_s = _engine(
        model,
        name,
        args,
        max_batch=args.max_batch,
        max_batched_tokens=args.max_batched_tokens,
        max_model_len=_max_model_len(args),
    )
    work = build_workload(args.scenario, [PROMPT], args.n, max_tokens=args.max_tokens, max_batch=args.max_batch, seed=0)
    system = _system(args)
    if system:  # drive() sends each arrival's text as the user message: the system message goes in front of it
        encode = eng.encode_chat
        eng.encode_chat = lambda messages: encode(system + messages)  # type: ignore[method-assign]
    if args.warmup:
        # Untimed, as a server warms up before it serves: the first pass over a load's shapes compiles Triton
        # specialisations and grows the allocator, which would otherwise land in the first phase of a process
        # only (1.5-2.5 s of 10-13 on the H200). The timed run then starts with an empty prefix cache.
        warm = build_workload(
            args.scenario,
            [PROMPT],
            min(args.warmup, args.n),
            max_tokens=args.max_tokens,
            max_batch=args.max_batch,
            seed=1,
        )
        drive(
            eng,
            warm,
            seed=0,
            top_logprobs=0,
            on_target=lambda *_: None,
            max_inflight=1 if args.scenario == CONTROL else None,
        )
        eng.flush_prefix_cache()
        _sync(args.device)
    outs: list[tuple[int, ...]] = []
    steps = log_steps(eng)
    stats = drive(
        eng,
        work,
        seed=0,
        top_logprobs=0,
        max_inflight=1 if args.scenario == CONTROL else None,
        on_target=lambda _a, seq, _t0, _lat: outs.append(tuple(seq.output_ids)),
    )
    counts = sorted(Counter(outs).values(), reverse=True)
    modal = Counter(outs).most_common(1)[0][0]
    first_div = [next((i for i, (x, y) in enumerate(zip(o, modal, strict=False)) if x != y), None) for o in outs]
    first_div = [d for d in first_div if d is not None]
    return {
        **stats,
        "n": len(outs),
        "unique": len(counts),
        "counts": counts[:10],
        "first_divergence_min": min(first_div, default=None),
        "tok_per_s": round(stats["generated_tokens"] / stats["wall_s"], 1),
        "computed_tokens": sum(step[1] for step in steps),
        "step_split": step_split(steps),
        "prompt_tokens": len(eng.encode_chat([{"role": "user", "content": PROMPT}])),
        "engine_start_s": start_s,
        "warmup_requests": min(args.warmup, args.n),
        **_floor(eng, steps, stats["wall_s"], args),
        "engine": eng.info(),
    }


def offline_phase(model: Path, name: str, args: argparse.Namespace) -> dict:
    """N prompts submitted at once through Engine.generate (as `llm.generate` of the anchors), after a warm-up
    generate of one full batch: wall time, tokens/s and unique completions."""
    eng, start_s = _engine(
        model,
        name.removeprefix("offline-"),
        args,
        max_batch=args.max_batch,
        max_batched_tokens=args.max_batched_tokens,
        max_model_len=_max_model_len(args),
    )
    prompt = eng.encode_chat([*_system(args), {"role": "user", "content": PROMPT}])
    eng.generate([prompt] * args.max_batch, SamplingParams(max_tokens=2, ignore_eos=True))
    _sync(args.device)
    steps0, replays0, prefill0, fitted0 = eng.steps, eng.graph_replays, eng.prefill_graph_replays, eng.fitted_steps
    steps = log_steps(eng)
    t0 = time.perf_counter()
    seqs = eng.generate([prompt] * args.n, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    _sync(args.device)
    wall = time.perf_counter() - t0
    tokens = sum(len(s.output_ids) for s in seqs)
    counts = sorted(Counter(tuple(s.output_ids) for s in seqs).values(), reverse=True)
    return {
        "n": len(seqs),
        "steps": eng.steps - steps0,
        "graph_steps": eng.graph_replays - replays0,
        "prefill_graph_steps": eng.prefill_graph_replays - prefill0,
        "fitted_steps": eng.fitted_steps - fitted0,
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_per_s": round(tokens / wall, 1),
        "unique": len(counts),
        "counts": counts[:10],
        "computed_tokens": sum(step[1] for step in steps),
        "step_split": step_split(steps),
        "cached_prompt_tokens": sum(s.cached_tokens for s in seqs),
        "prompt_tokens": len(prompt),
        "engine_start_s": start_s,
        **_floor(eng, steps, wall, args),
        "engine": eng.info(),
    }


def hf_phase(model: Path, args: argparse.Namespace) -> dict:
    """tokens/s of HF generate() vs the engine on the same prompts, batch and length; one engine per name in
    --hf-engine-kernels (the first one gives the top-level figures)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    texts = [f"{PROMPT}, part {i}" for i in range(args.hf_batch)]
    params = SamplingParams(max_tokens=args.hf_tokens, ignore_eos=True)
    engines: dict[str, dict] = {}
    for name in args.hf_engine_kernels.split(","):
        eng, start_s = _engine(model, name, args, max_batch=args.hf_batch, max_batched_tokens=4096, max_model_len=512)
        prompts = [eng.encode_chat([{"role": "user", "content": t}]) for t in texts]
        eng.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))  # warm-up: the same prefill shapes
        _sync(args.device)
        t0 = time.perf_counter()
        seqs = eng.generate(prompts, params)
        _sync(args.device)
        engine_s = time.perf_counter() - t0
        n_tokens = sum(len(s.output_ids) for s in seqs)
        engines[name] = {
            "engine_s": round(engine_s, 3),
            "engine_tok_per_s": round(n_tokens / engine_s, 1),
            "engine_start_s": start_s,
            "cuda_graphs": eng.info()["cuda_graphs"],
        }
        del eng, seqs
        _release(args.device)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to(args.device).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(model)
    tok.padding_side = "left"
    enc = tok(
        [
            tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
            for t in texts
        ],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    ).to(args.device)
    kw = dict(
        max_new_tokens=args.hf_tokens, min_new_tokens=args.hf_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
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
    return {
        "batch": args.hf_batch,
        "tokens_each": args.hf_tokens,
        "engine_kernels": first,
        **engines[first],
        "hf_generate_s": round(hf_s, 3),
        "hf_tok_per_s": round(hf_tok_per_s, 1),
        "engines": engines,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="qwen3-1.7b", help="a model-named MoE preset (qwen3-30b-a3b) builds qwen3-moe")
    ap.add_argument(
        "--weights-at-load",
        action="store_true",
        help="write no weights: the engine draws random ones on the device as it loads (tiny-model --weights-at-load; "
        "needed for qwen3-30b-a3b, 61 GB in bf16; no hf phase then)",
    )
    ap.add_argument("--model", type=Path, help="an existing model directory (else one of --preset's shape is built)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--scenario", default="mixed")
    ap.add_argument(
        "--shared-prefix-tokens", type=int, default=0, help="a system prompt of this many tokens before every request"
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=256,
        help="requests of the same load run untimed through each phase's engine first (0: none); offline phases "
        "always warm up with one batch",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the phase list this many times, every other round in reverse (A B, B A, ...), so that no phase "
        "always runs first in the process; ratios then compare mean walls",
    )
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--hf-tokens", type=int, default=128)
    ap.add_argument(
        "--hf-engine-kernels",
        default="batch-invariant",
        help="comma list of engines to time against HF: kernels, -eager for no CUDA graphs",
    )
    ap.add_argument(
        "--phases",
        default="batch-invariant,stock,hf",
        help="comma list: batch-invariant, stock (CUDA graphs on, as users run them), the same with "
        "-eager (graphs off), offline-<kernels>[-eager] (N prompts at once), hf; any but hf with -nofit (steps "
        "filled to the budget) and then -nocache (no prefix cache)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.ceilings = ceilings() if args.device.startswith("cuda") else None
    result: dict = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "ceilings": args.ceilings,
    }
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
    arch = "qwen3-moe" if "num_experts" in PRESETS[args.preset] else "qwen3"
    model = args.model or build_tiny_model(
        args.out / "model",
        arch,
        preset=args.preset,
        dtype="bfloat16",
        device=args.device,
        weights_at_load=args.weights_at_load,
    )
    result["model_build_s"] = round(time.perf_counter() - t0, 1)
    args.model_dir = model
    save()
    phases = args.phases.split(",")
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for phase in phases if r % 2 == 0 else phases[::-1]:
            try:
                if phase == "hf":
                    run = hf_phase(model, args)
                elif phase.startswith("offline-"):
                    run = offline_phase(model, phase, args)
                else:
                    run = local_phase(model, phase, args)
            except Exception:
                run = {"error": traceback.format_exc(limit=6)}
            _release(args.device)
            runs.setdefault(phase, []).append(run)
            _summarise(result, runs)
            save()  # after every phase: a run cut short keeps its finished figures and ratios


def _summarise(result: dict, runs: dict[str, list[dict]]) -> None:
    """Each phase's figures (its first round's) and the ratios. With several rounds a phase also lists every
    round's wall time and unique count (`wall_s_rounds`, `unique_rounds`), and a ratio compares the mean walls over
    the rounds both phases finished, each round's own ratio in `<ratio>_rounds`."""
    walls: dict[str, list[float]] = {}
    for phase, rs in runs.items():
        result[phase] = dict(rs[0])
        walls[phase] = [x["wall_s"] for x in rs if "wall_s" in x]
        if len(rs) > 1:
            result[phase]["wall_s_rounds"] = walls[phase]
            result[phase]["unique_rounds"] = [x.get("unique") for x in rs]

    def ratio(key: str, num: str, den: str) -> None:
        a, b = walls.get(num, []), walls.get(den, [])
        k = min(len(a), len(b))
        if k:
            result[key] = round(statistics.fmean(a[:k]) / statistics.fmean(b[:k]), 3)
            result[key.replace("_over_", "_minus_").replace("_wall", "_seconds_by_step_kind")] = _gap(
                runs[num][:k], runs[den][:k]
            )
        if k > 1:
            result[key + "_rounds"] = [round(x / y, 3) for x, y in zip(a[:k], b[:k], strict=True)]

    # With CUDA graphs (what users get) and, when measured, without; under load and offline.
    for prefix in ("", "offline-"):
        for suffix in ("", "-eager", "-nofit"):
            key = "bi_over_stock_wall" + ("_offline" if prefix else "") + suffix.replace("-", "_")
            ratio(key, f"{prefix}batch-invariant{suffix}", f"{prefix}stock{suffix}")
    for name in runs:
        for feature in ("cache", "fit"):  # e.g. stock_fit_over_nofit_wall: stock vs stock-nofit
            if name.endswith(f"-no{feature}"):
                on = name.removesuffix(f"-no{feature}")
                ratio(f"{on}_{feature}_over_no{feature}_wall", on, name)


def _gap(a: list[dict], b: list[dict]) -> dict[str, list[float]]:
    """Per step kind: [a's steps, a's mean runner seconds minus b's] over rounds both ran (b's own steps are in its
    step_split: with StepFit the two schedules can differ)."""
    gap: dict[str, list[float]] = {}
    for kind in sorted({k for r in a + b for k in r.get("step_split", {})}):
        mean = [statistics.fmean(r.get("step_split", {}).get(kind, [0, 0.0])[1] for r in rs) for rs in (a, b)]
        steps = a[0].get("step_split", {}).get(kind, [0, 0.0])[0]
        gap[kind] = [steps, round(mean[0] - mean[1], 4)]
    return gap


if __name__ == "__main__":
    main()
