"""Batch-invariant paged attention in Triton (one kernel for prefill, chunked prefill and decode rows).

Grid: (q-blocks, KV heads[, splits]). A q-block holds ``BLOCK_Q`` consecutive query tokens of one sequence times
the G query heads that share a KV head (row r -> token r // G, head r % G), ``BLOCK_M`` rows in all; both depend on
G and the dtype only. Keys/values are read from the paged cache in tiles of ``TILE`` absolute positions starting at
0 with an fp32 online softmax. Tiles past a row's own position are fully masked and are exact no-ops (alpha = 1,
p = 0), so a row's bits do not depend on which tokens share its q-block, how far the block walks, or what else is
in the batch.
Keys are grouped into splits fixed by absolute position (a :class:`Schedule`: up to three sizes, each over a fixed
range of positions), each reduced from scratch and merged in order; for all-decode batches with little parallelism
each split runs in its own program and a combine kernel merges them (flash-decoding with split sizes fixed in
tokens), which gives the same bits as the one-program launch. Short splits give short contexts at small batch
enough programs; longer ones keep long contexts from paying a partial per 256 keys. The schedule is chosen by the
device (tuned per GPU, benchmarks/RESULTS.md), never by the batch.

Import this module only when a GPU or ``TRITON_INTERPRET=1`` is present: kernels are decorated at import time.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from detaudit.kernels._dispatch import arch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class Schedule(NamedTuple):
    """Splits of absolute key positions: ``short`` positions each below ``short_end``, ``mid`` each from there below
    ``mid_end``, ``long`` each from there on. Sizes are multiples of the dtype's tile; ``short_end`` is a multiple
    of ``short`` and ``mid_end - short_end`` of ``mid``."""

    short: int
    short_end: int
    mid: int
    mid_end: int
    long: int


def uniform(split: int) -> Schedule:
    """Every split ``split`` positions long (the stock path's, and the benchmarks' reference)."""
    return Schedule(split, 0, split, 0, split)


# Per GPU kind (benchmarks/RESULTS.md, "Attention decode" and "H200"): on the H100, 256-position splits below 1024
# and 512 from there on (benchmarks/kernel_tuning_decode.py). On the H200 the same schedule measured best of ten
# fixed-by-position schedules (benchmarks/h200/tuning_attention_schedules.json: geomean 0.988 of flash, against
# 0.979 for a three-size one that adds 1024-position splits from 8192 on, which loses at batch 1 to wave tails).
SCHEDULES = {"h100": Schedule(256, 1024, 512, 1024, 512), "h200": Schedule(256, 1024, 512, 1024, 512)}
# Pipeline depth of the split launch's KV loads (H100: 3 beat 2 by up to 0.06 of flash).
SPLIT_STAGES = {"h100": 3, "h200": 3}
# (device, dtype) -> did the split launch reproduce the one-program launch bitwise on this device?
_split_ok: dict[tuple[str, torch.dtype], bool] = {}


@triton.jit
def _merge(m, lsum, acc, m_s, l_s, acc_s):
    """Fold one split's partial softmax state into the running one (exact no-op for a fully masked split)."""
    m_new = tl.maximum(m, m_s)
    a = tl.where(m == m_new, 1.0, tl.exp2(m - m_new))
    b = tl.where(m_s == m_new, 1.0, tl.exp2(m_s - m_new))
    return m_new, lsum * a + l_s * b, acc * a[:, None] + acc_s * b[:, None]


@triton.jit
def _split_start(s, S0: tl.constexpr, N0: tl.constexpr, S1: tl.constexpr, N1: tl.constexpr, S2: tl.constexpr):
    """First absolute position of split s: N0 splits of S0 positions, N1 of S1, then splits of S2. Arithmetic, not a
    select: with tl.where here the H100 kernel ran 10-25 % slower (benchmarks/RESULTS.md)."""
    return s * S0 + tl.maximum(s - N0, 0) * (S1 - S0) + tl.maximum(s - N0 - N1, 0) * (S2 - S1)


@triton.jit
def _split_count(pos, S0: tl.constexpr, N0: tl.constexpr, S1: tl.constexpr, N1: tl.constexpr, S2: tl.constexpr):
    """Number of splits that hold positions 0..pos (never a negative division: Triton's truncates)."""
    return (
        tl.minimum(pos // S0 + 1, N0)
        + tl.minimum((tl.maximum(pos - N0 * S0, -1) + S1) // S1, N1)
        + (tl.maximum(pos - N0 * S0 - N1 * S1, -1) + S2) // S2
    )


@triton.jit
def _attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    bt_ptr,
    cu_ptr,
    ctx_ptr,
    ws_m_ptr,
    ws_l_ptr,
    ws_acc_ptr,
    sq_t,
    sq_h,
    sk_b,
    sk_s,
    sk_h,
    sv_b,
    sv_s,
    sv_h,
    so_t,
    so_h,
    sbt,
    num_seqs,
    scale_log2,
    D,
    HQ,
    NS,
    G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    S0: tl.constexpr,
    N0: tl.constexpr,
    S1: tl.constexpr,
    N1: tl.constexpr,
    S2: tl.constexpr,
    PAGE: tl.constexpr,
    SPLIT_LAUNCH: tl.constexpr,
    CAST_F32: tl.constexpr,
    IEEE: tl.constexpr,
):
    qb = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    if SPLIT_LAUNCH:
        # All-decode batch: program b serves sequence b's single query token b.
        b = qb
        seq_q0 = b
        seq_q1 = b + 1
        q_start = b
    else:
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
    ctx = tl.load(ctx_ptr + b)
    q_len = seq_q1 - seq_q0
    last = tl.minimum(q_start + BLOCK_Q, seq_q1) - 1
    max_pos = ctx - q_len + (last - seq_q0)
    n_tiles = max_pos // TILE + 1
    if SPLIT_LAUNCH:
        s_lo = tl.program_id(2)
        s_hi = s_lo + 1
    else:
        s_lo = 0
        s_hi = _split_count(max_pos, S0, N0, S1, N1, S2)
    if (q_start < seq_q1) & (_split_start(s_lo, S0, N0, S1, N1, S2) <= max_pos):
        rows = tl.arange(0, BLOCK_M)
        tok = rows // G
        head = kvh * G + rows % G
        q_idx = q_start + tok
        row_ok = (tok < BLOCK_Q) & (q_idx < seq_q1)
        pos = tl.where(row_ok, ctx - q_len + (q_idx - seq_q0), 0)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(
            q_ptr + q_idx.to(tl.int64)[:, None] * sq_t + head[:, None] * sq_h + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if CAST_F32:
            q = q.to(tl.float32)
        m = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
        lsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for sp in range(s_lo, s_hi):
            # Each split of absolute positions starts a fresh online softmax; splits merge in order.
            m_s = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
            l_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc_s = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            t0 = _split_start(sp, S0, N0, S1, N1, S2) // TILE
            t1 = tl.minimum(_split_start(sp + 1, S0, N0, S1, N1, S2) // TILE, n_tiles)
            for t in range(t0, t1):
                kpos = t * TILE + tl.arange(0, TILE)
                k_ok = kpos < ctx
                if PAGE >= TILE:
                    # The whole tile sits in one page: one block-table read, a strided block of K and V.
                    page = tl.load(bt_ptr + b.to(tl.int64) * sbt + (t * TILE) // PAGE).to(tl.int64)
                    slot = ((t * TILE) % PAGE + tl.arange(0, TILE)).to(tl.int64)
                    kt = tl.load(
                        k_ptr + page * sk_b + kvh * sk_h + slot[None, :] * sk_s + offs_d[:, None],
                        mask=k_ok[None, :] & d_ok[:, None],
                        other=0.0,
                    )
                    v = tl.load(
                        v_ptr + page * sv_b + kvh * sv_h + slot[:, None] * sv_s + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                else:
                    page = tl.load(bt_ptr + b.to(tl.int64) * sbt + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)
                    slot = (kpos % PAGE).to(tl.int64)
                    kt = tl.load(
                        k_ptr + (page * sk_b + slot * sk_s)[None, :] + kvh * sk_h + offs_d[:, None],
                        mask=k_ok[None, :] & d_ok[:, None],
                        other=0.0,
                    )
                    v = tl.load(
                        v_ptr + (page * sv_b + slot * sv_s)[:, None] + kvh * sv_h + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                if CAST_F32:
                    kt = kt.to(tl.float32)
                    v = v.to(tl.float32)
                if IEEE:
                    sc = tl.dot(q, kt, input_precision="ieee")
                else:
                    sc = tl.dot(q, kt)
                sc = sc * scale_log2
                visible = (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
                sc = tl.where(visible, sc, -float("inf"))
                m_new = tl.maximum(m_s, tl.max(sc, axis=1))
                p = tl.where(visible, tl.exp2(sc - m_new[:, None]), 0.0)
                alpha = tl.where(m_new == m_s, 1.0, tl.exp2(m_s - m_new))
                l_s = l_s * alpha + tl.sum(p, axis=1)
                if IEEE:
                    pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc_s = acc_s * alpha[:, None] + pv
                m_s = m_new
            if SPLIT_LAUNCH:
                m, lsum, acc = m_s, l_s, acc_s
            else:
                m, lsum, acc = _merge(m, lsum, acc, m_s, l_s, acc_s)
        mask = row_ok[:, None] & d_ok[None, :]
        if SPLIT_LAUNCH:
            ws = (q_idx.to(tl.int64) * HQ + head) * NS + s_lo
            tl.store(ws_m_ptr + ws, m, mask=row_ok)
            tl.store(ws_l_ptr + ws, lsum, mask=row_ok)
            tl.store(ws_acc_ptr + ws[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mask)
        else:
            out = acc / lsum[:, None]
            tl.store(
                o_ptr + q_idx.to(tl.int64)[:, None] * so_t + head[:, None] * so_h + offs_d[None, :],
                out.to(o_ptr.dtype.element_ty),
                mask=mask,
            )


@triton.jit
def _combine_kernel(
    o_ptr,
    ctx_ptr,
    ws_m_ptr,
    ws_l_ptr,
    ws_acc_ptr,
    so_t,
    so_h,
    D,
    HQ,
    NS,
    BLOCK_D: tl.constexpr,
    S0: tl.constexpr,
    N0: tl.constexpr,
    S1: tl.constexpr,
    N1: tl.constexpr,
    S2: tl.constexpr,
):
    # Decode launch only: token t is sequence t's single query, at position ctx[t] - 1.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n = _split_count(tl.load(ctx_ptr + t) - 1, S0, N0, S1, N1, S2)
    offs_d = tl.arange(0, BLOCK_D)
    zero = tl.zeros((1,), dtype=tl.int64)
    m = tl.full((1,), -float("inf"), dtype=tl.float32)
    lsum = tl.zeros((1,), dtype=tl.float32)
    acc = tl.zeros((1, BLOCK_D), dtype=tl.float32)
    base = (t * HQ + h) * NS
    for sp in range(0, n):
        m_s = tl.load(ws_m_ptr + base + sp + zero)
        l_s = tl.load(ws_l_ptr + base + sp + zero)
        acc_s = tl.load(ws_acc_ptr + (base + sp + zero)[:, None] * BLOCK_D + offs_d[None, :])
        m, lsum, acc = _merge(m, lsum, acc, m_s, l_s, acc_s)
    out = acc / lsum[:, None]
    tl.store(
        o_ptr + t * so_t + h * so_h + offs_d[None, :] + zero[:, None],
        out.to(o_ptr.dtype.element_ty),
        mask=(offs_d < D)[None, :],
    )


def tile_size(dtype: torch.dtype) -> int:
    """KV tile (absolute positions) per dtype: fixed, the same for prefill and decode."""
    return 32 if dtype == torch.float32 else 64


def block_m(g: int) -> int:
    """Rows per program: depends on the GQA ratio only."""
    return max(16 if INTERPRET else 64, triton.next_power_of_2(g))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    split_launch: bool | None = None,
    schedule: Schedule | None = None,
    stages: int | None = None,
    rows: int | None = None,
    warps: int = 4,
) -> torch.Tensor:
    """Launch the kernels; shapes as in :func:`detaudit.kernels.attention.paged_attention`.

    Keys are always reduced in splits of absolute positions merged in order, as ``schedule`` says (None: the
    device's, :data:`SCHEDULES`). ``split_launch`` only picks how that is scheduled: one program per (q-block, KV
    head) walking all splits, or, for all-decode batches with little parallelism, one program per split plus a
    combine kernel — the same arithmetic, so the same bits. Batch-invariant use keeps the device's schedule; the
    stock path in :mod:`detaudit.kernels.attention` picks a uniform split from the batch, as flash-decoding does.
    ``stages``, ``rows`` (query rows per program) and ``warps`` are for benchmarks: the launch shape, which must not
    change the bits.
    """
    t_total, hq, d = q.shape
    num_seqs = context_lens.shape[0]
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    out = torch.empty_like(q)
    if t_total == 0 or num_seqs == 0:
        return out
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_attention: last dims of q, k_cache and v_cache must be contiguous")
    tile = tile_size(q.dtype)
    sch = schedule or SCHEDULES[arch(q.device)]
    if (
        min(sch.short, sch.mid, sch.long) < 1
        or (sch.short | sch.mid | sch.long) % tile
        or sch.short_end % sch.short
        or sch.mid_end < sch.short_end
        or (sch.mid_end - sch.short_end) % sch.mid
    ):
        raise ValueError(
            f"paged_attention: bad split schedule {sch}: sizes must be positive multiples of {tile}, "
            "each range a whole number of its splits"
        )
    n0, n1 = sch.short_end // sch.short, (sch.mid_end - sch.short_end) // sch.mid
    bm = rows or block_m(g)
    bq = bm // g
    block_d = triton.next_power_of_2(d)
    cu = cu_seqlens_q.to(torch.int32).contiguous()
    ctx = context_lens.to(torch.int32).contiguous()
    bt = block_tables.to(torch.int32)
    max_ctx = bt.shape[1] * page  # upper bound on any context, known without a device sync
    n_split = split_count(max_ctx - 1, sch)
    if split_launch is None:
        split_launch = (
            t_total == num_seqs
            and n_split >= 2
            and num_seqs * hkv < 4 * _sm_count(q.device)
            and split_launch_agrees(q.device, q.dtype)
        )
    if split_launch and t_total != num_seqs:
        raise ValueError("paged_attention: the split launch serves all-decode batches (one query per sequence)")
    n_qblocks = t_total // bq + num_seqs
    if split_launch:
        ws_m = torch.empty((t_total, hq, n_split), dtype=torch.float32, device=q.device)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty((t_total, hq, n_split, block_d), dtype=torch.float32, device=q.device)
        grid: tuple[int, ...] = (num_seqs, hkv, n_split)
    else:
        ws_m = ws_l = ws_acc = out
        grid = (n_qblocks, hkv)
    splits = dict(S0=sch.short, N0=n0, S1=sch.mid, N1=n1, S2=sch.long)
    _attn_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        bt,
        cu,
        ctx,
        ws_m,
        ws_l,
        ws_acc,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        bt.stride(0),
        num_seqs,
        float(scale * math.log2(math.e)),
        d,
        hq,
        n_split,
        G=g,
        BLOCK_Q=bq,
        BLOCK_M=bm,
        BLOCK_D=block_d,
        TILE=tile,
        PAGE=page,
        **splits,
        SPLIT_LAUNCH=split_launch,
        CAST_F32=INTERPRET and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32,
        num_warps=warps,
        num_stages=stages or (SPLIT_STAGES[arch(q.device)] if split_launch else 2),
    )
    if split_launch:
        _combine_kernel[(t_total, hq)](
            out,
            ctx,
            ws_m,
            ws_l,
            ws_acc,
            out.stride(0),
            out.stride(1),
            d,
            hq,
            n_split,
            BLOCK_D=block_d,
            **splits,
            num_warps=1,
        )
    return out


def split_count(pos: int, sch: Schedule) -> int:
    """Number of splits holding positions 0..pos (the kernels' _split_count, on the host)."""
    n0, n1 = sch.short_end // sch.short, (sch.mid_end - sch.short_end) // sch.mid
    return (
        min(pos // sch.short + 1, n0)
        + min((max(pos - sch.short_end, -1) + sch.mid) // sch.mid, n1)
        + (max(pos - sch.mid_end, -1) + sch.long) // sch.long
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_launch_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per (device, dtype): do both launches give the same bits? If not, only the one-program launch is used."""
    key = (str(device), dtype)
    if key not in _split_ok:
        g = torch.Generator(device="cpu").manual_seed(3)
        sch = SCHEDULES[arch(device)]
        lens = [sch.mid_end + 2 * sch.long + 100, 600, 1]  # across every range of the device's schedule
        hkv, page = 2, 16
        n_pages = sum(-(-c // page) for c in lens)
        kc = torch.randn(n_pages, page, hkv, 64, generator=g, device="cpu").to(device, dtype)
        vc = torch.randn(n_pages, page, hkv, 64, generator=g, device="cpu").to(device, dtype)
        bt = torch.zeros(3, -(-max(lens) // page), dtype=torch.int32, device="cpu")
        start = 0
        for b, c in enumerate(lens):
            k = -(-c // page)
            bt[b, :k] = torch.arange(start, start + k, dtype=torch.int32, device="cpu")
            start += k
        q = torch.randn(3, 8, 64, generator=g, device="cpu").to(device, dtype)
        args = (
            q,
            kc,
            vc,
            bt.to(device),
            torch.arange(4, dtype=torch.int32, device=device),
            torch.tensor(lens, dtype=torch.int32, device=device),
            0.125,
        )
        _split_ok[key] = torch.equal(
            paged_attention(*args, split_launch=False), paged_attention(*args, split_launch=True)
        )
    return _split_ok[key]
