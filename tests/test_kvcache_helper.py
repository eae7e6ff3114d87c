"""tests/kvcache.py builds the paged caches the attention-kernel tests (CPU and GPU) read: check its layout once."""

from __future__ import annotations

import torch
from kvcache import paged_kv_cache


def test_paged_kv_cache_layout() -> None:
    lens, page = [33, 1, 16], 16
    kc, vc, bt = paged_kv_cache(lens, 2, 4, page, torch.bfloat16, torch.Generator().manual_seed(0), spare_pages=3)
    assert kc.shape == vc.shape == (3 + 1 + 1 + 3, page, 2, 4) and kc.dtype == torch.bfloat16
    assert bt.shape == (3, 3) and bt.dtype == torch.int32
    owned = [bt[b, : -(-c // page)].tolist() for b, c in enumerate(lens)]
    flat = [p for pages in owned for p in pages]
    assert len(set(flat)) == len(flat) == 5 and kc.shape[0] - 1 not in flat  # each page owned once, NaN page never
    assert all(bt[b, len(pages) :].eq(kc.shape[0] - 1).all() for b, pages in enumerate(owned))  # padding: NaN page
    assert kc[-1].isnan().all() and vc[-1].isnan().all() and not kc[:-1].isnan().any()
    again = paged_kv_cache(lens, 2, 4, page, torch.bfloat16, torch.Generator().manual_seed(0), spare_pages=3)
    mine, theirs = (kc[:-1], vc[:-1], bt), (again[0][:-1], again[1][:-1], again[2])  # same generator seed
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
