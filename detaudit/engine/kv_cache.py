"""The paged KV cache: per layer K and V in fixed-size blocks, and where a sequence's tokens sit in it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from detaudit.engine.config import ModelSpec
from detaudit.errors import UsageError


@dataclass(frozen=True)
class KVCache:
    """Per layer (K, V), each [num_blocks + 1, block_size, Hkv, D]: the block manager's blocks and one dummy block
    past them, which no sequence is ever given: padding rows of graph-replayed steps write and read only it."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    block_size: int
    max_blocks_per_seq: int  # the width of attention's block tables
    dummy_block: int

    @property
    def dummy_slot(self) -> int:
        return self.dummy_block * self.block_size

    def slot(self, block_table: list[int], position: int) -> int:
        """The flat cache slot of the token at `position` of a sequence with this block table."""
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def table_row(self, block_table: list[int]) -> list[int]:
        """A sequence's block table padded with block 0 to the block tables' width."""
        return block_table + [0] * (self.max_blocks_per_seq - len(block_table))


def allocate_kv_cache(
    spec: ModelSpec, *, num_blocks: int, block_size: int, max_blocks_per_seq: int, device: str, dtype: torch.dtype
) -> KVCache:
    """Zeroed K and V for every layer, or a UsageError naming the options to lower when they do not fit."""
    shape = (num_blocks + 1, block_size, spec.num_kv_heads, spec.head_dim)
    try:
        layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(spec.num_layers)
        ]
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; on CPU only the message tells
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        raise UsageError(
            f"the KV cache ({num_blocks} blocks of {block_size} tokens per layer) does not fit in {device} memory; "
            "lower --max-batch or --max-model-len"
        ) from None
    return KVCache(layers, block_size, max_blocks_per_seq, dummy_block=num_blocks)
