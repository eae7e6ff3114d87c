"""Mixture-of-Experts feed-forward (router, top-k, expert SwiGLU MLPs, weighted combine): batch-invariant or stock.

An MoE layer adds batch dependence a dense MLP does not have: how many tokens choose an expert depends on the whole
batch, and servers tile each expert's grouped GEMM (and split its K) by that count; router logits computed in bf16
can flip a top-k choice on a near-tie; and the top-k outputs are summed in the model dtype.

``moe`` is registered as the custom op ``detaudit::moe`` and switches itself with ``batch_invariant()`` (it reads
:func:`detaudit.kernels.is_enabled`), so it shows in :func:`detaudit.kernels.coverage` as one op: protected inside
a block, unprotected (order-sensitive) outside.

Batch-invariant path: router logits and softmax in fp32 (row-wise, our fixed-order kernels); top-k by a stable
descending sort, so on a tie the lowest expert index wins; each expert's two GEMMs on fixed tiles that walk all of K
in one order (no split-K; padding rows never enter a real row's reduction), so a token's result does not depend on
how many tokens chose its experts; the k weighted expert outputs summed in fp32 in top-k order, one cast at the end.
On CUDA the router (logits, softmax, top-k, renormalising) is one Triton kernel, the GEMMs use one fixed config and
the combine is one kernel (:mod:`detaudit.kernels.triton_moe`): a decode step's MoE layer is bound by launches and
weight reads, so the fixed-order work must not cost extra launches. On CPU each expert's rows go through the
fixed-16-row-block path (:func:`detaudit.kernels.cpu.mm`).

Stock path, as serving engines run it: router in the model dtype, ``torch.topk``, tokens grouped per expert with a
tiling and split-K chosen from the load (CUDA: from the step's token count, known on the host, so it can sit in a
CUDA graph; CPU: from each expert's token count), top-k outputs weighted and summed in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detaudit.kernels import cpu
from detaudit.kernels._dispatch import use_triton
from detaudit.kernels.coverage import note_protected

OP_NAME = "detaudit::moe"
# Stock CPU: (most tokens, K splits) per expert: few tokens split each GEMM's K into partial products added in the
# model dtype, as a server's small-M split-K configs do to fill the machine.
STOCK_SPLITS = ((2, 4), (8, 2))


def route(
    x: torch.Tensor, router_w: torch.Tensor, top_k: int, renormalize: bool, *, batch_invariant: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, k] int64, weights [T, k]) of each token: softmax over the router logits, the top k, optionally
    renormalised to sum to 1. Batch-invariant: logits accumulated in fp32 (bf16 products are exact in fp32) and an fp32
    softmax, top-k as a stable descending sort (ties: lowest index first), a left-to-right sum, fp32 weights. Stock:
    logits in the model dtype, ``torch.topk``, weights in the model dtype."""
    if not batch_invariant:
        probs = torch.softmax(F.linear(x, router_w).float(), dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)
    if use_triton(x):
        from detaudit.kernels import triton_moe

        return triton_moe.route(x, router_w, top_k, renormalize)
    probs = cpu.softmax(cpu.mm(x.float(), router_w.float().t()), -1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, order)
    if renormalize:
        total = weights[:, 0].clone()
        for j in range(1, top_k):  # left to right: the same order for every token, whatever the batch
            total = total + weights[:, j]
        weights = weights / total[:, None]
    return order, weights


def combine(y: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Sum over k of ``weights[:, j] * y[:, j]`` (y: [T, k, H]) in fp32, j = 0, 1, … in order; one cast."""
    acc = y[:, 0].float() * weights[:, :1].float()
    for j in range(1, y.shape[1]):
        acc = acc + y[:, j].float() * weights[:, j : j + 1].float()
    return acc.to(out_dtype)


def _cpu_experts_bi(x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """[T, k, H]: each (token, slot)'s expert output; each expert's rows on fixed 16-row blocks."""
    t, k = ids.shape
    inter = w2.shape[2]
    y = torch.empty((t, k, x.shape[1]), dtype=x.dtype)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = cpu.mm(x[tok], w13[e].t())
        y[tok, slot] = cpu.mm(F.silu(h[:, :inter]) * h[:, inter:], w2[e].t())
    return y


def _stock_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` as a server's grouped GEMM tiles it for ``len(a)`` rows: for few rows, split-K partial products
    added up in the output dtype (as a split-K kernel's atomic adds into its output do, here in a fixed order)."""
    splits = next((s for most, s in STOCK_SPLITS if a.shape[0] <= most), 1)
    if splits == 1:
        return a @ w.t()
    parts = [ac @ wc.t() for ac, wc in zip(a.chunk(splits, dim=1), w.chunk(splits, dim=1), strict=True)]
    return sum_in_order(parts)


def sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts[0] + parts[1] + … left to right, each add rounded to the parts' dtype."""
    acc = parts[0]
    for p in parts[1:]:
        acc = acc + p
    return acc


def _cpu_stock(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor):
    """Tokens grouped per expert, tiled by the group's size; outputs weighted and accumulated in the model dtype."""
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = _stock_mm(x[tok], w13[e])
        y = _stock_mm(F.silu(h[:, :inter]) * h[:, inter:], w2[e])
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out


def moe_forward(
    x: torch.Tensor,
    router_w: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
    *,
    batch_invariant: bool,
) -> torch.Tensor:
    """The MoE feed-forward of tokens ``x`` [T, H]: router_w [E, H], w13 [E, 2I, H] (gate rows then up rows, as
    nn.Linear weights), w2 [E, H, I]; SwiGLU experts (``down(silu(gate x) * up x)``). Returns [T, H] in x's dtype."""
    _check(x, router_w, w13, w2, top_k)
    ids, weights = route(x, router_w, top_k, renormalize, batch_invariant=batch_invariant)
    if use_triton(x):
        from detaudit.kernels import triton_moe

        y = triton_moe.experts(x, ids, w13, w2, batch_invariant=batch_invariant)
        if batch_invariant:
            return triton_moe.combine(y, weights, x.dtype)
        return (y * weights[..., None].to(x.dtype)).sum(dim=1)
    if batch_invariant:
        return combine(_cpu_experts_bi(x, ids, w13, w2), weights, x.dtype)
    return _cpu_stock(x, ids, weights, w13, w2)


def _check(x: torch.Tensor, router_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> None:
    e, h = router_w.shape
    if x.dim() != 2 or x.shape[1] != h or w13.shape[0] != e or w2.shape[0] != e:
        raise ValueError(
            f"moe: x {tuple(x.shape)} must be [T, H] with router [E, H] {tuple(router_w.shape)}, "
            f"w13 [E, 2I, H] {tuple(w13.shape)}, w2 [E, H, I] {tuple(w2.shape)}"
        )
    if w13.shape[1] != 2 * w2.shape[2] or w13.shape[2] != h or w2.shape[1] != h or not 1 <= top_k <= e:
        raise ValueError(f"moe: inconsistent expert shapes w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, k {top_k}")


@torch.library.custom_op(OP_NAME, mutates_args=())
def moe(
    x: torch.Tensor, router_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, renormalize: bool
) -> torch.Tensor:
    """:func:`moe_forward`, batch-invariant inside ``batch_invariant()`` and stock outside it."""
    from detaudit.kernels import is_enabled

    bi = is_enabled()
    if bi:
        note_protected(OP_NAME)
    return moe_forward(x, router_w, w13, w2, top_k, renormalize, batch_invariant=bi)


@moe.register_fake
def _(x: torch.Tensor, router_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, renormalize: bool):
    return torch.empty_like(x)
