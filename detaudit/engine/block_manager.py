"""Paged KV-cache bookkeeping: fixed-size blocks handed out from a free list. Pure Python, no torch.

A sequence reserves every block it can ever need (prompt + max_tokens) when it is admitted, so a running sequence
never waits for memory and is never preempted: the batch a token is computed in depends only on arrivals.
"""

from __future__ import annotations

from collections import deque

from detaudit.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    def blocks_needed(self, seq: Sequence) -> int:
        return -(-seq.max_len // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, "sequence already holds blocks"
        seq.block_table = [self._free.popleft() for _ in range(self.blocks_needed(seq))]

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
