"""Grouped expert GEMMs for Mixture-of-Experts on CUDA (Triton): tokens sorted per expert, one tile per program.

The (token, slot) pairs of a step are sorted by expert (stably) and each expert's run is padded to a multiple of
BLOCK_M, as vLLM's ``moe_align_block_size`` does; program (m, n[, s]) owns the BLOCK_M pair rows of one expert and
BLOCK_N output columns. Everything is computed on the device from the routing (scatter-add counts, cumulative sums,
``searchsorted``): the grid is sized from the step's token count alone (``cdiv(T * k, BLOCK_M) + E`` blocks; the
unused ones exit), so nothing is read back to the host and the launch can sit inside a CUDA graph.

Batch-invariant (:data:`BI`): one config whatever the load, every tile walks all of K in BLOCK_K steps with fp32
accumulation (IEEE for fp32 inputs) and stores once; a pair row's result depends on its own row and its expert's
weights only, never on which rows share its tile or how many tiles its expert has. Padding rows are masked loads
that are never stored. Stock (:func:`stock_config`): the tile and a split-K factor chosen from the expected tokens
per expert (``T * k / E``), as fused-MoE configs are picked by M; split-K partial products are stored in the output
dtype and added up afterwards (as split-K's atomic adds into the output do), so a token's bits change with the load.

Import this module only when a GPU or ``TRITON_INTERPRET=1`` is present: kernels are decorated at import time.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class MoeConfig(NamedTuple):
    """BLOCK_M (pair rows per tile, the padding unit of each expert's run), BLOCK_N, BLOCK_K, split-K factor,
    num_warps, num_stages."""

    bm: int
    bn: int
    bk: int
    split_k: int
    warps: int
    stages: int


# One config for every load: 64-row tiles (Hopper's wgmma height) over 128 columns; a decode step's experts see a
# few tokens each, so most rows are padding, but a decode MoE layer is bound by reading the experts' weights.
BI = MoeConfig(64, 128, 64, 1, 4, 3)
_INTERP = MoeConfig(16, 32, 32, 1, 4, 1)


def stock_config(num_tokens: int, top_k: int, num_experts: int, k_dim: int) -> MoeConfig:
    """The stock tiling for a step of ``num_tokens`` tokens: small tiles and split-K when experts see few tokens."""
    per_expert = num_tokens * top_k / num_experts
    if INTERPRET:
        return _INTERP._replace(split_k=2 if per_expert <= 4 else 1)
    if per_expert <= 4:
        return MoeConfig(16, 64, 64, 4 if k_dim >= 1024 else 2, 4, 4)
    if per_expert <= 16:
        return MoeConfig(16, 128, 64, 2, 4, 4)
    if per_expert <= 64:
        return MoeConfig(32, 128, 64, 1, 4, 4)
    return MoeConfig(64, 128, 64, 1, 4, 3)


@triton.jit
def _moe_grouped_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_pairs,
    N,
    K,
    top_k,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_os,
    stride_om,
    GATHER_TOKENS: tl.constexpr,
    IEEE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[s, pair, n] = sum over this split's K of A[row(pair), k] * W[expert, n, k]; row(pair) is the pair's token
    (GATHER_TOKENS) or the pair itself."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + offs_m)
    valid = pairs < num_pairs
    pairs = tl.where(valid, pairs, 0)
    if GATHER_TOKENS:
        rows = pairs // top_k
    else:
        rows = pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k0 = pid_s * k_per
    k_end = tl.minimum(K, k0 + k_per)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + (k0 + offs_k)[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k0, k_end, BLOCK_K):
        k_ok = (k + offs_k) < k_end
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + pid_s * stride_os + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair index of each padded row [blocks * BLOCK_M], sentinel ``T*k`` in padding; expert of each block, -1 past
    the last): the pairs sorted stably by expert, each expert's run padded to a multiple of ``block_m``. Device ops
    only; the sizes depend on ``ids.shape`` and ``num_experts`` alone."""
    flat = ids.reshape(-1)
    pairs = flat.numel()
    blocks = triton.cdiv(pairs, block_m) + num_experts
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(counts, 0) - counts  # first sorted pair of each expert
    pstart = torch.cumsum(padded, 0) - padded  # first padded row of each expert
    sorted_expert = flat[order]
    rank = torch.arange(pairs, device=ids.device) - start[sorted_expert]
    sorted_pairs = torch.full((blocks * block_m,), pairs, dtype=torch.int64, device=ids.device)
    sorted_pairs[pstart[sorted_expert] + rank] = order
    block_start = torch.arange(blocks, device=ids.device) * block_m
    block_expert = torch.searchsorted(torch.cumsum(padded, 0), block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_pairs, block_expert.to(torch.int32)


def grouped_mm(
    a: torch.Tensor,
    w: torch.Tensor,
    ids: torch.Tensor,
    cfg: MoeConfig,
    layout: tuple[torch.Tensor, torch.Tensor],
    *,
    gather_tokens: bool,
) -> torch.Tensor:
    """[T*k, N]: for each (token, slot) pair p, ``A[row] @ w[ids.flat[p]].T`` with row = p's token (gather_tokens,
    ``a`` [T, K]) or p itself (``a`` [T*k, K]). ``w``: [E, N, K]; ``layout``: :func:`align` of ``ids`` for
    ``cfg.bm``."""
    n, k_dim = w.shape[1], w.shape[2]
    top_k = ids.shape[1]
    pairs = ids.numel()
    sorted_pairs, block_expert = layout
    a = a.contiguous()
    split = cfg.split_k
    out = torch.empty((split, pairs, n), device=a.device, dtype=a.dtype)
    grid = (block_expert.shape[0], triton.cdiv(n, cfg.bn), split)
    _moe_grouped_kernel[grid](
        a,
        w,
        out,
        sorted_pairs,
        block_expert,
        pairs,
        n,
        k_dim,
        top_k,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        GATHER_TOKENS=gather_tokens,
        IEEE=a.dtype == torch.float32,
        SPLIT_K=split,
        BLOCK_M=cfg.bm,
        BLOCK_N=cfg.bn,
        BLOCK_K=cfg.bk,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    if split == 1:
        return out[0]
    from detaudit.kernels.moe import sum_in_order

    return sum_in_order(list(out.unbind(0)))


@triton.jit
def _moe_route_kernel(
    x_ptr,
    w_ptr,
    ids_ptr,
    weights_ptr,
    T,
    E,
    H,
    stride_x,
    stride_w,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """ids/weights [T, TOP_K] of BLOCK_T tokens: logits over all experts with fp32 accumulation (one tile, H walked
    in BLOCK_H steps), softmax in fp32, top-k by repeated arg-max (ties: the lowest expert index, as a stable
    descending sort), the k weights summed left to right to renormalise."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_h = tl.arange(0, BLOCK_H)
    t_ok = offs_t < T
    e_ok = offs_e < E
    x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x + offs_h[None, :]
    w_ptrs = w_ptr + offs_e[None, :] * stride_w + offs_h[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h in range(0, H, BLOCK_H):
        h_ok = (h + offs_h) < H
        a = tl.load(x_ptrs, mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=h_ok[:, None] & e_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    logits = tl.where(e_ok[None, :], acc, float("-inf"))
    p = tl.exp(logits - tl.max(logits, 1)[:, None])
    probs = p / tl.sum(p, 1)[:, None]
    rest = tl.where(e_ok[None, :], probs, -1.0)
    offs_k = tl.arange(0, K_POW2)
    chosen = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int64)
    picked = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(rest, 1)
        idx = tl.min(tl.where(rest == best[:, None], offs_e[None, :], BLOCK_E), 1)
        rest = tl.where(offs_e[None, :] == idx[:, None], -2.0, rest)
        chosen = tl.where(offs_k[None, :] == j, idx.to(tl.int64)[:, None], chosen)
        picked = tl.where(offs_k[None, :] == j, best[:, None], picked)
        total = total + best  # from 0: the first add is exact, then left to right
    if RENORMALIZE:
        picked = picked / total[:, None]
    out = offs_t.to(tl.int64)[:, None] * TOP_K + offs_k[None, :]
    ok = t_ok[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(ids_ptr + out, chosen, mask=ok)
    tl.store(weights_ptr + out, picked, mask=ok)


def route(x: torch.Tensor, router_w: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch-invariant router in one launch: (expert ids [T, k] int64, fp32 weights [T, k]). A token's logits
    come from one fixed tile shape whatever T is, so its choice and weights never depend on the batch; the step's
    tokens are split over ``cdiv(T, 16)`` programs. One kernel instead of a cast, GEMM, softmax, sort, gather and
    k adds: a decode step's router is launch-bound."""
    t, h = x.shape
    e = router_w.shape[0]
    ids = torch.empty((t, top_k), dtype=torch.int64, device=x.device)
    weights = torch.empty((t, top_k), dtype=torch.float32, device=x.device)
    block_t, block_h = (16, 32) if INTERPRET else (16, 64)
    x = x.contiguous()
    router_w = router_w.contiguous()
    _moe_route_kernel[(triton.cdiv(t, block_t),)](
        x,
        router_w,
        ids,
        weights,
        t,
        e,
        h,
        x.stride(0),
        router_w.stride(0),
        TOP_K=top_k,
        K_POW2=triton.next_power_of_2(top_k),
        RENORMALIZE=renormalize,
        IEEE=x.dtype == torch.float32,
        BLOCK_T=block_t,
        BLOCK_E=max(16, triton.next_power_of_2(e)),
        BLOCK_H=block_h,
        num_warps=4,
    )
    return ids, weights


@triton.jit
def _moe_combine_kernel(y_ptr, w_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum over j = 0, 1, ... of w[t, j] * y[t, j] in fp32, in that order; one cast."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        w = tl.load(w_ptr + t * TOP_K + j)
        y = tl.load(y_ptr + (t * TOP_K + j) * H + offs, mask=ok, other=0.0)
        acc = acc + y.to(tl.float32) * w
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def combine(y: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[T, H]: the k expert outputs ``y`` [T, k, H] weighted by fp32 ``weights`` [T, k] and summed in fp32 in slot
    order, per token and column; one launch."""
    t, k, h = y.shape
    y = y.contiguous()
    weights = weights.float().contiguous()
    out = torch.empty((t, h), dtype=out_dtype, device=y.device)
    block_h = 256 if INTERPRET else 1024
    _moe_combine_kernel[(t, triton.cdiv(h, block_h))](y, weights, out, h, TOP_K=k, BLOCK_H=block_h, num_warps=4)
    return out


def experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    batch_invariant: bool,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """[T, k, H]: expert ``ids[t, j]``'s SwiGLU output for token t; w13 [E, 2I, H] (gate rows, then up rows), w2
    [E, H, I]. ``config`` replaces the batch-invariant path's fixed config (benchmarks time candidates with it)."""
    t, k = ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    if batch_invariant:
        cfg1 = cfg2 = config or (_INTERP if INTERPRET else BI)
    else:
        cfg1 = stock_config(t, k, num_experts, x.shape[1])
        cfg2 = stock_config(t, k, num_experts, inter)
    layout1 = align(ids, num_experts, cfg1.bm)
    layout2 = layout1 if cfg2.bm == cfg1.bm else align(ids, num_experts, cfg2.bm)  # one sort when the tiles agree
    h = grouped_mm(x, w13, ids, cfg1, layout1, gather_tokens=True)
    act = F.silu(h[:, :inter]) * h[:, inter:]
    return grouped_mm(act, w2, ids, cfg2, layout2, gather_tokens=False).view(t, k, -1)
