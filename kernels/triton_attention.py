"""Batch-invariant paged attention in Triton (one kernel for prefill, chunked prefill and decode rows).

Grid: (q-blocks, KV heads). A q-block holds ``BLOCK_Q`` consecutive query tokens of one sequence times the G query
heads that share a KV head (row r -> token r // G, head r % G), ``BLOCK_M`` rows in all; both depend on G and the
dtype only. Keys/values are read from the paged cache in tiles of ``TILE`` absolute positions starting at 0 with an
fp32 online softmax. Tiles past a row's own position are fully masked and are exact no-ops (alpha = 1, p = 0), so a
row's bits do not depend on which tokens share its q-block, how far the block walks, or what else is in the batch.

Import this module only when a GPU or ``TRITON_INTERPRET=1`` is present: kernels are decorated at import time.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cu_ptr, ctx_ptr,
                 sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_t, so_h, sbt,
                 num_seqs, scale_log2, D,
                 G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 TILE: tl.constexpr, PAGE: tl.constexpr, CAST_F32: tl.constexpr, IEEE: tl.constexpr):
    qb = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    # Sequence b owns global q-blocks [cu[b] // BLOCK_Q + b, cu[b + 1] // BLOCK_Q + b + 1): binary search.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start_mid = tl.load(cu_ptr + mid) // BLOCK_Q + mid
        if start_mid <= qb:
            lo = mid + 1
        else:
            hi = mid
    b = lo - 1
    seq_q0 = tl.load(cu_ptr + b)
    seq_q1 = tl.load(cu_ptr + b + 1)
    local = qb - (seq_q0 // BLOCK_Q + b)
    q_start = seq_q0 + local * BLOCK_Q
    if q_start < seq_q1:
        ctx = tl.load(ctx_ptr + b)
        q_len = seq_q1 - seq_q0
        rows = tl.arange(0, BLOCK_M)
        tok = rows // G
        head = kvh * G + rows % G
        q_idx = q_start + tok
        row_ok = (tok < BLOCK_Q) & (q_idx < seq_q1)
        pos = tl.where(row_ok, ctx - q_len + (q_idx - seq_q0), 0)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(q_ptr + q_idx.to(tl.int64)[:, None] * sq_t + head[:, None] * sq_h + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if CAST_F32:
            q = q.to(tl.float32)
        last = tl.minimum(q_start + BLOCK_Q, seq_q1) - 1
        max_pos = ctx - q_len + (last - seq_q0)
        m = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
        lsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for t in range(0, max_pos // TILE + 1):
            kpos = t * TILE + tl.arange(0, TILE)
            k_ok = kpos < ctx
            page = tl.load(bt_ptr + b.to(tl.int64) * sbt + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)
            slot = (kpos % PAGE).to(tl.int64)
            kt = tl.load(k_ptr + (page * sk_b + slot * sk_s)[None, :] + kvh * sk_h + offs_d[:, None],
                         mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptr + (page * sv_b + slot * sv_s)[:, None] + kvh * sv_h + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if CAST_F32:
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * scale_log2
            visible = (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
            s = tl.where(visible, s, -float("inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.where(visible, tl.exp2(s - m_new[:, None]), 0.0)
            alpha = tl.where(m_new == m, 1.0, tl.exp2(m - m_new))
            lsum = lsum * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / lsum[:, None]
        tl.store(o_ptr + q_idx.to(tl.int64)[:, None] * so_t + head[:, None] * so_h + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def tile_size(dtype: torch.dtype) -> int:
    """KV tile (absolute positions) per dtype: fixed, the same for prefill and decode."""
    return 32 if dtype == torch.float32 else 64


def block_m(g: int) -> int:
    """Rows per program: depends on the GQA ratio only."""
    return max(16 if INTERPRET else 64, triton.next_power_of_2(g))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Launch the kernel; shapes as in :func:`detaudit.kernels.attention.paged_attention`."""
    t_total, hq, d = q.shape
    num_seqs = context_lens.shape[0]
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    out = torch.empty_like(q)
    if t_total == 0 or num_seqs == 0:
        return out
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_attention: last dims of q, k_cache and v_cache must be contiguous")
    bm = block_m(g)
    bq = bm // g
    cu = cu_seqlens_q.to(torch.int32).contiguous()
    ctx = context_lens.to(torch.int32).contiguous()
    bt = block_tables.to(torch.int32)
    n_qblocks = t_total // bq + num_seqs
    grid = (n_qblocks, hkv)
    _attn_kernel[grid](
        q, k_cache, v_cache, out, bt, cu, ctx,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), bt.stride(0),
        num_seqs, float(scale * math.log2(math.e)), d,
        G=g, BLOCK_Q=bq, BLOCK_M=bm, BLOCK_D=triton.next_power_of_2(d), TILE=tile_size(q.dtype), PAGE=page,
        CAST_F32=INTERPRET and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    return out
