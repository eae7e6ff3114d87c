"""GPU proof of the kernels (run on the H100; skipped without CUDA). Output log: tests/gpu/LOG.txt."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kvcache import paged_kv_cache  # tests/kvcache.py: tests/ is on sys.path under pytest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sweep_ours_invariant_stock_not(dtype: torch.dtype) -> None:
    from detaudit.probes.kernel_probes import run_sweep

    rows = run_sweep("cuda", dtype)
    for r in rows:
        print(
            f"{r.impl:5s} {r.op:40s} invariant={r.invariant} max_abs_diff={r.max_abs_diff:.3g} "
            f"worst_batch={r.worst_batch} checked={r.checked}"
        )
    assert all(r.invariant for r in rows if r.impl == "ours")
    assert any(not r.invariant for r in rows if r.impl == "stock"), "negative control: stock should break somewhere"


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_every_matmul_config_gives_the_same_bits(dtype: torch.dtype) -> None:
    from detaudit.kernels import triton_matmul as tm

    assert tm.configs_agree(dtype, torch.device("cuda"))
    cfgs = list(dict.fromkeys(c for gpu in tm.TABLES for c in tm.all_configs(dtype, gpu)))  # every GPU kind's
    print(f"{dtype}: configs {cfgs}")
    g = torch.Generator().manual_seed(0)
    # (300, 1001, 520): rows of 1001 elements are not 16-byte aligned, so TMA configs run their pointer-load twin
    for m, k, n in [(512, 4096, 4096), (300, 1000, 520), (64, 14336, 256), (300, 1001, 520), (96, 6144, 2048)]:
        a = torch.randn(m, k, generator=g).to("cuda", dtype)
        w = torch.randn(n, k, generator=g).to("cuda", dtype)
        b = torch.randn(n, generator=g).to("cuda", dtype)
        outs = [tm.matmul(a, w.t(), b, config=c) for c in cfgs]
        same = [torch.equal(o, outs[0]) for o in outs]
        outs_t = [tm.matmul(a, w.t().contiguous(), config=c) for c in cfgs]  # row-major B
        same += [torch.equal(o, outs_t[0]) for o in outs_t]
        print(f"{dtype} {m}x{k}x{n}: configs agree {same}")
        assert all(same)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dispatched_matmul_row_invariant_on_engine_shapes(dtype: torch.dtype) -> None:
    """The dispatcher's own picks (tables by N and K, M buckets) on Qwen3-1.7B's and Qwen3-8B's linear shapes at the
    engine's decode and prefill bucket sizes: every row is bitwise what the whole batch gives it, across every bucket
    boundary."""
    from detaudit.kernels import triton_matmul as tm

    g = torch.Generator().manual_seed(3)
    ms = [1, 2, 4, 8, 16, 24, 32, 40, 64, 96, 128, 136, 150, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3000]
    # Qwen3-1.7B's, then Qwen3-8B's (qkv, o_proj, down, gate_up): every table of this GPU kind
    for k, n in [
        (2048, 4096),
        (2048, 2048),
        (6144, 2048),
        (2048, 12288),
        (4096, 6144),
        (4096, 4096),
        (12288, 4096),
        (4096, 24576),
    ]:
        x = torch.randn(max(ms), k, generator=g).to("cuda", dtype)
        w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to("cuda", dtype)
        full = tm.matmul(x, w.t())
        picked = {tuple(tm.select_config(m, dtype, x.device, n, k)) for m in ms}
        print(f"{dtype} K={k} N={n}: {len(picked)} configs picked")
        for m in ms:
            assert torch.equal(tm.matmul(x[:m], w.t()), full[:m]), (k, n, m)
            assert torch.equal(tm.matmul(x[m - 1 : m], w.t()), full[m - 1 : m]), (k, n, m)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_matmul_matches_torch(dtype: torch.dtype) -> None:
    from detaudit.kernels import triton_matmul as tm

    tol = 1e-5 if dtype == torch.float32 else 8e-3  # fp32 must be IEEE, not TF32 (~3e-4)
    for m, k, n in [(1, 4096, 4096), (37, 333, 129), (1024, 4096, 14336)]:
        a = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        ref = 0.5 * (a.double() @ w.double().t()) + 2.0 * bias.double()
        out = tm.matmul(a, w.t(), bias, alpha=0.5, beta=2.0)
        assert out.dtype == dtype
        assert _rel(out, ref) < tol, (m, k, n, _rel(out, ref))
        ab = torch.randn(3, m, k, device="cuda", dtype=dtype)
        assert _rel(tm.bmm(ab, w.t().expand(3, k, n)), ab.double() @ w.double().t()) < tol


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_rowwise_match_torch(dtype: torch.dtype) -> None:
    from detaudit.kernels import rmsnorm
    from detaudit.kernels import triton_rowwise as tr

    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for m, d in [(7, 4096), (33, 20000), (5, 131)]:
        x = torch.randn(m, d, device="cuda", dtype=dtype)
        r = torch.randn(m, d, device="cuda", dtype=dtype)
        w = torch.randn(d, device="cuda", dtype=dtype)
        ref = F.rms_norm(x.double(), (d,), w.double(), 1e-6)
        assert _rel(rmsnorm.rms_norm(x, w, 1e-6), ref) < tol
        normed, new_res = rmsnorm.fused_add_rms_norm(x, r, w, 1e-6)
        assert torch.equal(new_res, x + r)
        assert _rel(normed, F.rms_norm((x + r).double(), (d,), w.double(), 1e-6)) < tol
        assert _rel(tr.softmax(x, -1, True), x.double().log_softmax(-1)) < tol
        assert _rel(tr.softmax(x, 0, False), x.double().softmax(0)) < tol
        assert _rel(tr.reduce_sum(x, [-1], False, dtype), x.double().sum(-1)) < tol
        assert _rel(tr.reduce_sum(x, [0], True, torch.float32, mean=True), x.double().mean(0, keepdim=True)) < tol


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that also holds for NaNs (torch.equal says NaN != NaN)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_segmented_softmax_one_launch_equals_two_and_is_invariant() -> None:
    from detaudit.kernels import triton_rowwise as tr

    g = torch.Generator().manual_seed(5)
    for m, v in [(37, 128256), (3, 40000), (3, 600_000)]:  # the last: more segments than FUSED_MAX_SEGS
        x = (torch.randn(m, v, generator=g) * 5).cuda()
        x[0, ::3] = -float("inf")
        x[1] = -float("inf")  # a fully masked row: NaN, as torch gives
        for log in (True, False):
            y = tr.softmax(x, -1, log)
            two = torch.empty_like(x)
            tr._seg_softmax(x, two, v, log, fused=False)
            assert _same_bits(y, two), (m, v, log)
            for r in (0, 1, m - 1):
                assert _same_bits(tr.softmax(x[r : r + 1], -1, log), y[r : r + 1]), (m, v, log, r)
            ref = x.double().log_softmax(-1) if log else x.double().softmax(-1)
            assert torch.isnan(y[1]).all() and torch.isnan(ref[1]).all()
            fin = torch.isfinite(ref)
            assert torch.equal(fin, torch.isfinite(y))
            assert _rel(y[fin], ref[fin]) < 1e-5, (m, v, log)


def _paged(lens: list[int], hkv: int, d: int, page: int, dtype: torch.dtype, g: torch.Generator):
    return paged_kv_cache(lens, hkv, d, page, dtype, g, device="cuda", spare_pages=3)


@pytest.mark.parametrize("page", [16, 64], ids=["tile-spans-pages", "page-holds-tiles"])
@pytest.mark.parametrize("gqa", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_attention_correct_and_prefill_decode_invariant(gqa: int, dtype: torch.dtype, page: int) -> None:
    from detaudit.kernels.attention import _stock, paged_attention

    g = torch.Generator().manual_seed(gqa)
    hkv, d = 2, 128
    hq = hkv * gqa
    lens = [1000, 37, 300, 1]
    qlens = [1000, 5, 1, 1]
    kc, vc, bt = _paged(lens, hkv, d, page, dtype, g)
    qs = torch.randn(sum(qlens), hq, d, generator=g).to("cuda", dtype)

    def call(q, tables, ql, ctx):
        cu = torch.tensor([0, *torch.tensor(ql).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        return paged_attention(
            q,
            kc,
            vc,
            tables,
            cu,
            torch.tensor(ctx, dtype=torch.int32, device="cuda"),
            1 / math.sqrt(d),
            batch_invariant=True,
        )

    full = call(qs, bt, qlens, lens)
    # SDPA per sequence in fp64 (batch_invariant=False on CUDA is a Triton kernel, which has no fp64)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ref = _stock(
        qs.double(),
        kc.double(),
        vc.double(),
        bt,
        cu,
        torch.tensor(lens, dtype=torch.int32, device="cuda"),
        1 / math.sqrt(d),
    )
    assert not torch.isnan(full).any()
    assert _rel(full, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    for p in [0, 15, 16, 63, 64, 500, 999]:  # token p of sequence 0: decode alone vs inside the mixed prefill batch
        assert torch.equal(call(qs[p : p + 1], bt[:1], [1], [p + 1]), full[p : p + 1]), p
    chunk = call(qs[640:1000], bt[:1], [360], [1000])  # chunked prefill of the tail
    assert torch.equal(chunk, full[640:1000])


def test_overrides_under_torch_compile_and_coverage() -> None:
    from detaudit.kernels import batch_invariant, coverage

    lin = torch.nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    with batch_invariant(), torch.inference_mode():
        with coverage() as cov:
            y = torch.log_softmax(lin(x).float(), -1)
        one = torch.log_softmax(lin(x[:1]).float(), -1)
    assert torch.equal(y[:1], one)
    assert cov.protected["aten::addmm"] >= 1 and cov.protected["aten::_log_softmax"] >= 1, cov.to_dict()


@pytest.mark.parametrize("page", [16, 64], ids=["tile-spans-pages", "page-holds-tiles"])
@pytest.mark.parametrize("schedule", ["h100", "h200", "three-sizes", "uniform256", "uniform512"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_attention_split_launch_gives_the_same_bits(dtype: torch.dtype, schedule: str, page: int) -> None:
    from detaudit.kernels import triton_attention as ta

    sch = {
        **ta.SCHEDULES,
        "three-sizes": ta.Schedule(128, 256, 256, 1280, 1024),
        "uniform256": ta.uniform(256),
        "uniform512": ta.uniform(512),
    }[schedule]
    g = torch.Generator().manual_seed(7)
    lens = [3000, 1, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 2047, 77]
    lens += [e + i for e in (sch.short_end, sch.mid_end, sch.mid_end + sch.long) for i in (-1, 0, 1) if e + i > 0]
    kc, vc, bt = _paged(lens, 8, 128, page, dtype, g)
    q = torch.randn(len(lens), 32, 128, generator=g).to("cuda", dtype)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda")
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kw = {"schedule": sch}
    one = ta.paged_attention(q, kc, vc, bt, cu, ctx, 0.088, split_launch=False, **kw)
    assert not torch.isnan(one).any()
    for stages in (2, 3, 4):  # the pipeline depth is scheduling only
        two = ta.paged_attention(q, kc, vc, bt, cu, ctx, 0.088, split_launch=True, stages=stages, **kw)
        assert torch.equal(one, two), stages
    assert ta.split_launch_agrees(torch.device("cuda"), dtype)


def test_mode_after_set_default_device_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """thinking-machines-lab's README and test: ``torch.set_default_device("cuda")``, then the mode, then factory
    calls that name no device. The once-per-process checks (CPU self-check, matmul config agreement, split-launch
    agreement) run again under that default, as in a fresh process."""
    import detaudit.kernels as dk
    from detaudit.kernels import batch_invariant
    from detaudit.kernels import triton_attention as ta
    from detaudit.kernels import triton_matmul as tm
    from detaudit.kernels.attention import paged_attention

    monkeypatch.setattr(dk, "_cpu_check", None)
    monkeypatch.setattr(tm, "_agree", {})
    monkeypatch.setattr(ta, "_split_ok", {})
    torch.set_default_device("cuda")
    try:
        with batch_invariant():
            for dtype in (torch.float32, torch.bfloat16):  # the TML test's inputs and check, both dtypes
                a = torch.linspace(-100, 100, 2048 * 4096).reshape(2048, 4096).to(dtype)
                b = torch.linspace(-100, 100, 4096 * 4096).reshape(4096, 4096).to(dtype)
                assert torch.equal(torch.mm(a[:1], b), torch.mm(a, b)[:1])
            x = torch.randn(33, 151936)
            assert torch.equal(torch.log_softmax(x, -1)[5:6], torch.log_softmax(x[5:6], -1))
            assert torch.equal(x.mean(-1)[:1], x[:1].mean(-1))
            q = torch.randn(3, 32, 128, dtype=torch.bfloat16)
            kc = torch.randn(40, 64, 8, 128, dtype=torch.bfloat16)
            vc = torch.randn(40, 64, 8, 128, dtype=torch.bfloat16)
            bt = torch.arange(39, dtype=torch.int32).reshape(3, 13)
            ctx = torch.tensor([800, 5, 830], dtype=torch.int32)
            out = paged_attention(q, kc, vc, bt, torch.arange(4, dtype=torch.int32), ctx, 0.09, batch_invariant=True)
            alone = paged_attention(
                q[2:], kc, vc, bt[2:], torch.arange(2, dtype=torch.int32), ctx[2:], 0.09, batch_invariant=True
            )
            assert out.device.type == "cuda" and torch.equal(out[2:], alone)
        assert dk._cpu_check == [] and all(tm._agree.values()) and all(ta._split_ok.values())
    finally:
        torch.set_default_device(None)
