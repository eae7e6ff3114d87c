"""Server-like load for local reruns: the N target requests among seeded filler requests arriving over time.

Time is counted in engine steps, not seconds, so a (scenario, seed) pair always gives the same arrivals and the
same batch compositions: a stock-kernel run is reproducible, yet each of its N target requests meets different
neighbours. Scenarios follow SGLang's determinism test:
  single  only the target prompts, arriving at random steps, so batch sizes vary;
  mixed   targets among as many fillers of random prompt and output lengths;
  prefix  the targets with cold and warm prefix caches: among fillers that extend the target prompt, cut it short
          (a prefix ending inside a KV block) or share nothing with it, and prefix-cache flushes at random steps;
and one control arm, the local counterpart of `detaudit run --concurrency 1`:
  serial  only the target prompts, one at a time (each runs alone, batch size 1, the prefix cache flushed before
          each: every one computes its whole prompt).
Pure Python: no torch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from detaudit.engine.sequence import SamplingParams, Sequence

SCENARIOS = ("single", "mixed", "prefix", "serial")
CONTROL = "serial"  # runs one request at a time
_WORDS = (
    "the a model token batch kernel server request cache prompt layer vector matrix sum order float bit "
    "round error seed river mountain history science music poem story city market energy light water "
    "theory number garden window machine language memory signal network random table column value"
).split()


@dataclass
class Arrival:
    """One request of the workload: when it arrives, its chat text, its output budget, which target it is, and
    whether the engine's prefix cache is flushed just before it arrives."""

    step: int
    text: str
    max_tokens: int
    target: tuple[int, int] | None  # (prompt position, repeat) for target requests, None for fillers
    flush: bool = False


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def _filler(scenario: str, rng: random.Random, prompts: list[str]) -> str:
    """A filler's text: random words; for `prefix`, half extend a target prompt (so it warms the cache for the
    targets, and they for it), a quarter are a target prompt cut short at a random character (a shared prefix that
    ends inside a block: partial-block hits), a quarter random words."""
    if scenario != "prefix":
        return _words(rng, 2, 32)
    kind, prompt = rng.random(), rng.choice(prompts)
    if kind < 0.5:
        return prompt + " " + _words(rng, 2, 32)
    if kind < 0.75:
        return prompt[: rng.randint(1, max(1, len(prompt) - 1))]
    return _words(rng, 2, 32)


def build_workload(
    scenario: str, prompts: list[str], n: int, *, max_tokens: int, max_batch: int, seed: int
) -> list[Arrival]:
    """All arrivals of one arm, sorted by step (ties keep the shuffled order)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}")
    rng = random.Random(f"{scenario}:{seed}")
    reqs = [Arrival(0, p, max_tokens, (i, r)) for i, p in enumerate(prompts) for r in range(n)]
    if scenario == CONTROL:  # all at step 0, in order, each cold; drive() admits them one at a time
        for r in reqs:
            r.flush = True
        return reqs
    n_fill = 0 if scenario == "single" else len(reqs)
    for _ in range(n_fill):
        reqs.append(Arrival(0, _filler(scenario, rng, prompts), rng.randint(1, max_tokens), None))
    rng.shuffle(reqs)
    if scenario == "prefix":  # about one arrival in eight finds the cache cold
        for r in reqs:
            r.flush = rng.random() < 0.125
    # Offered load about one batch's worth of work per step: queues build up in bursts and drain in lulls.
    horizon = max(1, sum(r.max_tokens for r in reqs) // max_batch)
    steps = sorted(rng.randrange(horizon) for _ in reqs)
    for r, s in zip(reqs, steps, strict=True):
        r.step = s
    return reqs


def drive(
    engine: Any,
    work: list[Arrival],
    *,
    seed: int,
    top_logprobs: int,
    on_target: Callable[[Arrival, Sequence, datetime, float], None],
    max_inflight: int | None = None,
) -> dict[str, Any]:
    """Feed arrivals into `engine` (a detaudit.engine.llm.Engine) step by step, calling `on_target(arrival, seq,
    started_at, latency_s)` for each finished target request; returns the arm's batch statistics. With
    `max_inflight`, an arrival waits until fewer than that many requests are in the engine (1: serial)."""
    pending = list(work)
    started: dict[int, tuple[Arrival, datetime, float]] = {}
    step = generated = flushes = cached = preempted = 0
    shapes: list[tuple[int, int]] = []
    replays0, prefill0, fitted0 = engine.graph_replays, engine.prefill_graph_replays, engine.fitted_steps
    t_start = time.perf_counter()
    while pending or engine.scheduler.has_work():
        while pending and pending[0].step <= step and (max_inflight is None or len(started) < max_inflight):
            a = pending.pop(0)
            if a.flush:
                engine.flush_prefix_cache()
                flushes += 1
            params = SamplingParams(max_tokens=a.max_tokens, seed=seed, top_logprobs=top_logprobs if a.target else 0)
            seq = engine.add(Sequence(engine.encode_chat([{"role": "user", "content": a.text}]), params))
            started[seq.seq_id] = (a, datetime.now(timezone.utc), time.perf_counter())
        if not engine.scheduler.has_work():
            step = pending[0].step
            continue
        finished = engine.step()
        shapes.append(engine.last_batch)
        step += 1
        for seq in finished:
            a, t0, p0 = started.pop(seq.seq_id)
            generated += len(seq.output_ids)
            cached += seq.cached_tokens
            preempted += seq.preemptions
            if a.target is not None:
                on_target(a, seq, t0, time.perf_counter() - p0)
    seqs = [b for b, _ in shapes] or [0]
    return {
        "requests": len(work),
        "fillers": sum(a.target is None for a in work),
        "steps": len(shapes),
        "batch_seqs_min": min(seqs),
        "batch_seqs_max": max(seqs),
        "batch_seqs_mean": round(sum(seqs) / len(seqs), 2),
        "batch_tokens_max": max((t for _, t in shapes), default=0),
        "distinct_batch_shapes": len(set(shapes)),
        "generated_tokens": generated,
        "cached_prompt_tokens": cached,  # prompt tokens of every finished request that came from the prefix cache
        "prefix_cache_flushes": flushes,
        "preemptions": preempted,
        "graph_steps": engine.graph_replays - replays0,
        "prefill_graph_steps": engine.prefill_graph_replays - prefill0,
        "fitted_steps": engine.fitted_steps - fitted0,  # steps whose prompt tokens were held back (StepFit)
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
