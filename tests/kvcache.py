"""A paged KV cache for attention-kernel tests, shared by tests/test_kernels.py and tests/gpu/test_kernels_gpu.py.

The pages of each sequence are scattered in random order (as the engine's block manager leaves them), and the
last page, which every padding entry of the block table points at, is NaN: a kernel that reads past a sequence's
context, or reads padding, turns its output into NaN.
"""

from __future__ import annotations

import torch


def paged_kv_cache(
    lens: list[int],
    hkv: int,
    d: int,
    page: int,
    dtype: torch.dtype,
    g: torch.Generator,
    *,
    device: str = "cpu",
    spare_pages: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, block_table) on `device` for sequences of `lens` tokens: caches [pages, page, hkv, d],
    table [len(lens), max pages] int32. `spare_pages` pages beyond the owned ones, the NaN page last among them."""
    n_pages = sum(-(-c // page) for c in lens) + spare_pages
    kc = torch.randn(n_pages, page, hkv, d, generator=g).to(device, dtype)
    vc = torch.randn(n_pages, page, hkv, d, generator=g).to(device, dtype)
    kc[-1] = float("nan")  # a page no sequence owns, referenced by the table's padding: never read
    vc[-1] = float("nan")
    perm = torch.randperm(n_pages - 1, generator=g)
    bt = torch.full((len(lens), -(-max(lens) // page)), n_pages - 1, dtype=torch.int32)
    i = 0
    for b, c in enumerate(lens):
        for j in range(-(-c // page)):
            bt[b, j] = perm[i]
            i += 1
    return kc, vc, bt.to(device)
