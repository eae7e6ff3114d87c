"""The prefix cache's index: which KV block holds which full block of tokens, and which unused ones to evict first.

A full block is named by a hash chained with its parent's (sha256 of the parent's hash and the block's token ids,
as vLLM does), so a hash stands for the whole prefix up to and including the block: equal hashes, equal prefixes,
equal K/V. Pure Python, no torch; the block manager owns the blocks and their reference counts.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator

_ROOT = b""  # the parent of a sequence's first block


def block_hashes(tokens: list[int], block_size: int, parent: bytes = _ROOT) -> Iterator[bytes]:
    """The chained hash of each full block of `tokens` (a trailing partial block has none), starting after
    `parent`."""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + array("i", tokens[start : start + block_size]).tobytes()).digest()
        yield parent


class PrefixIndex:
    """hash -> block for blocks whose K/V is complete, and an LRU of those no sequence uses any more (evictable)."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._unused: OrderedDict[int, None] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._block_of)

    @property
    def num_unused(self) -> int:
        return len(self._unused)

    def lookup(self, h: bytes) -> int | None:
        return self._block_of.get(h)

    def is_unused(self, block: int) -> bool:
        return block in self._unused

    def add(self, h: bytes, block: int) -> bool:
        """Name `block` by `h`; False (nothing changed) when another block already holds that prefix, as when two
        sequences with the same prompt computed it in the same step."""
        if h in self._block_of or block in self._hash_of:
            return False
        self._block_of[h], self._hash_of[block] = block, h
        return True

    def release(self, block: int) -> bool:
        """A block's last user let go: keep it as evictable, most recently used; False when it holds no prefix."""
        if block not in self._hash_of:
            return False
        self._unused[block] = None
        return True

    def reuse(self, block: int) -> None:
        """A sequence takes an unused cached block back."""
        del self._unused[block]

    def evict(self) -> int:
        """Forget the least recently used unused block and return it for reuse."""
        block, _ = self._unused.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def clear(self) -> list[int]:
        """Forget every prefix; returns the unused blocks, now plain free blocks (blocks in use keep their users)."""
        unused = list(self._unused)
        self._block_of.clear()
        self._hash_of.clear()
        self._unused.clear()
        return unused
