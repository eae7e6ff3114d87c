"""Batch-invariant CPU path: every row-independent op runs on fixed 16-row blocks.

Stock CPU torch picks its GEMM/reduction strategy from the whole problem shape, so fp32 ``mm`` differs between
M=1 and M>=2 (see docs/kernels.md). Here each op is cut into blocks of exactly ``BLOCK_ROWS`` rows (the last one
zero-padded), each block is copied into a fresh buffer (same shape, same alignment) and handed to the stock
``.out`` kernel. A row's result then depends only on its own values, never on how many rows came with it. That
property is what MKL/oneDNN showed on our CPUs, not a vendor guarantee, so :func:`self_check` re-measures it.

The ``.out`` overloads are deliberately *not* overridden on CPU: they are the stock kernels this path calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

BLOCK_ROWS = 16
# Attention walks keys in tiles of this many absolute positions (0, T, 2T, ...) on CPU.
ATTN_TILE = 64

_aten = torch.ops.aten


def _blocked(
    x2d: torch.Tensor, out_cols: int, out_dtype: torch.dtype, fn: Callable[[torch.Tensor, torch.Tensor, int], None]
) -> torch.Tensor:
    """Run ``fn(block, out_block, row0)`` on fixed 16-row blocks of ``x2d``; return the [rows, out_cols] result."""
    rows = x2d.shape[0]
    out = torch.empty((rows, out_cols), dtype=out_dtype, device="cpu")
    for r0 in range(0, rows, BLOCK_ROWS):
        n = min(BLOCK_ROWS, rows - r0)
        blk = torch.zeros((BLOCK_ROWS, *x2d.shape[1:]), dtype=x2d.dtype, device="cpu")
        blk[:n].copy_(x2d[r0 : r0 + n])
        tmp = torch.empty((BLOCK_ROWS, out_cols), dtype=out_dtype, device="cpu")
        fn(blk, tmp, r0)
        out[r0 : r0 + n].copy_(tmp[:n])
    return out


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors, row-blocked."""
    return _blocked(a, b.shape[1], torch.result_type(a, b), lambda blk, tmp, _r0: _aten.mm.out(blk, b, out=tmp))


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1, alpha: float = 1) -> torch.Tensor:
    """``beta * bias + alpha * (a @ b)`` with aten's broadcasting of ``bias``, row-blocked."""
    m, n = a.shape[0], b.shape[1]
    full = bias.expand(m, n)
    row_bias = bias.dim() == 2 and bias.shape[0] == m and m != 1

    def run(blk: torch.Tensor, tmp: torch.Tensor, r0: int) -> None:
        if row_bias:
            bb = torch.zeros((BLOCK_ROWS, n), dtype=bias.dtype, device="cpu")
            k = min(BLOCK_ROWS, m - r0)
            bb[:k].copy_(full[r0 : r0 + k])
        else:
            bb = full[:1].expand(BLOCK_ROWS, n)
        _aten.addmm.out(bb, blk, b, beta=beta, alpha=alpha, out=tmp)

    return _blocked(a, n, torch.result_type(a, b), run)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b``: each batch entry is an independent row-blocked ``mm``."""
    return (
        torch.stack([mm(a[i], b[i]) for i in range(a.shape[0])])
        if a.shape[0]
        else a.new_empty((0, a.shape[1], b.shape[2]))
    )


def _rows_last(x: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, list[int], list[int]]:
    """Move ``dims`` to the end and flatten: returns [rows, reduced] plus the kept shape and sorted dims."""
    nd = x.dim()
    red = sorted({d % nd for d in dims}) if nd else []
    kept = [d for d in range(nd) if d not in red]
    xp = x.permute(*kept, *red)
    kept_shape = [x.shape[d] for d in kept]
    return xp.reshape(math.prod(kept_shape), math.prod(x.shape[d] for d in red)), kept_shape, red


def _reduce(
    x: torch.Tensor,
    dims: Sequence[int] | None,
    keepdim: bool,
    out_dtype: torch.dtype,
    kernel: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Shared body of ``mean.dim`` / ``sum.dim_IntList``: reduce trailing-moved dims row by row."""
    if dims is None or len(dims) == 0 or x.dim() == 0:
        out = torch.empty(0, dtype=out_dtype, device="cpu")
        return kernel(x, list(range(x.dim())), keepdim, dtype=out_dtype, out=out)
    x2, kept_shape, red = _rows_last(x, dims)
    res = _blocked(x2, 1, out_dtype, lambda blk, tmp, _r0: kernel(blk, [1], True, dtype=out_dtype, out=tmp))
    res = res.reshape(kept_shape)
    if keepdim:
        for d in red:
            res = res.unsqueeze(d)
    return res


def mean_dim(
    x: torch.Tensor, dims: Sequence[int] | None, keepdim: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``aten::mean.dim``."""
    return _reduce(x, dims, keepdim, dtype or x.dtype, _aten.mean.out)


def sum_dim(
    x: torch.Tensor, dims: Sequence[int] | None, keepdim: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``aten::sum.dim_IntList``; integer sums are exact, so they skip the blocking."""
    if dtype is None:
        dtype = torch.int64 if not (x.is_floating_point() or x.is_complex()) else x.dtype
    if not (x.is_floating_point() or x.is_complex()):
        # The .out overload resizes its empty ``out``.
        out = torch.empty(0, dtype=dtype, device="cpu")
        return _aten.sum.IntList_out(x, list(dims or []), keepdim, dtype=dtype, out=out)
    return _reduce(x, dims, keepdim, dtype, _aten.sum.IntList_out)


def _softmax_like(x: torch.Tensor, dim: int, half_to_float: bool, kernel: Callable[..., torch.Tensor]) -> torch.Tensor:
    if half_to_float:  # stock CPU kernels refuse half_to_float; upcasting first is the same math
        x, half_to_float = x.to(torch.float32), False
    out_dtype = x.dtype
    if x.dim() == 0:
        return kernel(x, 0, half_to_float, out=torch.empty((), dtype=out_dtype, device="cpu"))
    dim = dim % x.dim()
    xt = x.movedim(dim, -1)
    shape = xt.shape
    x2 = xt.reshape(-1, shape[-1])
    res = _blocked(x2, shape[-1], out_dtype, lambda blk, tmp, _r0: kernel(blk, 1, half_to_float, out=tmp))
    return res.reshape(shape).movedim(-1, dim).contiguous()


def softmax(x: torch.Tensor, dim: int, half_to_float: bool = False) -> torch.Tensor:
    """``aten::_softmax``."""
    return _softmax_like(x, dim, half_to_float, _aten._softmax.out)


def log_softmax(x: torch.Tensor, dim: int, half_to_float: bool = False) -> torch.Tensor:
    """``aten::_log_softmax``."""
    return _softmax_like(x, dim, half_to_float, _aten._log_softmax.out)


def _rms_rows(h32: torch.Tensor, weight: torch.Tensor | None, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """fp32 RMSNorm of [rows, D] on fixed blocks; mean of squares via the stock ``mean.out`` per block."""
    d = h32.shape[1]

    def run(blk: torch.Tensor, tmp: torch.Tensor, _r0: int) -> None:
        ms = torch.empty((BLOCK_ROWS, 1), dtype=torch.float32, device="cpu")
        _aten.mean.out(blk * blk, [1], True, out=ms)
        y = blk * torch.rsqrt(ms + eps)
        if weight is not None:
            y = y * weight.to(torch.float32)
        tmp.copy_(y)

    return _blocked(h32, d, out_dtype, run)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, normalized_ndim: int = 1) -> torch.Tensor:
    """RMSNorm over the last ``normalized_ndim`` dims: fp32 statistics, ``(x * rstd) * w`` in fp32, one cast."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    lead = x.shape[: x.dim() - normalized_ndim]
    d = math.prod(x.shape[x.dim() - normalized_ndim :])
    w = None if weight is None else weight.reshape(d)
    out = _rms_rows(x.reshape(-1, d).to(torch.float32), w, eps, x.dtype)
    return out.reshape(*lead, *x.shape[x.dim() - normalized_ndim :])


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual`` (rounded to residual's dtype, like an unfused add), then RMSNorm of it."""
    new_res = (x.to(torch.float32) + residual.to(torch.float32)).to(residual.dtype)
    return rms_norm(new_res, weight, eps), new_res


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Fixed-tile attention in plain torch; see :func:`detaudit.kernels.attention.paged_attention` for the contract.

    Per sequence and per 16-row block of (token, q-head-in-group) rows, keys are walked in tiles of ``ATTN_TILE``
    absolute positions from 0 with an fp32 online softmax; both matmuls are ``bmm.out`` calls of one fixed shape
    ([Hkv, 16, D] x [Hkv, D, T] and [Hkv, 16, T] x [Hkv, T, D]). Fully masked tiles are exact no-ops, so a row gets
    the same bits whichever rows share its block and however many tiles the block walks.
    """
    t_total, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    ctx_all = context_lens.tolist()
    tables = block_tables.to(torch.long)
    tile = ATTN_TILE
    for b in range(len(ctx_all)):
        q0, q1, ctx = cu[b], cu[b + 1], ctx_all[b]
        ql = q1 - q0
        if ql == 0:
            continue
        n_blocks = -(-ctx // block_size)
        pos = torch.arange(n_blocks * block_size, device="cpu")
        phys = tables[b, pos // block_size] * block_size + pos % block_size
        k_seq = k_cache.reshape(-1, hkv, d)[phys].to(torch.float32)  # [P, Hkv, D]
        v_seq = v_cache.reshape(-1, hkv, d)[phys].to(torch.float32)
        n_tiles_ctx = -(-ctx // tile)
        pad_to = n_tiles_ctx * tile
        kp = torch.zeros((pad_to, hkv, d), dtype=torch.float32, device="cpu")
        vp = torch.zeros((pad_to, hkv, d), dtype=torch.float32, device="cpu")
        kp[:ctx] = k_seq[:ctx]
        vp[:ctx] = v_seq[:ctx]
        kt = kp.permute(1, 2, 0).contiguous()  # [Hkv, D, P]
        vt = vp.permute(1, 0, 2).contiguous()  # [Hkv, P, D]
        # rows: (token j, head-in-group h) -> row j * g + h, per KV head
        qs = q[q0:q1].to(torch.float32).reshape(ql, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, ql * g, d)
        row_pos = (ctx - ql + torch.arange(ql, device="cpu")).repeat_interleave(g)
        res = torch.empty((hkv, ql * g, d), dtype=torch.float32, device="cpu")
        for r0 in range(0, ql * g, BLOCK_ROWS):
            n = min(BLOCK_ROWS, ql * g - r0)
            qb = torch.zeros((hkv, BLOCK_ROWS, d), dtype=torch.float32, device="cpu")
            qb[:, :n] = qs[:, r0 : r0 + n]
            pb = torch.zeros(BLOCK_ROWS, dtype=torch.long, device="cpu")
            pb[:n] = row_pos[r0 : r0 + n]
            m = torch.full((hkv, BLOCK_ROWS, 1), -math.inf, device="cpu")
            lsum = torch.zeros((hkv, BLOCK_ROWS, 1), device="cpu")
            acc = torch.zeros((hkv, BLOCK_ROWS, d), device="cpu")
            s = torch.empty((hkv, BLOCK_ROWS, tile), device="cpu")
            pv = torch.empty((hkv, BLOCK_ROWS, d), device="cpu")
            for t in range(0, int(pb[:n].max()) // tile + 1):
                _aten.bmm.out(qb, kt[:, :, t * tile : (t + 1) * tile].contiguous(), out=s)
                kpos = t * tile + torch.arange(tile, device="cpu")
                visible = kpos[None, :] <= pb[:, None]
                sc = torch.where(visible[None], s * scale, -math.inf)
                m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
                p = torch.exp(sc - m_new)
                alpha = torch.exp(m - m_new)
                lsum_t = torch.empty((hkv, BLOCK_ROWS, 1), device="cpu")
                _aten.sum.IntList_out(p, [2], True, out=lsum_t)
                lsum = lsum * alpha + lsum_t
                _aten.bmm.out(p, vt[:, t * tile : (t + 1) * tile].contiguous(), out=pv)
                acc = acc * alpha + pv
                m = m_new
            res[:, r0 : r0 + n] = (acc / lsum)[:, :n]
        out[q0:q1] = res.reshape(hkv, ql, g, d).permute(1, 0, 2, 3).reshape(ql, hq, d).to(q.dtype)
    return out


def self_check(dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16), seed: int = 0) -> list[str]:
    """Re-measure row independence of this path on this CPU: ``op(x)[rows] == op(x[rows])`` bitwise.

    Returns a list of failure descriptions (empty when invariant). Small shapes keep it around a second.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    failures: list[str] = []
    for dt in dtypes:
        x = torch.randn(37, 96, generator=g, device="cpu").to(dt)
        w = torch.randn(80, 96, generator=g, device="cpu").to(dt)
        bias = torch.randn(80, generator=g, device="cpu").to(dt)
        for name, op in _check_ops(w, bias).items():
            full = op(x)
            for rows in ([0], [5], [3, 17], list(range(1, 18)), list(range(20, 37))):
                if not torch.equal(op(x[rows]), full[rows]):
                    failures.append(f"{name} {dt} rows={rows[:3]}…(n={len(rows)})")
                    break
    return failures


def _check_ops(w: torch.Tensor, bias: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "mm": lambda a: mm(a, w.t()),
        "mm_contig": lambda a: mm(a, w.t().contiguous()),
        "addmm": lambda a: addmm(bias, a, w.t()),
        "log_softmax": lambda a: log_softmax(a, -1),
        "softmax": lambda a: softmax(a, -1),
        "mean": lambda a: mean_dim(a, [-1], True),
        "sum": lambda a: sum_dim(a, [-1]),
        "rms_norm": lambda a: rms_norm(a, w[0], 1e-6),
    }
