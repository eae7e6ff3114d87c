"""Server-like load for local reruns: the N target requests among seeded filler requests arriving over time.

Time is counted in engine steps, not seconds, so a (scenario, seed) pair always gives the same arrivals and the
same batch compositions: a stock-kernel run is reproducible, yet each of its N target requests meets different
neighbours. Scenarios follow SGLang's determinism test:
  single  only the target prompts, arriving at random steps, so batch sizes vary;
  mixed   targets among as many fillers of random prompt and output lengths;
  prefix  targets among fillers whose prompts start with the target prompt and go on for a random length;
and one control arm, the local counterpart of `detaudit run --concurrency 1`:
  serial  only the target prompts, one at a time (each runs alone, batch size 1).
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
    """One request of the workload: when it arrives, its chat text, its output budget, and which target it is."""

    step: int
    text: str
    max_tokens: int
    target: tuple[int, int] | None  # (prompt position, repeat) for target requests, None for fillers


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def build_workload(
    scenario: str, prompts: list[str], n: int, *, max_tokens: int, max_batch: int, seed: int
) -> list[Arrival]:
    """All arrivals of one arm, sorted by step (ties keep the shuffled order)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}")
    rng = random.Random(f"{scenario}:{seed}")
    reqs = [Arrival(0, p, max_tokens, (i, r)) for i, p in enumerate(prompts) for r in range(n)]
    if scenario == CONTROL:  # all at step 0, in order; drive() admits them one at a time
        return reqs
    n_fill = 0 if scenario == "single" else len(reqs)
    for _ in range(n_fill):
        base = rng.choice(prompts) + " " if scenario == "prefix" else ""
        reqs.append(Arrival(0, base + _words(rng, 2, 32), rng.randint(1, max_tokens), None))
    rng.shuffle(reqs)
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
    step = generated = 0
    shapes: list[tuple[int, int]] = []
    replays0, prefill0 = engine.graph_replays, engine.prefill_graph_replays
    t_start = time.perf_counter()
    while pending or engine.scheduler.has_work():
        while pending and pending[0].step <= step and (max_inflight is None or len(started) < max_inflight):
            a = pending.pop(0)
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
        "graph_steps": engine.graph_replays - replays0,
        "prefill_graph_steps": engine.prefill_graph_replays - prefill0,
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
