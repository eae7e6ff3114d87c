"""A seeded load for the prefix-cache invariance tests (CPU here, CUDA in tests/gpu): N copies of one target prompt
among fillers that extend it, cut it short at any token (a shared prefix ending inside a block), or share nothing,
with prefix-cache flushes, a small token budget (prompts chunked across the cached boundary) and, when the engine
is given few KV blocks, eviction and preemption."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from detaudit.engine.llm import Engine
from detaudit.engine.sequence import SamplingParams, Sequence


@dataclass
class LoadResult:
    targets: list[Sequence]
    fillers: list[Sequence]
    crossings: int = 0  # targets whose first computed chunk after a cache hit stopped short of the prompt's end
    flushes: int = 0
    steps: int = 0
    refs_left: list[int] = field(default_factory=list)


def run_load(eng: Engine, *, seed: int, n: int, prompt_len: int, max_tokens: int) -> LoadResult:
    rng = random.Random(seed)
    vocab = eng.spec.vocab_size
    target = [rng.randrange(10, vocab) for _ in range(prompt_len)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, top_logprobs=2)
    kinds = ["target"] * n + ["extend"] * (n // 4) + ["cut"] * (n // 8) + ["other"] * (n // 8)
    rng.shuffle(kinds)
    out = LoadResult([], [])
    first_chunk: dict[int, int] = {}
    schedule = eng.scheduler.schedule

    def watching():  # noqa: ANN202 -- records, for targets, the first chunk computed past the cache
        batch = schedule()
        if batch is not None:
            for s, k in zip(batch.seqs, batch.num_new, strict=True):
                if s.cached_tokens and s.num_cached == s.cached_tokens and s.seq_id not in first_chunk:
                    first_chunk[s.seq_id] = k
        return batch

    eng.scheduler.schedule = watching  # type: ignore[method-assign]
    while kinds or eng.scheduler.has_work():
        for kind in [kinds.pop() for _ in range(min(len(kinds), rng.choice((0, 0, 1, 1, 2, 3))))]:
            if rng.random() < 0.08:
                eng.flush_prefix_cache()
                out.flushes += 1
            if kind == "target":
                out.targets.append(eng.add(Sequence(list(target), params)))
                continue
            if kind == "extend":
                ids = target + [rng.randrange(10, vocab) for _ in range(rng.randint(1, 12))]
            elif kind == "cut":
                ids = target[: rng.randint(1, prompt_len - 1)] + [rng.randrange(10, vocab) for _ in range(3)]
            else:
                ids = [rng.randrange(10, vocab) for _ in range(rng.randint(3, prompt_len))]
            filler = SamplingParams(max_tokens=rng.randint(1, max_tokens), ignore_eos=True)
            out.fillers.append(eng.add(Sequence(ids, filler)))
        eng.step()
        out.steps += 1
    del eng.scheduler.schedule
    out.crossings = sum(
        s.cached_tokens + first_chunk[s.seq_id] < len(s.prompt_ids) for s in out.targets if s.seq_id in first_chunk
    )
    blocks = eng.scheduler.blocks
    out.refs_left = [r for r in map(blocks.users, range(blocks.num_blocks)) if r]
    return out
