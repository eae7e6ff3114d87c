"""Logprobs, greedy choice, top-k and seeded sampling for the rows that produce a token this step."""

from __future__ import annotations

import torch

from detaudit.engine.sequence import SamplingParams

_MASK64 = (1 << 63) - 1


def step_seed(seed: int, position: int) -> int:
    """A counter-based seed: the draw for output position p depends on (seed, p) only, never on batch order."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (x ^ (x >> 29)) & _MASK64


def sample(
    logits: torch.Tensor, params: list[SamplingParams], positions: list[int]
) -> tuple[list[int], list[float], list[list[int]], list[list[float]]]:
    """Token, its logprob, and the top-k (ids, logprobs) per row. Logprobs are fp32 log-softmax of the raw logits.

    Temperature > 0 rows draw by the Gumbel-max trick from a generator seeded with step_seed(seed, position),
    so (inputs, seed) gives the same sample whatever else shares the batch.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    tokens = logprobs.argmax(dim=-1)
    for i, (p, pos) in enumerate(zip(params, positions, strict=True)):
        if p.temperature <= 0:
            continue
        scaled = logits[i].float() / p.temperature
        if p.top_p < 1.0:
            probs, order = torch.softmax(scaled, dim=-1).sort(descending=True)
            drop = probs.cumsum(0) - probs > p.top_p
            scaled[order[drop]] = float("-inf")
        gen = torch.Generator(device=logits.device).manual_seed(step_seed(p.seed, pos))
        u = torch.rand(scaled.shape, generator=gen, device=logits.device, dtype=torch.float32)
        tokens[i] = (scaled - torch.log(-torch.log(u.clamp_min(1e-20)))).argmax()
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    k = max((p.top_logprobs for p in params), default=0)
    if k > 0:
        top_lp, top_id = logprobs.topk(k, dim=-1)
        top_ids = [row[: p.top_logprobs] for row, p in zip(top_id.tolist(), params, strict=True)]
        top_lps = [row[: p.top_logprobs] for row, p in zip(top_lp.tolist(), params, strict=True)]
    else:
        top_ids = [[] for _ in params]
        top_lps = [[] for _ in params]
    return tokens.tolist(), chosen.tolist(), top_ids, top_lps
