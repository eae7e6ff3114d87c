"""The paged KV cache: per layer K and V in fixed-size blocks, and where a sequence's tokens sit in it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
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

    def block_tables(self, tables: list[list[int]], rows: int) -> torch.Tensor:
        """Attention's block tables on the host: int32 [rows, max_blocks_per_seq], row i sequence i's blocks padded
        with block 0; rows past the sequences (a graph-replayed step's padding) hold only the dummy block. Built every
        step, so through numpy from one flat run of ints: torch.tensor of the nested lists (128 x 64 Python ints)
        takes ~0.7 ms of host time, this ~50 us."""
        out = np.zeros((rows, self.max_blocks_per_seq), dtype=np.int32)
        out[len(tables) :, 0] = self.dummy_block
        lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))
        out[: len(tables)][np.arange(self.max_blocks_per_seq) < lengths[:, None]] = flat
        return torch.from_numpy(out)


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
