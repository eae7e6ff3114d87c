"""Paged, variable-length attention with a KV cache: batch-invariant (ours) or stock.

Stock on CUDA is what a serving engine runs: one fused paged-attention launch whose KV split count follows a
flash-decoding heuristic from the batch (so its bits depend on the batch, as FlashAttention / FlashInfer decode does
in vLLM and SGLang). Stock on CPU gathers each sequence's cache and calls SDPA per sequence; prefill rows that follow
K/V already in the cache (a cached prefix, an earlier chunk) attend to it and to themselves in two parts merged by
log-sum-exp, as servers' extend attention does, so a warm cache changes their bits.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from detaudit.kernels import cpu
from detaudit.kernels._dispatch import use_triton


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    batch_invariant: bool,
) -> torch.Tensor:
    """Causal attention of packed query tokens over a paged KV cache.

    q: [T, Hq, D], sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``. k_cache, v_cache:
    [num_blocks, block_size, Hkv, D], this step's K/V already written. block_tables: int32 [B, max_blocks].
    context_lens: int32 [B], tokens of sequence b in the cache including this step's. Query row j of sequence b sits
    at absolute position ``context_lens[b] - q_len_b + j`` and sees positions 0..that. Hq must be a multiple of Hkv.
    Returns [T, Hq, D] in q's dtype.

    ``batch_invariant=True``: fixed KV tiles from position 0, fp32 online softmax, one kernel for prefill and decode
    rows, so a token's output has the same bits in prefill, chunked prefill or decode, alone or in any batch (Triton
    on CUDA, a fixed-tile torch loop on CPU). ``batch_invariant=False``: the stock path — on CUDA the same Triton
    kernel with a split size chosen from the batch (:func:`stock_split`), on CPU SDPA per sequence (prefill rows past
    K/V already cached in two parts merged, as servers' extend attention does: :func:`_extend`).

    On CUDA neither path reads device values on the host, so both can be captured in a CUDA graph.
    """
    _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    if use_triton(q):
        from detaudit.kernels import triton_attention as ta

        if batch_invariant:
            return ta.paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
        split, split_launch = stock_split(
            q.shape[0],
            context_lens.shape[0],
            k_cache.shape[2],
            block_tables.shape[1] * k_cache.shape[1],
            ta.tile_size(q.dtype),
            _sm_count(q.device),
        )
        return ta.paged_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            cu_seqlens_q,
            context_lens,
            scale,
            split_launch=split_launch,
            schedule=ta.uniform(split),
        )
    if not batch_invariant:
        return _stock(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
    return cpu.paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


def num_splits(programs: int, sm_count: int, n_blocks: int, max_splits: int = 128) -> int:
    """FlashAttention-2's ``num_splits_heuristic``: how many KV splits fill the GPU when ``programs`` (sequences x
    KV heads x q-blocks) alone would not. No split once the batch nearly fills the SMs; otherwise the fewest splits
    whose wave efficiency is within 85% of the best, skipping split counts that give the same blocks per split."""
    if programs >= 0.8 * sm_count:
        return 1
    max_splits = min(max_splits, sm_count, n_blocks)

    def eligible(s: int) -> bool:
        return s == 1 or -(-n_blocks // s) != -(-n_blocks // (s - 1))

    eff: dict[int, float] = {}
    for s in range(1, max_splits + 1):
        if eligible(s):
            waves = programs * s / sm_count
            eff[s] = waves / -(-waves // 1)
    best = max(eff.values(), default=0.0)
    return next((s for s, e in eff.items() if e >= 0.85 * best), 1)


def stock_split(
    num_tokens: int, num_seqs: int, kv_heads: int, max_ctx: int, tile: int, sm_count: int
) -> tuple[int, bool]:
    """(split size in tokens, split launch?) for stock attention on CUDA.

    Only all-decode batches are split (as flash-decoding does; prefill rows give enough programs): the split count
    comes from :func:`num_splits` over sequences x KV heads and the context bound ``max_ctx`` (the block table's
    capacity, known on the host without a sync and the same at CUDA-graph capture and replay), so the reduction
    order of a sequence's keys depends on how many sequences share the step. Otherwise one split spans the context.
    """
    n_blocks = max(1, -(-max_ctx // tile))
    splits = num_splits(num_seqs * kv_heads, sm_count, n_blocks) if num_tokens == num_seqs else 1
    per_split = -(-n_blocks // splits)
    return per_split * tile, splits > 1


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"paged_attention: q {tuple(q.shape)} must be [T,Hq,D] and k/v caches equal "
            f"[blocks,block_size,Hkv,D], got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
        )
    if q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(
            f"paged_attention: head dims or GQA ratio mismatch: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}"
        )
    b = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != b + 1 or block_tables.shape[0] != b:
        raise ValueError("paged_attention: cu_seqlens_q must have B+1 entries and block_tables B rows")


def _stock(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """What an engine does with stock kernels: gather each sequence's cache and run SDPA on it."""
    hq, d = q.shape[1], q.shape[2]
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    ctxs = context_lens.tolist()
    for b, ctx in enumerate(ctxs):
        q0, q1 = cu[b], cu[b + 1]
        ql = q1 - q0
        if ql == 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        blocks = block_tables[b].to(device=q.device, dtype=torch.long)[pos // page]
        k = k_cache[blocks, pos % page].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
        v = v_cache[blocks, pos % page].transpose(0, 1)[None]
        qs = q[q0:q1].transpose(0, 1)[None]  # [1, Hq, ql, D]
        if hkv != hq:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        if ql == 1:
            o = F.scaled_dot_product_attention(qs, k, v, scale=scale)
        elif ql == ctx:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale)
        else:
            o = _extend(qs, k, v, ctx - ql, scale)
        out[q0:q1] = o[0].transpose(0, 1).reshape(ql, hq, d)
    return out


def _extend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """Prefill rows that follow `prefix` tokens already in the cache (a cached prefix or an earlier chunk), as
    servers' extend attention computes them (SGLang's FlashInfer backend; vLLM's cascade attention): the new tokens
    causally among themselves, the earlier K/V apart, each part writing its output in the model's dtype and its
    log-sum-exp in fp32, then the two merged by their log-sum-exps. The same rows computed with no cached prefix
    are one causal pass, so their bits depend on what the cache held: the cold/warm divergence users report."""
    o_old, lse_old = _attend(q, k[:, :, :prefix], v[:, :, :prefix], scale, causal=False)
    o_new, lse_new = _attend(q, k[:, :, prefix:], v[:, :, prefix:], scale, causal=True)
    top = torch.maximum(lse_old, lse_new)
    w_old, w_new = torch.exp(lse_old - top), torch.exp(lse_new - top)
    merged = (o_old.to(top.dtype) * w_old + o_new.to(top.dtype) * w_new) / (w_old + w_new)
    return merged.to(q.dtype)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One part of :func:`_extend`: its output in q's dtype and its log-sum-exp [..., rows, 1] in fp32 (or wider)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if causal:
        rows, cols = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(rows, cols, dtype=torch.bool, device=q.device).triu(1), -torch.inf)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return (torch.exp(scores - lse) @ v.to(acc)).to(q.dtype), lse
