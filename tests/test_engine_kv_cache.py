"""detaudit.engine.kv_cache: where a sequence's tokens sit, and the block tables attention reads every step."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detaudit.engine.kv_cache import KVCache

WIDTH, DUMMY = 6, 40


def _cache() -> KVCache:
    return KVCache(layers=[], block_size=4, max_blocks_per_seq=WIDTH, dummy_block=DUMMY)


@settings(max_examples=200, deadline=None)
@given(
    tables=st.lists(st.lists(st.integers(0, DUMMY - 1), max_size=WIDTH), max_size=9),
    pad=st.integers(0, 4),
)
def test_block_tables_rows_are_each_sequences_blocks_then_zeros_and_padding_rows_the_dummy_block(
    tables: list[list[int]], pad: int
) -> None:
    got = _cache().block_tables(tables, len(tables) + pad)
    want = [t + [0] * (WIDTH - len(t)) for t in tables] + [[DUMMY] + [0] * (WIDTH - 1)] * pad
    assert got.dtype == torch.int32 and got.shape == (len(tables) + pad, WIDTH)
    assert got.tolist() == want


def test_slot_is_the_flat_position_in_the_sequences_blocks() -> None:
    cache = _cache()
    assert [cache.slot([7, 2], p) for p in (0, 3, 4, 7)] == [28, 31, 8, 11]
    assert cache.dummy_slot == DUMMY * 4
