"""The prefix cache's bookkeeping, scheduler and block manager only (pure Python, a stand-in for the model): hits,
partial-block hits, sharing with running sequences, LRU eviction, preemption with recompute, flush, refcounts."""

from __future__ import annotations

from detaudit.engine.block_manager import BlockManager
from detaudit.engine.prefix_cache import block_hashes
from detaudit.engine.scheduler import Scheduler
from detaudit.engine.sequence import SamplingParams, Sequence

BS = 4


def _sched(num_blocks: int = 64, budget: int = 64, max_batch: int = 8) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_batch=max_batch, max_batched_tokens=budget)


def _seq(prompt: list[int], max_tokens: int = 3) -> Sequence:
    return Sequence(list(prompt), SamplingParams(max_tokens=max_tokens))


def _step(s: Scheduler) -> tuple[list[Sequence], list[int]]:
    """One step with a stand-in model: a sequence whose prompt is complete gets token 100 + its length."""
    batch = s.schedule()
    assert batch is not None
    for seq, n in zip(batch.seqs, batch.num_new, strict=True):
        if seq.num_cached + n == len(seq):
            seq.append(100 + len(seq), -1.0, [], [], eos_ids=set())
    s.finish_step(batch)
    return batch.seqs, batch.num_new


def _run(s: Scheduler, *seqs: Sequence) -> None:
    for q in seqs:
        s.add(q)
    for _ in range(200):
        if not s.has_work():
            return
        _step(s)
    raise AssertionError("the scheduler did not finish")


def _all_free(s: Scheduler) -> bool:
    return s.blocks.num_free == s.blocks.num_blocks and all(s.blocks.users(b) == 0 for b in range(s.blocks.num_blocks))


def test_hashes_chain_over_full_blocks_only():
    a = list(block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS))
    assert len(a) == 2  # the ninth token is a partial block
    b = list(block_hashes([9, 9, 9, 9, 5, 6, 7, 8], BS))
    assert a[0] != b[0] and a[1] != b[1]  # same tokens in block 2, other parent: another prefix
    assert list(block_hashes([5, 6, 7, 8], BS, parent=a[0])) == [a[1]]


def test_a_repeated_prompt_starts_past_its_cached_full_blocks_and_computes_the_rest():
    s = _sched()
    prompt = list(range(1, 11))  # two full blocks and 2 tokens
    _run(s, _seq(prompt))
    assert len(s.blocks.index) == 3  # two prompt blocks and one of prompt + outputs (12 tokens computed)
    again = _seq(prompt)
    s.add(again)
    seqs, num_new = _step(s)
    assert again.cached_tokens == 8 and num_new == [2]
    _run(s)
    assert _all_free(s)


def test_a_prompt_of_whole_blocks_still_computes_its_last_token():
    s = _sched()
    _run(s, _seq(list(range(1, 9))))
    again = _seq(list(range(1, 9)))
    s.add(again)
    assert _step(s)[1] == [4] and again.cached_tokens == 4  # block 2 is cached too, but its last token is needed


def test_partial_block_hits_share_only_the_full_blocks_in_common():
    s = _sched()
    _run(s, _seq(list(range(1, 13))))
    other = _seq([1, 2, 3, 4, 5, 6, 0, 0, 0, 0])  # shares one full block and half of the next
    fresh = _seq([0, 1, 2, 3, 4, 5])  # shares no prefix at all
    s.add(other)
    s.add(fresh)
    assert _step(s)[1] == [6, 6] and (other.cached_tokens, fresh.cached_tokens) == (4, 0)


def test_a_running_sequence_shares_its_blocks_and_refcounts_return_to_zero():
    s = _sched(budget=8)
    prompt = list(range(1, 18))
    first = _seq(prompt)
    s.add(first)
    _step(s)
    _step(s)  # 16 of its 17 prompt tokens are computed: four full blocks named
    second = _seq(prompt + [50, 51])
    s.add(second)
    _, num_new = _step(s)
    assert second.cached_tokens == 16 and num_new == [1, 3]
    assert second.block_table[:4] == first.block_table[:4]
    assert all(s.blocks.users(b) == 2 for b in first.block_table[:4])
    _run(s)
    assert _all_free(s)


def test_chunked_prefill_continues_past_the_cached_boundary():
    s = _sched(budget=3)
    prompt = list(range(1, 15))
    _run(s, _seq(prompt))
    again = _seq(prompt + list(range(20, 27)))
    s.add(again)
    chunks = []
    while again.num_cached < len(again.prompt_ids):
        chunks.append(_step(s)[1][0])
    assert again.cached_tokens == 12 and chunks == [3, 3, 3]


def test_eviction_takes_the_least_recently_used_unused_block_first():
    s = _sched(num_blocks=8, budget=64)
    old, recent = list(range(1, 9)), list(range(30, 38))
    _run(s, _seq(old, max_tokens=1), _seq(recent, max_tokens=1))
    # Both prompts' blocks are cached and unused, 4 blocks are free; a 24-token prompt needs 6: the older prompt's
    # two blocks are evicted (its tail first), the recent prompt's survive.
    _run(s, _seq(list(range(60, 84)), max_tokens=1))
    warm, cold = _seq(recent), _seq(old)
    s.add(warm)
    s.add(cold)
    _step(s)
    assert (warm.cached_tokens, cold.cached_tokens) == (4, 0)
    _run(s)
    assert _all_free(s)


def test_the_youngest_running_sequence_is_preempted_and_recomputed_from_the_cache():
    s = _sched(num_blocks=5, budget=64)
    elder, young = _seq(list(range(1, 8)), max_tokens=8), _seq(list(range(40, 47)), max_tokens=8)
    s.add(elder)
    s.add(young)
    _step(s)  # two blocks each; the fifth block goes to the first to need it
    steps = 0
    while young.preemptions == 0:
        _step(s)
        steps += 1
        assert steps < 10
    assert young.status.value == "waiting" and s.waiting[0] is young and young.block_table == []
    held = len(young.output_ids)
    _run(s)
    assert elder.preemptions == 0 and young.preemptions == 1
    assert young.output_ids[:held] == [100 + n for n in range(7, 7 + held)]  # kept; the rest follow on
    assert young.output_ids == [100 + n for n in range(7, 15)] and young.finish_reason == "length"
    assert young.cached_tokens == 0  # what its first admission found, not what the recompute reused
    assert _all_free(s)


def test_flush_forgets_every_prefix_and_a_running_sequence_keeps_its_blocks():
    s = _sched(budget=8)
    prompt = list(range(1, 10))
    _run(s, _seq(prompt))
    running = _seq(prompt)
    s.add(running)
    _step(s)
    assert running.cached_tokens == 8
    s.blocks.flush()
    assert len(s.blocks.index) == 0
    cold = _seq(prompt)
    s.add(cold)
    _step(s)
    assert cold.cached_tokens == 0
    _run(s)
    assert _all_free(s)


def test_no_prefix_cache_means_no_hits_and_score_only_sequences_never_hit():
    s = Scheduler(BlockManager(32, BS, prefix_cache=False), max_batch=4, max_batched_tokens=64)
    _run(s, _seq(list(range(1, 10))))
    again = _seq(list(range(1, 10)))
    _run(s, again)
    assert again.cached_tokens == 0 and s.blocks.index is None and _all_free(s)
    cached = _sched()
    _run(cached, _seq(list(range(1, 10))))
    scored = Sequence(list(range(1, 10)), SamplingParams(max_tokens=0), score_only=True, score_from=5)
    cached.add(scored)
    assert _step(cached)[1] == [9]
