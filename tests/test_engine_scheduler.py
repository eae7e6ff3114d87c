"""Scheduler and block manager: pure Python, no model."""

from __future__ import annotations

import pytest

from detaudit.engine.block_manager import BlockManager
from detaudit.engine.scheduler import Scheduler
from detaudit.engine.sequence import SamplingParams, Sequence


def _seq(n_prompt: int, max_tokens: int = 4, **kw) -> Sequence:
    return Sequence(list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), **kw)


def _sched(num_blocks=64, block_size=4, max_batch=4, budget=16, prefix_cache=False) -> Scheduler:
    blocks = BlockManager(num_blocks, block_size, prefix_cache=prefix_cache)
    return Scheduler(blocks, max_batch=max_batch, max_batched_tokens=budget)


def _finish_step(s: Scheduler, batch) -> list[Sequence]:
    """Stand-in for the model: every sequence whose prompt is complete gets token 7."""
    for seq, n in zip(batch.seqs, batch.num_new, strict=True):
        if not seq.score_only and seq.num_cached + n == len(seq):
            seq.append(7, -1.0, [], [], eos_ids=set())
    return s.finish_step(batch)


def test_decodes_first_then_chunked_prefill_within_budget():
    s = _sched(budget=10)
    a, b = _seq(6), _seq(9)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert [x.seq_id for x in batch.seqs] == [a.seq_id, b.seq_id]
    assert batch.num_new == [6, 4]  # b's prompt is cut at the budget
    _finish_step(s, batch)
    assert len(a.output_ids) == 1 and b.output_ids == []  # a middle chunk samples nothing
    batch = s.schedule()
    assert batch.num_new == [1, 5]  # a decodes, b finishes its prompt
    _finish_step(s, batch)
    assert b.num_cached == 9 and len(b.output_ids) == 1


def test_blocks_are_given_as_sequences_grow_and_max_batch_limits_admission():
    s = _sched(num_blocks=8, block_size=4, max_batch=2, budget=100)
    seqs = [_seq(4, max_tokens=4) for _ in range(3)]
    for q in seqs:
        s.add(q)
    batch = s.schedule()
    assert len(batch.seqs) == 2 and s.blocks.num_free == 6  # one block each for the 4-token prompts, no more
    _finish_step(s, batch)
    _finish_step(s, s.schedule())  # the fifth token needs a second block
    assert [len(q.block_table) for q in seqs[:2]] == [2, 2] and s.blocks.num_free == 4
    while seqs[0].finish_reason is None:
        _finish_step(s, s.schedule())
    assert seqs[0].finish_reason == "length" and len(seqs[0].output_ids) == 4
    assert seqs[2] in s.schedule().seqs  # admitted once a seat was freed


def test_score_only_is_never_split_and_abort_frees_blocks():
    s = _sched(budget=8)
    decoding = _seq(3)
    s.add(decoding)
    _finish_step(s, s.schedule())
    scored = _seq(12, score_only=True, score_from=5)
    s.add(scored)
    batch = s.schedule()
    assert scored not in batch.seqs  # 12 tokens do not fit the 7 left; it waits rather than split
    s.abort(scored)
    assert scored.finish_reason == "abort" and not s.waiting
    free = s.blocks.num_free
    s.abort(decoding)
    assert s.blocks.num_free > free and not s.running


@pytest.mark.parametrize("budget", [1, 3, 7])
def test_every_prompt_token_is_cached_exactly_once(budget):
    s = _sched(budget=budget, max_batch=3)
    seqs = [_seq(n, max_tokens=2) for n in (5, 1, 8, 2)]
    for q in seqs:
        s.add(q)
    steps = 0
    while s.has_work():
        batch = s.schedule()
        assert batch.num_tokens <= budget
        _finish_step(s, batch)
        steps += 1
        assert steps < 100
    assert all(q.finish_reason == "length" and q.num_cached == len(q) - 1 for q in seqs)
    assert s.blocks.num_free == s.blocks.num_blocks


def test_scheduler_block_manager_and_load_import_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, detaudit.engine.scheduler, detaudit.engine.block_manager, detaudit.audit.workload; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
