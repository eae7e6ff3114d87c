"""The Triton kernels' logic on CPU under TRITON_INTERPRET=1: small fp32/fp16 shapes (the interpreter cannot do
bf16 ``tl.dot``). Triton reads the variable when it decorates kernels (its own standard library included) and when
it launches them, so these tests run in a subprocess started with it set; other tests never see it.

Invariance caveat: the interpreter runs ``tl.dot`` through numpy, whose matmul goes to a BLAS that can round a
row differently depending on where it sits in the tile. Bitwise checks therefore compare rows at the same position
within their tile (or q-block); on the GPU, tests/gpu checks every position.
"""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
from interp import inner, run_file_under_interpreter  # noqa: E402 - tests/interp.py, after the skip

_MODULES = ("triton_matmul", "triton_rowwise", "triton_attention")


def test_under_interpreter() -> None:
    """Run this file's kernel tests in a fresh interpreter with TRITON_INTERPRET=1 set from the start."""
    run_file_under_interpreter(__file__, passed=7)


@pytest.fixture(scope="module")
def tk() -> SimpleNamespace:
    return SimpleNamespace(**{name: importlib.import_module(f"detaudit.kernels.{name}") for name in _MODULES})


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


@inner
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matmul_logic(tk: SimpleNamespace, dtype: torch.dtype) -> None:
    tm = tk.triton_matmul
    g = torch.Generator().manual_seed(0)
    a = torch.randn(70, 50, generator=g).to(dtype)  # masked edges in M, N and K
    w = torch.randn(29, 50, generator=g).to(dtype)
    bias = torch.randn(29, generator=g).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    ref = 0.5 * (a.double() @ w.double().t()) + 2.0 * bias.double()
    assert _rel(tm.matmul(a, w.t(), bias, alpha=0.5, beta=2.0), ref) < tol
    assert _rel(tm.matmul(a, w.t().contiguous()), a.double() @ w.double().t()) < tol  # row-major B
    bias2 = torch.randn(70, 29, generator=g).to(dtype)
    assert _rel(tm.matmul(a, w.t(), bias2), a.double() @ w.double().t() + bias2.double()) < tol
    assert _rel(tm.matmul(a, w.t(), bias, beta=0.0), a.double() @ w.double().t()) < tol
    b3 = torch.randn(3, 50, 29, generator=g).to(dtype)
    assert _rel(tm.bmm(a.expand(3, 70, 50), b3), a.double() @ b3.double()) < tol
    full = tm.matmul(a, w.t())
    for r0, r1 in [(0, 32), (32, 64), (32, 33), (64, 70)]:  # tile-aligned starts (BLOCK_M = 32 here)
        assert torch.equal(tm.matmul(a[r0:r1], w.t()), full[r0:r1]), (r0, r1)
    # A TMA config runs its pointer-load twin where TMA cannot (here: the interpreter), and every twin is among the
    # configs that configs_agree() proves equivalent on a GPU.
    tma = tm.Config(32, 32, 32, 8, 4, 4, tma=True, ws=True)
    assert torch.equal(tm.matmul(a, w.t(), config=tma), tm.matmul(a, w.t(), config=tm.pointer_twin(tma)))
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        cfgs = tm.all_configs(dt)
        assert all(tm.pointer_twin(c) in cfgs for c in cfgs)
        # every table the dispatcher picks from (by N and K: Llama-3-8B and Qwen3-1.7B linear shapes) is covered
        for n, k in [(4096, 4096), (4096, 14336), (128256, 4096), (2048, 2048), (4096, 2048), (2048, 6144)]:
            assert all(c in cfgs for _, c in tm.buckets(dt, n, k)), (dt, n, k)


@inner
def test_hopper_matmul_logic(tk: SimpleNamespace) -> None:
    """The TMA kernel (fp16 here): a persistent grid of 3 programs walking the tiles in grouped order, ragged edges
    zero-filled by the descriptors, W read as [N, K] or as a row-major B, bias and alpha/beta in the epilogue: the
    pointer-load kernel's bits, row for row."""
    tm = tk.triton_matmul
    g = torch.Generator().manual_seed(3)
    a = torch.randn(150, 72, generator=g).half()  # ragged in M, N and K (BLOCK_K 32)
    w = torch.randn(40, 72, generator=g).half()
    bias = torch.randn(40, generator=g).half()
    ref = 0.5 * (a.double() @ w.double().t()) + 2.0 * bias.double()
    for cfg in (tm.Config(16, 16, 32, 2, 4, 2, tma=True), tm.Config(32, 16, 32, 8, 4, 2, tma=True)):
        out = torch.full((150, 40), float("nan"), dtype=torch.float16)
        tm.matmul(a, w.t(), bias, alpha=0.5, beta=2.0, out=out, config=cfg)
        assert _rel(out, ref) < 2e-3
        assert torch.equal(out, tm.matmul(a, w.t(), bias, alpha=0.5, beta=2.0, config=tm.pointer_twin(cfg)))
        assert torch.equal(tm.matmul(a, w.t().contiguous(), config=cfg), tm.matmul(a, w.t(), config=cfg))


@inner
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rowwise_logic(tk: SimpleNamespace, dtype: torch.dtype) -> None:
    tr = tk.triton_rowwise
    g = torch.Generator().manual_seed(1)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for n in (300, 9000, 40000):  # single-pass, and chunked (RMSNorm) or segmented (softmax) past SINGLE_MAX
        x = torch.randn(5, n, generator=g).to(dtype)
        r = torch.randn(5, n, generator=g).to(dtype)
        w = torch.randn(n, generator=g).to(dtype)
        y, _ = tr.rms_norm(x, w, 1e-6)
        assert _rel(y, torch.nn.functional.rms_norm(x.double(), (n,), w.double(), 1e-6)) < tol
        assert torch.equal(tr.rms_norm(x[2:3], w, 1e-6)[0], y[2:3])
        yr, new_res = tr.rms_norm(x, w, 1e-6, residual=r)
        assert torch.equal(new_res, x + r)
        assert _rel(yr, torch.nn.functional.rms_norm((x + r).double(), (n,), w.double(), 1e-6)) < tol
        ls = tr.softmax(x, -1, True)
        assert _rel(ls, x.double().log_softmax(-1)) < tol
        assert torch.equal(tr.softmax(x[3:], -1, True), ls[3:])
        assert _rel(tr.softmax(x, -1, False, torch.float32), x.double().softmax(-1)) < tol
        assert _rel(tr.reduce_sum(x, [-1], False, torch.float32), x.double().sum(-1)) < tol
    x = torch.randn(4, 6, 7, generator=g).to(dtype)
    assert _rel(tr.reduce_sum(x, [0, 2], True, dtype, mean=True), x.double().mean((0, 2), keepdim=True)) < tol
    assert _rel(tr.softmax(x, 1, False), x.double().softmax(1)) < tol
    assert torch.equal(tr.reduce_sum(x > 0, [1], False, torch.int64), (x > 0).sum(1))
    masked = torch.full((2, 5), -math.inf, dtype=dtype)
    masked[:, 1] = 0.0
    assert torch.equal(tr.softmax(masked, -1, False), masked.softmax(-1))


@inner
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_logic(tk: SimpleNamespace, dtype: torch.dtype) -> None:
    from detaudit.kernels.attention import _stock

    ta = tk.triton_attention
    g = torch.Generator().manual_seed(2)
    hkv, gqa, d, page = 2, 3, 16, 8
    # A three-size schedule (64-position splits below 128, 128 below 512, then 256) and sequence 0 a 40-token chunk
    # at positions 492..531, across the last boundary: its keys fall in splits of all three sizes.
    sch = ta.Schedule(64, 128, 128, 512, 256)
    lens, qlens = [532, 20, 5], [40, 3, 1]
    n_pages = sum(-(-c // page) for c in lens) + 1
    kc = torch.randn(n_pages, page, hkv, d, generator=g).to(dtype)
    vc = torch.randn(n_pages, page, hkv, d, generator=g).to(dtype)
    kc[-1] = float("nan")
    vc[-1] = float("nan")
    perm = torch.randperm(n_pages - 1, generator=g)
    bt = torch.full((3, -(-max(lens) // page)), n_pages - 1, dtype=torch.int32)
    i = 0
    for b, c in enumerate(lens):
        for j in range(-(-c // page)):
            bt[b, j] = perm[i]
            i += 1
    q = torch.randn(sum(qlens), hkv * gqa, d, generator=g).to(dtype)

    def call(fn, qq, tables, ql, ctx, caches=(kc, vc)):
        cu = torch.tensor([0, *torch.tensor(ql).cumsum(0).tolist()], dtype=torch.int32)
        kw = {"schedule": sch} if fn is ta.paged_attention else {}
        return fn(qq, caches[0], caches[1], tables, cu, torch.tensor(ctx, dtype=torch.int32), 0.25, **kw)

    full = call(ta.paged_attention, q, bt, qlens, lens)
    ref = call(_stock, q.double(), bt, qlens, lens, caches=(kc.double(), vc.double()))
    assert _rel(full, ref) < (1e-6 if dtype == torch.float32 else 2e-3)
    dec = [lens[0] - 1, 19, 4]  # one decode query per sequence: both launches, same bits
    q_dec = torch.randn(3, hkv * gqa, d, generator=g).to(dtype)
    cu3 = torch.arange(4, dtype=torch.int32)
    ctx3 = torch.tensor([p + 1 for p in dec], dtype=torch.int32)
    one = ta.paged_attention(q_dec, kc, vc, bt, cu3, ctx3, 0.25, split_launch=False, schedule=sch)
    split = ta.paged_attention(q_dec, kc, vc, bt, cu3, ctx3, 0.25, split_launch=True, schedule=sch)
    assert torch.equal(one, split)
    bq = ta.block_m(gqa) // gqa
    for i in (0, bq, 7 * bq):  # a chunk row vs the same token decoded alone, both first in their q-block
        assert torch.equal(call(ta.paged_attention, q[i : i + 1], bt[:1], [1], [lens[0] - 39 + i]), full[i : i + 1]), i
    assert torch.equal(call(ta.paged_attention, q[40:43], bt[1:2], [3], [20]), full[40:43])  # alone vs in batch
    # The same keys in pages of 64 (a whole tile per page: one block-table read per tile) give the same bits.
    big = 64
    kc64 = torch.zeros(len(lens) * -(-max(lens) // big), big, hkv, d).to(dtype)
    vc64 = torch.zeros_like(kc64)
    bt64 = torch.arange(kc64.shape[0], dtype=torch.int32).flip(0).reshape(len(lens), -1)  # pages out of order
    for b, c in enumerate(lens):
        pos = torch.arange(c)
        src = bt[b, pos // page].long(), pos % page
        dst = bt64[b, pos // big].long(), pos % big
        kc64[dst] = kc[src]
        vc64[dst] = vc[src]
    assert torch.equal(call(ta.paged_attention, q, bt64, qlens, lens, caches=(kc64, vc64)), full)
