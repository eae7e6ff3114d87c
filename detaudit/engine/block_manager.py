"""Paged KV-cache bookkeeping: fixed-size blocks, reference-counted, handed out as sequences grow. Pure Python.

With the prefix cache on, every full block of computed tokens is named in a PrefixIndex when its K/V is complete;
a sequence admitted later whose tokens start with the same full blocks shares those blocks (refcount + 1) instead
of computing them again. A block nobody uses but that holds a prefix stays in the index until a fresh block is
needed and no never-cached block is left: then the least recently used one is evicted.
"""

from __future__ import annotations

from collections import deque

from detaudit.engine.prefix_cache import PrefixIndex, block_hashes
from detaudit.engine.sequence import Sequence

Hit = tuple[int, bytes]  # a cached block and the hash that names it


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_cache: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # unused blocks that hold no prefix
        self._refs = [0] * num_blocks
        self.index = PrefixIndex() if prefix_cache else None

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given now: never-cached ones and unused cached ones (evicted on the way)."""
        return len(self._free) + (self.index.num_unused if self.index is not None else 0)

    def users(self, block: int) -> int:
        """How many sequences hold `block` (its reference count)."""
        return self._refs[block]

    def cached_prefix(self, seq: Sequence) -> list[Hit]:
        """The cached blocks of `seq`'s longest prefix of full blocks, stopping short of its last token: that one
        is always computed, for its logits. Nothing for score-only sequences (a rescore prefills everything)."""
        if self.index is None or seq.score_only:
            return []
        hits = []
        for h in block_hashes(seq.tokens[: (len(seq) - 1) // self.block_size * self.block_size], self.block_size):
            block = self.index.lookup(h)
            if block is None:
                break
            hits.append((block, h))
        return hits

    def can_admit(self, hits: list[Hit], num_tokens: int) -> bool:
        """Whether a waiting sequence with these cached blocks can hold its first `num_tokens` tokens."""
        reclaimed = sum(self.index.is_unused(b) for b, _ in hits) if self.index is not None else 0
        return self.blocks_for(num_tokens) - len(hits) <= self.num_free - reclaimed

    def admit(self, seq: Sequence, hits: list[Hit]) -> None:
        """Give a waiting sequence its cached blocks; its K/V then starts past them."""
        assert not seq.block_table, "sequence already holds blocks"
        for block, h in hits:
            if self._refs[block] == 0:
                assert self.index is not None
                self.index.reuse(block)
            self._refs[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        seq.num_cached = len(hits) * self.block_size

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks enough for `num_tokens` tokens; False (nothing given) when too few are free."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:  # most decode steps: the last block still has room
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            if self._free:
                block = self._free.popleft()
            else:
                assert self.index is not None
                block = self.index.evict()
            self._refs[block] = 1
            seq.block_table.append(block)
        return True

    def commit(self, seq: Sequence) -> None:
        """Name the blocks of `seq` that its latest step filled (their K/V is now complete) in the index."""
        if self.index is None:
            return
        done, full = len(seq.block_hashes), seq.num_cached // self.block_size
        if full <= done:
            return
        parent = seq.block_hashes[-1] if done else b""
        tokens = seq.tokens[done * self.block_size : full * self.block_size]
        for i, h in enumerate(block_hashes(tokens, self.block_size, parent), start=done):
            seq.block_hashes.append(h)
            self.index.add(h, seq.block_table[i])

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references, last block first, so that a prompt's tail is evicted before its head."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0 and (self.index is None or not self.index.release(block)):
                self._free.append(block)
        seq.block_table, seq.block_hashes = [], []

    def flush(self) -> None:
        """Forget every cached prefix (blocks in use stay with their sequences): the next requests start cold."""
        if self.index is not None:
            self._free.extend(self.index.clear())
