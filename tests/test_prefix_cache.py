"""The prefix cache changes nothing with the bundled kernels (issue #17's must-show), on a tiny model on CPU.

200 copies of a target prompt arrive among fillers that extend it, cut it inside a block or share nothing, with
cache flushes, a 16-token budget (the part after a cache hit is chunked) and too few KV blocks (eviction and
preemption): every copy has the tokens, logprobs and top-k of the target computed alone without a cache, bitwise.
With stock kernels the same load gives several logprob vectors (the negative control)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefix_load import LoadResult, run_load

from detaudit.engine.llm import Engine, EngineConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_LEN, BLOCK, MAX_TOKENS = 27, 4, 4  # 6 full blocks; a warm copy computes its last 3 tokens


def _engine(model: Path, kernels: str, **kw) -> Engine:
    cfg = dict(max_batch=8, max_batched_tokens=16, max_model_len=48, block_size=BLOCK, kv_blocks=20)
    cfg.update(kw)
    return Engine(EngineConfig(str(model), dtype="bfloat16", kernels=kernels, **cfg))


def _load(model: Path, kernels: str) -> LoadResult:
    return run_load(_engine(model, kernels), seed=0, n=200, prompt_len=PROMPT_LEN, max_tokens=MAX_TOKENS)


def test_200_requests_with_the_cache_equal_the_cache_off_run_bitwise(tiny_model_dir):
    load = _load(tiny_model_dir, "batch-invariant")
    first = load.targets[0]
    off = _engine(tiny_model_dir, "batch-invariant", prefix_cache=False, max_batched_tokens=64, kv_blocks=None)
    ref = off.generate([first.prompt_ids], first.params)[0]
    assert len(load.targets) == 200
    for seq in load.targets:
        assert (seq.output_ids, seq.logprobs, seq.top_ids, seq.top_logprobs) == (
            ref.output_ids,
            ref.logprobs,
            ref.top_ids,
            ref.top_logprobs,
        )
    # The load did what it is for: cold and warm copies, hits of some blocks only, chunks past a hit, flushes,
    # preempted copies recomputed, and every block given back.
    full = (PROMPT_LEN - 1) // BLOCK * BLOCK
    cached = [s.cached_tokens for s in load.targets]
    assert cached.count(0) >= 5 and cached.count(full) >= 100 and sum(0 < c < full for c in cached) >= 3
    assert load.crossings >= 5 and load.flushes >= 5
    assert sum(s.preemptions for s in load.targets) >= 3
    assert load.refs_left == []


def test_stock_kernels_under_the_same_load_give_other_logprobs(tiny_model_dir):
    """Negative control: a warm copy computes its last tokens with another attention path than a cold one."""
    load = _load(tiny_model_dir, "stock")
    assert len({tuple(s.logprobs) for s in load.targets}) >= 3
    cold = {tuple(s.logprobs) for s in load.targets if s.cached_tokens == 0}
    warm = {tuple(s.logprobs) for s in load.targets if s.cached_tokens}
    assert warm - cold  # some warm copy differs from every cold one


@pytest.mark.parametrize("block", [1, 16])
def test_any_block_size_any_chunking_past_the_hit(tiny_model_dir, block):
    """Blocks of one token (every token but the last a hit) and of 16, the part past the hit computed whole or in
    chunks of 1 and 5: the same bits as the prompt computed alone without a cache."""
    from detaudit.engine.sequence import SamplingParams

    prompt = list(range(100, 140))
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    kw = dict(block_size=block, kv_blocks=None, max_model_len=64)
    ref = _engine(tiny_model_dir, "batch-invariant", prefix_cache=False, **kw).generate([prompt], params)[0]
    for budget in (64, 5, 1):
        eng = _engine(tiny_model_dir, "batch-invariant", max_batched_tokens=max(budget, 8), **kw)
        eng.scheduler.max_batched_tokens = budget
        eng.generate([prompt[:17] + [7, 7]], params)  # warms the first 17 tokens' full blocks
        seq = eng.generate([prompt], params)[0]
        assert seq.cached_tokens == 17 // block * block
        assert (seq.output_ids, seq.logprobs) == (ref.output_ids, ref.logprobs)
