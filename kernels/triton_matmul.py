"""Batch-invariant Triton matmul: one program owns one output tile and walks all of K in fixed BLOCK_K steps.

No split-K, stream-K or atomics, so an output element's reduction order is "K in order, BLOCK_K at a time" whatever
M is. Bias is added in fp32 in the epilogue (``alpha * acc + beta * bias``) before a single cast; fp32 inputs use
IEEE precision (no TF32). Tile configs are chosen by M bucket (from a table picked by N and K); :func:`configs_agree`
checks on the live device that every config gives bitwise the same result, and :func:`matmul` falls back to one
config per dtype if they do not. Each GPU kind has its own tables (:func:`detaudit.kernels._dispatch.arch`): they
change which fixed configuration runs for a shape, never by batch.
For larger M (bf16/fp16) the config names the Hopper kernel: TMA descriptor loads, a persistent grid of at most one
program per SM walking its tiles in grouped order, optionally warp-specialised; each tile still walks all of K in
the same BLOCK_K order, so it gives the pointer-load kernel's bits (its fallback where TMA cannot run).

Import this module only when a GPU or ``TRITON_INTERPRET=1`` is present: kernels are decorated at import time.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from detaudit.kernels._dispatch import arch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class Config(NamedTuple):
    """One tile shape: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; ``tma``: the Hopper kernel
    (TMA descriptor loads, a persistent grid of at most one program per SM, optional warp specialisation ``ws``)."""

    bm: int
    bn: int
    bk: int
    group: int
    warps: int
    stages: int
    tma: bool = False
    ws: bool = False


# (max M, config) buckets per dtype family, tuned on an H100 (benchmarks/RESULTS.md). Every program walks K in
# order with fp32 accumulation; on H100 bf16/fp16 the bits did not depend on the tile shape, BLOCK_K or the kernel
# (pointer loads or TMA) (tests/gpu), and configs_agree() re-checks that on the live device before the table is used.
# N <= 8192 (e.g. 4096x4096, 14336x4096) and N > 8192 (4096x14336, the 128,256-wide lm_head); M buckets from the
# benchmarks/kernel_tuning.py sweep: the TMA kernel (128x256 tiles) from M = 257 on (N <= 8192) or from M = 65 on.
# Weights smaller than 4096 x 4096 with N <= 8192 (Qwen3-1.7B's qkv 2048x4096, o_proj 2048x2048, down 6144x2048)
# have their own table (benchmarks/kernel_tuning_qwen3.py): at decode sizes 16 < M <= 1024 the Llama tiles leave
# most SMs idle (N = 2048, M = 128 with 64x128 tiles: 32 programs), so smaller tiles and the TMA kernel from M = 33.
# Decode sizes on the big N <= 8192 weights (benchmarks/kernel_tuning_decode.py): TMA loads with deep pipelines for
# the GEMV at M = 1 (8 stages) and for 64-row tiles up to M = 256 (6 stages: 14336x4096 at M = 256, 0.77 -> 0.96).
_HALF_SMALL_N = [
    (1, Config(16, 32, 256, 8, 4, 8, tma=True)),
    (4, Config(16, 32, 512, 8, 4, 5)),
    (16, Config(16, 32, 256, 8, 2, 5)),
    (32, Config(32, 32, 256, 8, 4, 4)),
    (64, Config(64, 32, 256, 8, 4, 4, tma=True)),
    (256, Config(64, 128, 64, 8, 4, 6, tma=True)),
    (2048, Config(128, 256, 64, 8, 8, 4, tma=True)),
    (1 << 62, Config(128, 256, 64, 8, 8, 3, tma=True)),
]
_HALF_SMALL_W = [
    (4, Config(16, 32, 512, 8, 4, 4)),
    (16, Config(16, 32, 256, 8, 2, 5)),
    (32, Config(32, 32, 256, 8, 4, 4)),
    (256, Config(64, 64, 128, 8, 4, 4, tma=True)),
    (1024, Config(64, 128, 64, 8, 4, 4, tma=True)),
    (2048, Config(128, 256, 64, 8, 8, 4, tma=True)),
    (1 << 62, Config(128, 256, 64, 8, 8, 3, tma=True)),
]
_SMALL_W = 4096 * 4096
_HALF_LARGE_N = [
    (16, Config(16, 64, 256, 8, 4, 4, tma=True)),
    (32, Config(32, 128, 128, 8, 4, 4)),
    (64, Config(64, 64, 128, 8, 4, 4)),
    (256, Config(128, 256, 64, 8, 8, 4, tma=True)),
    (2048, Config(128, 128, 64, 8, 4, 4, tma=True, ws=True)),
    (1 << 62, Config(128, 256, 64, 8, 8, 3, tma=True)),
]


# The H200 (benchmarks/RESULTS.md, "H200"; benchmarks/h200/tuning_qwen3_8b_matmul.json): the same SMs as the H100
# with 1.4x its memory bandwidth, tuned on Qwen3-8B's decode and prefill sizes with the weights cold (rotated through
# copies larger than L2, as a decoder's layers meet them). A GEMV wants 16x64 TMA tiles (4096 x 6144 at M = 1:
# 0.72 -> 0.97 of cuBLAS), M = 65-128 on N = 4096 64x64x128 TMA tiles with 6 stages (down 12288 x 4096 at M = 128:
# 0.73 -> 1.04), M = 257-1024 128x128 tiles (0.57 -> 0.90-0.93), and the fused qkv (N = 6144) its own table.
# M = 65-128 re-swept with deeper pipelines (benchmarks/h200/tuning_decode_m65_128.json, cold geomeans over
# M = 72-128): N = 4096 at M <= 96 64x128x64 with 7 stages (0.68 -> 0.78), qkv 7 stages (0.81 -> 0.84), N > 8192
# 8 stages (0.86 -> 0.89). The engine pads steps with prefill to 192, 256, 384 ... rows, and its 192-row piecewise
# graph replayed 18 % slower than stock's (benchmarks/h200/tuning_prefill_m192_384.json, warm / cold of cuBLAS):
# M = 129-192 64x128x128 with 8 warps (down 1.08 -> 1.12, o_proj cold 0.90 -> 0.93, gate_up 0.69 -> 0.74), qkv at
# M = 129-256 5 stages (0.64 -> 0.70 at 192, 0.73 -> 0.83 at 256), N = 4096 at M = 257-384 5 stages (down 0.80 ->
# 0.88). gate_up wants 128x128 tiles at 256-384 (0.81 -> 0.93) but the lm_head, in the same table, 128x256 (0.99).
_H200_SMALL_N = [
    (4, Config(16, 64, 256, 8, 4, 4, tma=True)),
    (16, Config(16, 32, 256, 8, 2, 5)),
    (32, Config(32, 32, 256, 8, 4, 4)),
    (64, Config(64, 32, 256, 8, 4, 4, tma=True)),
    (96, Config(64, 128, 64, 8, 4, 7, tma=True)),
    (128, Config(64, 64, 128, 8, 4, 6, tma=True)),
    (192, Config(64, 128, 128, 8, 8, 4, tma=True)),
    (256, Config(64, 128, 64, 8, 4, 6, tma=True)),
    (384, Config(128, 128, 64, 8, 4, 5, tma=True)),
    (1024, Config(128, 128, 64, 8, 4, 4, tma=True)),
    (2048, Config(128, 256, 64, 8, 8, 4, tma=True)),
    (1 << 62, Config(128, 256, 64, 8, 8, 3, tma=True)),
]
_H200_MID_N = [
    (16, Config(16, 64, 256, 8, 4, 4, tma=True)),
    (32, Config(32, 32, 256, 8, 4, 4)),
    (64, Config(64, 64, 128, 8, 4, 6, tma=True)),
    (128, Config(64, 128, 64, 8, 4, 7, tma=True)),
    (256, Config(128, 128, 64, 8, 4, 5, tma=True)),
    (2048, Config(128, 256, 64, 8, 8, 4, tma=True)),
    (1 << 62, Config(128, 256, 64, 8, 8, 3, tma=True)),
]
_H200_LARGE_N = [
    (16, Config(16, 64, 256, 8, 4, 4, tma=True)),
    (32, Config(32, 64, 128, 8, 4, 4)),
    (64, Config(64, 64, 128, 8, 4, 6, tma=True)),
    (128, Config(64, 128, 64, 8, 4, 8, tma=True)),
    (192, Config(64, 128, 128, 8, 8, 4, tma=True)),
    (1024, Config(128, 256, 64, 8, 8, 4, tma=True)),
    (1 << 62, Config(128, 256, 64, 8, 8, 3, tma=True)),
]


class Tables(NamedTuple):
    """A GPU kind's half-precision tables: N <= 4096 (``small_n``), 4096 < N <= 8192 (``mid_n``), N > 8192
    (``large_n``), and weights under 4096 x 4096 with N <= 8192 (``small_w``)."""

    small_n: list[tuple[int, Config]]
    mid_n: list[tuple[int, Config]]
    small_w: list[tuple[int, Config]]
    large_n: list[tuple[int, Config]]


TABLES = {
    "h100": Tables(_HALF_SMALL_N, _HALF_SMALL_N, _HALF_SMALL_W, _HALF_LARGE_N),
    "h200": Tables(_H200_SMALL_N, _H200_MID_N, _HALF_SMALL_W, _H200_LARGE_N),
}
_F32_BUCKETS: list[tuple[int, Config]] = [
    (16, Config(16, 64, 32, 8, 4, 4)),
    (128, Config(64, 64, 32, 8, 4, 3)),
    (1 << 62, Config(128, 128, 32, 8, 8, 3)),
]
# Used when configs_agree() finds that tile shape changes the bits on this device.
_SINGLE = {"half": Config(128, 128, 64, 8, 8, 3), "f32": Config(128, 128, 32, 8, 8, 3)}
# Under the CPU interpreter every program costs milliseconds: one big tile.
_INTERP = Config(32, 32, 32, 8, 4, 1)

_MAX_GRID_Y = 65535
_lock = threading.Lock()
_agree: dict[tuple[str, str], bool] = {}


def _family(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "half"


def buckets(dtype: torch.dtype, n: int = 0, k: int = 0, gpu: str = "h100") -> list[tuple[int, Config]]:
    """The M-bucketed config table for a dtype, output width N, inner size K (0: unknown) and GPU kind (exposed for
    tests and benchmarks)."""
    if dtype == torch.float32:
        return _F32_BUCKETS
    tables = TABLES[gpu]
    if n > 8192:
        return tables.large_n
    if 0 < n * k < _SMALL_W:
        return tables.small_w
    return tables.mid_n if n > 4096 else tables.small_n


def all_configs(dtype: torch.dtype, gpu: str = "h100") -> list[Config]:
    """Every config the dispatcher can pick for a dtype on a GPU kind (what configs_agree() must prove equivalent); a
    TMA config comes with its pointer-load twin, which runs where TMA cannot (bmm, unaligned strides)."""
    seen: dict[Config, None] = {}
    for n, k in ((0, 0), (6144, 4096), (1 << 20, 1), (1, 1)):  # every table: small, mid and large N, small weights
        for _, c in buckets(dtype, n, k, gpu):
            seen[c] = None
            if c.tma:
                seen[pointer_twin(c)] = None
    return list(seen)


def pointer_twin(cfg: Config) -> Config:
    """The pointer-load config that runs in a TMA config's place: same tile, at most 3 stages (shared memory)."""
    return cfg._replace(tma=False, ws=False, stages=min(cfg.stages, 3)) if cfg.tma else cfg


def select_config(m: int, dtype: torch.dtype, device: torch.device | None = None, n: int = 0, k: int = 0) -> Config:
    """Config for M rows (N columns, inner size K); a single config when the device failed :func:`configs_agree`."""
    if INTERPRET:
        return _INTERP
    fam = _family(dtype)
    key = (str(device), fam)
    if device is not None and device.type == "cuda" and key not in _agree:
        with _lock:
            if key not in _agree:
                _agree[key] = configs_agree(dtype, device)
    if device is not None and not _agree.get(key, True):
        return _SINGLE[fam]
    table = buckets(dtype, n, k, arch(device) if device is not None else "h100")
    for max_m, cfg in table:
        if m <= max_m:
            return cfg
    return table[-1][1]


@triton.jit
def _mm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_ab,
    stride_bb,
    stride_cb,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_biasm,
    stride_biasn,
    alpha,
    beta,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    CAST_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    a_ptr += batch * stride_ab
    b_ptr += batch * stride_bb
    c_ptr += batch * stride_cb
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/cols past the edge re-read row/col 0 instead of being masked: their results are never stored.
    offs_am = tl.where(offs_m < M, offs_m, 0)
    offs_bn = tl.where(offs_n < N, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    acc = acc * alpha
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        bias = tl.load(
            bias_ptr + offs_m[:, None] * stride_biasm + offs_n[None, :] * stride_biasn, mask=c_mask, other=0.0
        )
        acc = acc + bias.to(tl.float32) * beta
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _tile_pid(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((tile % num_pid_in_group) % group_size_m), (tile % num_pid_in_group) // group_size_m


@triton.jit
def _mm_tma_kernel(
    a_desc,
    b_desc,
    c_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_cm,
    stride_cn,
    stride_biasm,
    stride_biasn,
    alpha,
    beta,
    num_progs,
    HAS_BIAS: tl.constexpr,
    B_NK: tl.constexpr,
    WS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Persistent: program p owns tiles p, p + num_progs, ...; each tile walks all of K in BLOCK_K steps exactly like
    # _mm_kernel (TMA zero-fills the K tail and rows/cols past the edge, which are never stored).
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_progs, flatten=True, warp_specialize=WS):
        pid_m, pid_n = _tile_pid(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            a = a_desc.load([off_m, k * BLOCK_K])
            if B_NK:
                acc = tl.dot(a, b_desc.load([off_n, k * BLOCK_K]).T, acc)
            else:
                acc = tl.dot(a, b_desc.load([k * BLOCK_K, off_n]), acc)
        acc = acc * alpha
        offs_m = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_n = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if HAS_BIAS:
            bias = tl.load(
                bias_ptr + offs_m[:, None] * stride_biasm + offs_n[None, :] * stride_biasn, mask=c_mask, other=0.0
            )
            acc = acc + bias.to(tl.float32) * beta
        tl.store(
            c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
            acc.to(c_ptr.dtype.element_ty),
            mask=c_mask,
        )


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    out: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``alpha * (a @ b) + beta * bias`` for 2-D ``a`` [M, K], ``b`` [K, N] (any strides), bias broadcast to [M, N].

    ``config`` forces one tile config (tests and benchmarks); otherwise it is chosen by M, N and K.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: bad shapes {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"matmul: dtype mismatch {a.dtype} vs {b.dtype}")
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.zero_()
        if bias is not None and beta != 0:
            out.add_(bias.expand(m, n) * beta)
        return out
    cfg = config or select_config(m, a.dtype, a.device, n, k)
    has_bias = bias is not None and beta != 0
    if has_bias:
        bias2 = bias.expand(m, n)
        sbm, sbn = bias2.stride()
    else:
        bias2, sbm, sbn = out, 0, 0
    _launch(a, b, out, bias2, m, n, k, (0, 0, 0), 1, sbm, sbn, alpha, beta, has_bias, cfg)
    return out


def _tma_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides and a unit last stride (A row-major; B either layout)."""
    if INTERPRET:  # the CPU interpreter runs the kernel's logic (tests), but cannot do a bf16 tl.dot
        if a.dtype != torch.float16:
            return False
    elif a.dtype not in (torch.bfloat16, torch.float16) or a.device.type != "cuda" or not _has_tma(a.device):
        return False
    es = a.element_size()
    b_nk = b.stride(0) == 1  # b = W.t() of an nn.Linear weight W [N, K]
    b_row = b.stride(1 if b_nk else 0)
    return (
        a.stride(1) == 1
        and (a.stride(0) * es) % 16 == 0
        and (b_row * es) % 16 == 0
        and (b.stride(0) == 1 or b.stride(1) == 1)
        and a.data_ptr() % 16 == 0
        and b.data_ptr() % 16 == 0
    )


def _launch(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    bias2: torch.Tensor,
    m: int,
    n: int,
    k: int,
    batch_strides: tuple[int, int, int],
    batch: int,
    sbm: int,
    sbn: int,
    alpha: float,
    beta: float,
    has_bias: bool,
    cfg: Config,
) -> None:
    if cfg.tma and a.dim() == 2 and _tma_ok(a, b):
        _launch_tma(a, b, out, bias2, m, n, k, sbm, sbn, alpha, beta, has_bias, cfg)
        return
    cfg = pointer_twin(cfg)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), batch)
    _mm_kernel[grid](
        a,
        b,
        out,
        bias2,
        m,
        n,
        k,
        *batch_strides,
        a.stride(-2),
        a.stride(-1),
        b.stride(-2),
        b.stride(-1),
        out.stride(-2),
        out.stride(-1),
        sbm,
        sbn,
        float(alpha),
        float(beta),
        HAS_BIAS=has_bias,
        EVEN_K=(k % cfg.bk == 0),
        IEEE=(a.dtype == torch.float32),
        CAST_F32=INTERPRET and a.dtype == torch.bfloat16,
        BLOCK_M=cfg.bm,
        BLOCK_N=cfg.bn,
        BLOCK_K=cfg.bk,
        GROUP_M=cfg.group,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )


def _launch_tma(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    bias2: torch.Tensor,
    m: int,
    n: int,
    k: int,
    sbm: int,
    sbn: int,
    alpha: float,
    beta: float,
    has_bias: bool,
    cfg: Config,
) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    b_nk = b.stride(0) == 1
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [cfg.bm, cfg.bk])
    if b_nk:  # read W [N, K] directly, transpose the tile in the dot
        b_desc = TensorDescriptor(b, [n, k], [b.stride(1), 1], [cfg.bn, cfg.bk])
    else:
        b_desc = TensorDescriptor(b, [k, n], [b.stride(0), 1], [cfg.bk, cfg.bn])
    tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
    progs = min(tiles, _sm_count(a.device))
    _mm_tma_kernel[(progs,)](
        a_desc,
        b_desc,
        out,
        bias2,
        m,
        n,
        k,
        out.stride(0),
        out.stride(1),
        sbm,
        sbn,
        float(alpha),
        float(beta),
        progs,
        HAS_BIAS=has_bias,
        B_NK=b_nk,
        WS=cfg.ws,
        BLOCK_M=cfg.bm,
        BLOCK_N=cfg.bn,
        BLOCK_K=cfg.bk,
        GROUP_M=cfg.group,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if INTERPRET:  # a few programs, so that under the interpreter each walks several tiles as on a GPU
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """TMA (and the wgmma the kernel is built around) exists from Hopper (sm_90) on; older GPUs run the twins."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Batched ``a @ b`` ([B, M, K] x [B, K, N]): grid axis 1 is the batch entry, each entry walks K like mm."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"bmm: bad shapes {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"bmm: dtype mismatch {a.dtype} vs {b.dtype}")
    nb, m, k = a.shape
    n = b.shape[2]
    if out is None:
        out = torch.empty((nb, m, n), dtype=a.dtype, device=a.device)
    if nb == 0 or m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = select_config(m, a.dtype, a.device, n, k)
    for b0 in range(0, nb, _MAX_GRID_Y):  # grid axis 1 holds at most 65535 programs
        a_, b_, o_ = a[b0 : b0 + _MAX_GRID_Y], b[b0 : b0 + _MAX_GRID_Y], out[b0 : b0 + _MAX_GRID_Y]
        _launch(
            a_, b_, o_, o_, m, n, k, (a.stride(0), b.stride(0), out.stride(0)), a_.shape[0], 0, 0, 1.0, 1.0, False, cfg
        )
    return out


def configs_agree(dtype: torch.dtype, device: torch.device, m: int = 512, k: int = 1024, n: int = 768) -> bool:
    """True when every config the dispatcher can pick runs and gives bitwise the same product on this device."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    a = torch.randn(m, k, generator=g, device="cpu").to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=g, device="cpu").to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=g, device="cpu").to(device=device, dtype=dtype)
    cfgs = all_configs(dtype, arch(device))
    try:
        ref = matmul(a, w.t(), bias, config=cfgs[0])
        return all(torch.equal(matmul(a, w.t(), bias, config=c), ref) for c in cfgs[1:])
    except Exception:  # a config this device cannot compile or run (shared memory, TMA support, ...)
        return False
