"""Continuous batching: every step packs one decode token per running sequence plus prompt chunks of sequences
being prefilled into a single variable-length batch (no padding), as an inference server does. Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from detaudit.engine.block_manager import BlockManager
from detaudit.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many new tokens each contributes (1 for decode, a prompt chunk for prefill)."""

    seqs: list[Sequence]
    num_new: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_batch: int, max_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_batch = max_batch
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """Fill a token budget the way vLLM's scheduler does: one token per decoding sequence, then the next chunk of
        prompts still being prefilled, then newly admitted prompts (FIFO) while seats, budget and KV blocks allow.

        A prompt that does not fit the budget left over is split (chunked prefill), so where a prompt's chunks
        start depends on the load: stock attention computes such a prompt differently, batch-invariant attention
        must not. Score-only sequences (rescore) are never split. A newly admitted prompt starts past its cached
        prefix (BlockManager.cached_prefix). Blocks are given as sequences grow; when a running sequence needs one
        and none is free, the youngest running sequence is preempted (see _preempt).
        """
        seqs: list[Sequence] = []
        num_new: list[int] = []
        budget = self.max_batched_tokens
        for seq in sorted(self.running, key=lambda s: len(s) - s.num_cached > 1):  # decodes first, stable
            if seq.status is not Status.RUNNING:  # preempted for an older sequence earlier in this loop
                continue
            n = min(len(seq) - seq.num_cached, budget)
            if n <= 0:
                continue
            while not self.blocks.grow(seq, seq.num_cached + n):
                victim = self.running[-1]
                self._preempt(victim)
                for i, s in enumerate(seqs):
                    if s is victim:
                        budget += num_new.pop(i)
                        seqs.pop(i)
                        break
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                num_new.append(n)
                budget -= n
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            seq = self.waiting[0]
            hits = self.blocks.cached_prefix(seq)
            computed = len(hits) * self.blocks.block_size
            n = len(seq) - computed
            if seq.score_only and n > budget and seqs:
                break
            n = n if seq.score_only else min(n, budget)
            if not self.blocks.can_admit(hits, computed + n):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, hits)
            self.blocks.grow(seq, computed + n)
            if not seq.preemptions:
                seq.cached_tokens = computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        return ScheduledBatch(seqs, num_new) if seqs else None

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence's blocks back and queue it first, to be recomputed from its tokens (prompt and
        output so far) when blocks free up, as vLLM's recompute preemption does. Its blocks stay in the prefix
        cache until evicted, so the recompute often starts past most of them. With batch-invariant kernels the
        recomputed K/V and the tokens that follow are the bits it would have had without the interruption."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_cached = 0
        seq.preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish_step(self, batch: ScheduledBatch) -> list[Sequence]:
        """Advance the KV position of every sequence of the step; release and return the ones that finished."""
        done = []
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            seq.num_cached += n
            self.blocks.commit(seq)
            if seq.finish_reason is not None or (seq.score_only and seq.num_cached == len(seq)):
                done.append(seq)
        for seq in done:
            self._release(seq)
        return done

    def abort(self, seq: Sequence) -> None:
        """Drop a request (client went away) wherever it is."""
        if seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.status is Status.RUNNING:
            self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
