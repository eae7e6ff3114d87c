"""Stock attention on CUDA: the flash-decoding split heuristic, and (under TRITON_INTERPRET=1, small fp32 shapes) the
Triton kernel at the split sizes it picks — correct at every split, and batch-dependent, as a server's is.

The interpreter cases run in a subprocess started with the variable set (Triton reads it when it decorates the
kernels), as tests/test_kernels_triton_interp.py does.
"""

from __future__ import annotations

import pytest
import torch
from detaudit.kernels.attention import _stock, num_splits, stock_split
from interp import INTERPRETED, inner, run_file_under_interpreter

H100_SMS = 132


@pytest.mark.skipif(INTERPRETED, reason="outer test")
def test_num_splits_follows_flash_attention():
    assert num_splits(106, H100_SMS, 16) == 1  # >= 80% of the SMs busy: no split
    assert num_splits(8, H100_SMS, 16) == 16  # 8 programs: split the 16 key blocks as far as they go
    assert num_splits(32, H100_SMS, 16) == 4  # 128 of 132 SMs in one wave
    assert num_splits(8, H100_SMS, 64) == 16  # the fewest splits within 85% of the best wave efficiency
    assert num_splits(1, 4, 3) == 3 and num_splits(1, 1, 100) == 1
    # 7 splits of 16 blocks are 3 blocks each, the same as 6: never chosen over 6
    assert all(num_splits(p, H100_SMS, 16) not in (7, 9, 10, 11, 12, 13, 14, 15) for p in range(1, 200))


@pytest.mark.skipif(INTERPRETED, reason="outer test")
def test_stock_split_depends_on_the_batch_and_covers_the_context():
    picks = {n: stock_split(n, n, 8, 1024, 64, H100_SMS) for n in range(1, 129)}
    assert picks[1] == (64, True) and picks[4] == (256, True) and picks[14] == (1024, False)
    assert len({split for split, _ in picks.values()}) >= 5  # the reduction order changes with the batch size
    for split, launch in picks.values():
        assert split % 64 == 0 and launch == (split < 1024)
    assert stock_split(50, 4, 8, 1024, 64, H100_SMS) == (1024, False)  # prefill rows: one split over the context
    assert stock_split(1, 1, 1, 1000, 32, 4) == (256, True)  # 32 tiles of 32 in 4 splits


def test_under_interpreter():
    run_file_under_interpreter(__file__, passed=1)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


@inner
def test_stock_kernel_at_the_heuristics_splits():
    from detaudit.kernels import triton_attention as ta

    g = torch.Generator().manual_seed(5)
    hkv, gqa, d, page, tile = 2, 2, 16, 8, ta.tile_size(torch.float32)
    lens = [300, 77, 161, 5]
    width = -(-max(lens) // page)
    n_pages = len(lens) * width
    kc = torch.randn(n_pages, page, hkv, d, generator=g)
    vc = torch.randn(n_pages, page, hkv, d, generator=g)
    bt = torch.randperm(n_pages, generator=g).to(torch.int32).reshape(len(lens), width)
    q = torch.randn(len(lens), hkv * gqa, d, generator=g)
    ctx = torch.tensor(lens, dtype=torch.int32)
    max_ctx = width * page

    def stock(b: int, sms: int) -> tuple[torch.Tensor, int]:
        """The first b sequences decoding together, with the split the heuristic picks on a GPU of `sms` SMs."""
        split, launch = stock_split(b, b, hkv, max_ctx, tile, sms)
        cu = torch.arange(b + 1, dtype=torch.int32)
        out = ta.paged_attention(
            q[:b], kc, vc, bt[:b], cu, ctx[:b], 0.25, split_launch=launch, schedule=ta.uniform(split)
        )
        ref = _stock(q[:b].double(), kc.double(), vc.double(), bt[:b], cu, ctx[:b], 0.25)
        assert _rel(out, ref) < 1e-6, (b, sms, split)
        return out, split

    alone, split_alone = stock(1, 8)  # 2 programs on 8 SMs: the 10 tiles of 32 in 4 splits of 3 tiles
    batch, split_batch = stock(4, 8)  # 8 programs: one split over the whole context
    assert (split_alone, split_batch) == (3 * tile, 10 * tile)
    # The same sequence, alone or among others: its keys are reduced in another order, so other bits.
    assert not torch.equal(alone[0], batch[0])
    for b in (2, 3):
        stock(b, 8)


@pytest.mark.skipif(INTERPRETED, reason="CPU path")
def test_stock_cpu_prefill_past_cached_rows_merges_two_parts_as_servers_do():
    """Stock CPU attention of prefill rows that follow K/V already in the cache (a warm prefix, an earlier chunk):
    the same values as one causal pass, but not the same bits in bf16 — the cold/warm divergence of servers."""
    g = torch.Generator().manual_seed(3)
    hkv, gqa, d, page, ctx = 2, 2, 16, 8, 40
    kc = torch.randn(ctx // page, page, hkv, d, generator=g)
    vc = torch.randn(ctx // page, page, hkv, d, generator=g)
    q = torch.randn(ctx, hkv * gqa, d, generator=g)
    bt = torch.arange(ctx // page, dtype=torch.int32)[None]
    lens = torch.tensor([ctx], dtype=torch.int32)

    def attend(dtype: torch.dtype, rows: int) -> torch.Tensor:
        """The last `rows` query rows, computed in one step after ctx - rows tokens already cached."""
        cu = torch.tensor([0, rows], dtype=torch.int32)
        return _stock(q[-rows:].to(dtype), kc.to(dtype), vc.to(dtype), bt, cu, lens, 0.25)

    cold = attend(torch.float64, ctx)  # the whole prompt in one causal pass
    for cached in (8, 16, 33):
        warm = attend(torch.float64, ctx - cached)
        assert _rel(warm, cold[cached:]) < 1e-12, cached  # the same attention, merged by log-sum-exp
    cold_bf16 = attend(torch.bfloat16, ctx)
    warm_bf16 = attend(torch.bfloat16, ctx - 16)
    assert _rel(warm_bf16, cold[16:]) < 1e-2 and _rel(cold_bf16[16:], cold[16:]) < 1e-2
    assert not torch.equal(warm_bf16, cold_bf16[16:])  # each part rounded to bf16 before the merge
