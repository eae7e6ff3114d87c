"""Batch-invariant row-wise Triton kernels: RMSNorm (+ fused residual add), softmax, log-softmax, sum, mean.

One program per row. The chunk size over the row is a function of the row length N only (the whole row when its
next power of two is <= ``SINGLE_MAX``, else fixed ``CHUNK``-wide chunks), never of the number of rows, and all
statistics accumulate in fp32 (fp64 for fp64 input). A row's result therefore has the same bits however many rows
come with it. Callers pass 2-D [rows, N] views whose last dim is contiguous.

(Log-)softmax rows wider than ``SINGLE_MAX`` are cut into fixed ``SEG``-column segments instead (a constant per GPU
kind, :data:`SEGMENTS`, never derived from the number of rows), one program each: a segment's (max, sum of exp)
partial is published, the row's partials are combined in segment order, and the segment is written from registers,
so the row is read once. The programs of a row wait for each other (a per-row counter; work is handed out by an
atomic ticket so that a waiting program's row-mates have always been started, whatever order the hardware launches
programs in); where that is unsafe (the CPU interpreter runs programs one after another, or a row has more than
``FUSED_MAX_SEGS`` segments) a two-launch form does the same arithmetic (stats, then a write pass that re-reads the
row) and gives the same bits.

Import this module only when a GPU or ``TRITON_INTERPRET=1`` is present: kernels are decorated at import time.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from detaudit.kernels._dispatch import arch

SINGLE_MAX = 32768
CHUNK = 2048
# (segment width, warps per segment program) per GPU kind (benchmarks/RESULTS.md, "Row-wise kernels").
SEGMENTS = {"h100": (8192, 8), "h200": (8192, 8)}
FUSED_MAX_SEGS = 64
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _block(n: int) -> tuple[int, bool]:
    """(BLOCK, single-pass?) for a row of n elements: depends on n only."""
    p2 = triton.next_power_of_2(max(n, 1))
    return (p2, True) if p2 <= SINGLE_MAX else (CHUNK, False)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 16384 else 32


@triton.jit
def _rms_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    ro_ptr,
    sx,
    sr,
    sy,
    sro,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * sx
    r_row = r_ptr + row * sr
    y_row = y_ptr + row * sy
    ro_row = ro_ptr + row * sro
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < N
        h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h = h + tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
            h_r = h.to(ro_ptr.dtype.element_ty)
            tl.store(ro_row + cols, h_r, mask=mask)
            h = h_r.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
        y = h * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(y_row.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for off in range(0, N, BLOCK):
            c = off + cols
            mask = c < N
            h = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                h = h + tl.load(r_row + c, mask=mask, other=0.0).to(tl.float32)
                h_r = h.to(ro_ptr.dtype.element_ty)
                tl.store(ro_row + c, h_r, mask=mask)
                h = h_r.to(tl.float32)
            acc += h * h
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for off in range(0, N, BLOCK):
            c = off + cols
            mask = c < N
            h = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                h = h + tl.load(r_row + c, mask=mask, other=0.0).to(tl.float32)
                h = h.to(ro_ptr.dtype.element_ty).to(tl.float32)
            y = h * rstd
            if HAS_W:
                y = y * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, y.to(y_row.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_kernel(x_ptr, y_ptr, sx, sy, N, LOG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=-float("inf")).to(tl.float32)
    mx = tl.max(x, axis=0)
    e = tl.where(mask, tl.exp(x - mx), 0.0)
    s = tl.sum(e, axis=0)
    if LOG:
        y = x - mx - tl.log(s)
    else:
        y = e / s
    tl.store(y_ptr + row * sy + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _seg_softmax_kernel(
    x_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    sx,
    sy,
    N,
    NSEG,
    LOG: tl.constexpr,
    SEG: tl.constexpr,
    NSEG_P2: tl.constexpr,
    PHASE: tl.constexpr,
):
    # PHASE 0: fused (publish partial, wait for the row's other segments, write); 1: publish only; 2: write only.
    if PHASE == 0:
        # Work is handed out by a ticket (cnt[0]), not by program_id: a program that holds ticket t knows every
        # lower ticket is running or done whatever order the hardware starts programs in, so a row's programs
        # (consecutive tickets) only ever wait for programs that can run: no deadlock as long as NSEG programs fit.
        pid = tl.atomic_add(cnt_ptr, 1, sem="relaxed", scope="gpu")
    else:
        pid = tl.program_id(0)
    row = (pid // NSEG).to(tl.int64)
    seg = pid % NSEG
    cols = seg * SEG + tl.arange(0, SEG)
    mask = cols < N
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=-float("inf")).to(tl.float32)
    ws_row = ws_ptr + row * (2 * NSEG)
    if PHASE != 2:
        m_s = tl.max(x, axis=0)
        s_s = tl.sum(tl.where(x == -float("inf"), 0.0, tl.exp(x - m_s)), axis=0)
        tl.store(ws_row + 2 * seg, m_s)
        tl.store(ws_row + 2 * seg + 1, s_s)
    if PHASE == 0:
        tl.debug_barrier()  # every thread's partial store happens before the release
        tl.atomic_add(cnt_ptr + 1 + row, 1, sem="release", scope="gpu")
        while tl.atomic_add(cnt_ptr + 1 + row, 0, sem="acquire", scope="gpu") < NSEG:
            pass
        tl.debug_barrier()
    if PHASE != 1:
        segs = tl.arange(0, NSEG_P2)
        ms = tl.load(ws_row + 2 * segs, mask=segs < NSEG, other=-float("inf"), cache_modifier=".cg")
        ss = tl.load(ws_row + 2 * segs + 1, mask=segs < NSEG, other=0.0, cache_modifier=".cg")
        mx = tl.max(ms, axis=0)
        s = tl.sum(tl.where(ms == -float("inf"), 0.0, ss * tl.exp(ms - mx)), axis=0)
        if LOG:
            y = x - mx - tl.log(s)
        else:
            y = tl.exp(x - mx) / s
        tl.store(y_ptr + row * sy + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_kernel(x_ptr, y_ptr, sx, N, divisor, ACC_F64: tl.constexpr, ACC_INT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * sx
    cols = tl.arange(0, BLOCK)
    if ACC_INT:
        acc = tl.zeros((BLOCK,), dtype=tl.int64)
    elif ACC_F64:
        acc = tl.zeros((BLOCK,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(0, N, BLOCK):
        c = off + cols
        acc += tl.load(x_row + c, mask=c < N, other=0).to(acc.dtype)
    total = tl.sum(acc, axis=0)
    if not ACC_INT:
        total = total / divisor
    tl.store(y_ptr + row, total.to(y_ptr.dtype.element_ty))


def _rows2d(x: torch.Tensor, n: int) -> torch.Tensor:
    x2 = x.reshape(-1, n) if n else x.reshape(-1, 0)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    normalized_numel: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the trailing ``normalized_numel`` elements (default: last dim); with ``residual``, first
    ``h = x + residual`` rounded to residual's dtype (returned as the new residual) and normalise h."""
    n = normalized_numel or x.shape[-1]
    x2 = _rows2d(x, n)
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    ro = ro2 = r2 = None
    if residual is not None:
        r2 = _rows2d(residual, n)
        ro = torch.empty(residual.shape, dtype=residual.dtype, device=x.device)
        ro2 = ro.view(-1, n)
    if rows == 0 or n == 0:
        return y, ro
    w = weight.reshape(n).contiguous() if weight is not None else x2
    block, single = _block(n)
    _rms_kernel[(rows,)](
        x2,
        r2 if r2 is not None else x2,
        w,
        y2,
        ro2 if ro2 is not None else y2,
        x2.stride(0),
        r2.stride(0) if r2 is not None else 0,
        y2.stride(0),
        ro2.stride(0) if ro2 is not None else 0,
        n,
        float(eps),
        HAS_RES=residual is not None,
        HAS_W=weight is not None,
        BLOCK=block,
        SINGLE=single,
        num_warps=_warps(block),
    )
    return y, ro


def softmax(x: torch.Tensor, dim: int, log: bool, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(log-)softmax along ``dim`` (moved last), one program per row."""
    dim = dim % max(x.dim(), 1)
    xt = x.movedim(dim, -1) if x.dim() else x.reshape(1)
    shape = xt.shape
    n = shape[-1]
    x2 = _rows2d(xt, n)
    y2 = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and n:
        block, single = _block(n)
        if single:
            _softmax_kernel[(rows,)](
                x2, y2, x2.stride(0), y2.stride(0), n, LOG=log, BLOCK=block, num_warps=_warps(block)
            )
        else:
            _seg_softmax(x2, y2, n, log)
    y = y2.reshape(shape)
    return (y.movedim(-1, dim) if x.dim() else y.reshape(())).contiguous()


def _seg_softmax(
    x2: torch.Tensor, y2: torch.Tensor, n: int, log: bool, fused: bool | None = None, seg: tuple[int, int] | None = None
) -> None:
    """Segmented (log-)softmax of [rows, n] rows; ``fused`` None: one launch where safe (see the module doc);
    ``seg`` (width, warps) for benchmarks, else the device's."""
    rows = x2.shape[0]
    width, warps = seg or SEGMENTS[arch(x2.device)]
    nseg = triton.cdiv(n, width)
    if fused is None:
        fused = not INTERPRET and nseg <= FUSED_MAX_SEGS
    ws = torch.empty((rows, 2 * nseg), dtype=torch.float32, device=x2.device)
    cnt = torch.zeros((1 + rows if fused else 1,), dtype=torch.int32, device=x2.device)  # ticket, row counters
    args = (x2, y2, ws, cnt, x2.stride(0), y2.stride(0), n, nseg)
    meta = dict(LOG=log, SEG=width, NSEG_P2=triton.next_power_of_2(nseg), num_warps=warps)
    for phase in (0,) if fused else (1, 2):
        _seg_softmax_kernel[(rows * nseg,)](*args, PHASE=phase, **meta)


def reduce_sum(
    x: torch.Tensor, dims: list[int] | None, keepdim: bool, out_dtype: torch.dtype, mean: bool = False
) -> torch.Tensor:
    """sum/mean over ``dims`` (all when empty/None): reduced dims moved last, one program per kept element."""
    nd = x.dim()
    red = sorted({d % nd for d in dims}) if (dims and nd) else list(range(nd))
    kept = [d for d in range(nd) if d not in red]
    kept_shape = [x.shape[d] for d in kept]
    n = 1
    for d in red:
        n *= x.shape[d]
    xp = x.permute(*kept, *red) if nd else x
    x2 = _rows2d(xp, n) if n else xp.reshape(-1, 0)
    is_int = not (x.is_floating_point() or x.is_complex())
    acc_f64 = x.dtype == torch.float64 or out_dtype == torch.float64
    y = torch.empty(kept_shape, dtype=out_dtype, device=x.device)
    rows = y.numel()
    if rows:
        if n == 0:
            y.fill_(float("nan") if mean else 0)
        else:
            _sum_kernel[(rows,)](
                x2,
                y.view(-1),
                x2.stride(0),
                n,
                float(n) if mean else 1.0,
                ACC_F64=acc_f64,
                ACC_INT=is_int,
                BLOCK=1024,
                num_warps=4,
            )
    if keepdim:
        for d in red:
            y = y.unsqueeze(d)
    return y
