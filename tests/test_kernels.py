"""CPU path of detaudit.kernels: bitwise batch invariance, correctness, the override lifecycle, coverage, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from detaudit.kernels import batch_invariant, coverage, cpu, disable, enable, is_enabled
from detaudit.kernels.attention import paged_attention
from detaudit.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from detaudit.probes.kernel_probes import ProbeConfig, run_sweep
from kvcache import paged_kv_cache  # tests/ is on sys.path under pytest

SMALL = ProbeConfig(
    hidden=128, vocab=1000, sizes=(1, 2, 3, 7, 15, 16, 17, 33, 64, 255, 256, 257), attn_batches=(1, 2, 5), attn_ctx=100
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_path_is_bitwise_invariant_on_the_sweep(dtype: torch.dtype) -> None:
    rows = run_sweep("cpu", dtype, impls=("ours",), cfg=SMALL)
    assert len(rows) == 13
    bad = [r for r in rows if not r.invariant]
    assert not bad, bad
    assert all(r.checked >= len(SMALL.sizes) for r in rows if not r.op.startswith("attention"))


def test_stock_cpu_torch_is_not_invariant() -> None:
    """Negative control: the sweep above would catch these if our path had them."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 512, generator=g)
    w = torch.randn(512, 512, generator=g)
    # fp32 mm: row 0 alone vs inside M rows (which M breaks depends on the CPU's BLAS; some always does)
    assert any(not torch.equal(torch.mm(a[:1], w), torch.mm(a[:m], w)[:1]) for m in (2, 3, 4, 8, 16, 64))
    q = torch.randn(1, 4, 16, 64, generator=g)
    k = torch.randn(1, 4, 16, 64, generator=g)
    v = torch.randn(1, 4, 16, 64, generator=g)
    prefill = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    diffs = [
        not torch.equal(
            F.scaled_dot_product_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1]),
            prefill[:, :, t : t + 1],
        )
        for t in range(16)
    ]
    assert any(diffs)  # SDPA decode row vs the same row in a prefill
    rows = run_sweep("cpu", torch.float32, impls=("stock",), cfg=SMALL, ops=["linear (nn.Linear W^T)", "attention"])
    assert not any(r.invariant for r in rows)


def test_self_check_passes_here() -> None:
    assert cpu.self_check() == []


@pytest.mark.parametrize("default", ["meta", "cpu"])
def test_mode_works_under_a_default_device(default: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """thinking-machines-lab's usage: ``torch.set_default_device(...)`` first, then the mode. Every tensor the
    kernels make must name its device, or (default ``meta``) the self-check and the CPU path would make meta
    tensors; the self-check is re-run under the default device."""
    import detaudit.kernels as dk

    g = torch.Generator(device="cpu").manual_seed(4)
    a = torch.randn(40, 96, generator=g, device="cpu").to(torch.bfloat16)
    w = torch.randn(80, 96, generator=g, device="cpu").to(torch.bfloat16)
    kc, vc, bt = paged_kv_cache([70, 9], 2, 32, 16, torch.float32, g)
    q = torch.randn(71, 4, 32, generator=g, device="cpu")
    cu = torch.tensor([0, 70, 71], dtype=torch.int32, device="cpu")
    ctx = torch.tensor([70, 9], dtype=torch.int32, device="cpu")
    with batch_invariant():
        want = (
            torch.log_softmax(F.linear(a, w).float(), -1),
            F.rms_norm(a, (96,), w[0], 1e-6),
            a.float().mean(-1),
            paged_attention(q, kc, vc, bt, cu, ctx, 0.17, batch_invariant=True),
        )
    monkeypatch.setattr(dk, "_cpu_check", None)
    torch.set_default_device(default)
    try:
        # The self-check runs when a block installs the overrides; called here, it runs even when an engine still
        # alive in this process keeps them installed (pinned).
        assert dk.cpu_self_check() == []
        with batch_invariant():
            got = (
                torch.log_softmax(F.linear(a, w).float(), -1),
                F.rms_norm(a, (96,), w[0], 1e-6),
                a.float().mean(-1),
                paged_attention(q, kc, vc, bt, cu, ctx, 0.17, batch_invariant=True),
            )
    finally:
        torch.set_default_device(None)
    for x, y in zip(got, want, strict=True):
        assert x.device.type == "cpu" and torch.equal(x, y)


def test_enable_is_reference_counted_nesting_and_exception_safe() -> None:
    a = torch.randn(40, 256)
    w = torch.randn(256, 256)

    def invariant() -> bool:
        return torch.equal(torch.mm(a[:1], w), torch.mm(a, w)[:1])

    assert not is_enabled() and not invariant()
    with batch_invariant():
        assert is_enabled() and invariant()
        with batch_invariant():
            assert invariant()
        assert is_enabled() and invariant()  # inner exit must not tear down the outer install
        with pytest.raises(ValueError), batch_invariant():
            raise ValueError("boom")
        assert is_enabled() and invariant()
    assert not is_enabled() and not invariant()
    enable()
    enable()
    disable()
    assert is_enabled()
    disable()
    assert not is_enabled()
    with pytest.raises(RuntimeError):
        disable()


def test_pinned_overrides_switch_by_flag_and_pass_stock_through() -> None:
    """An engine pins the overrides so that a step's block does not re-register them (about 1 ms a step): inside a
    block ours run (row 0 alone = row 0 in any batch), outside one the stock kernels do, bit for bit (batch-dependent
    as stock is), and the finalizer's unpin removes them."""
    import gc

    import detaudit.kernels as dk

    from detaudit.engine.config import pin_kernels

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 512, generator=g)
    w = torch.randn(512, 512, generator=g)
    x = torch.randn(9, 300, generator=g)

    def run() -> list[torch.Tensor]:
        return [torch.mm(a[:m], w) for m in (1, 2, 3, 4, 8, 16, 64)] + [torch.log_softmax(x, -1), x.sum(-1)]

    def invariant(out: list[torch.Tensor]) -> bool:
        return all(torch.equal(out[0], o[:1]) for o in out[1:7])

    gc.collect()
    pins = dk._pins  # another engine of this process may still pin them: this test adds and drops its own pin
    stock = run()
    assert not invariant(stock)  # the negative control: stock mm's row 0 depends on M on this CPU

    class Owner:
        pass

    owner = Owner()
    pin_kernels(owner, "batch-invariant")
    pin_kernels(Owner(), "stock")  # stock engines pin nothing
    try:
        with batch_invariant():
            libs = list(dk._libs)
            assert dk.overridden("CPU") and invariant(run())
        assert dk._libs == libs and not is_enabled() and not dk.overridden("CPU")  # registered, switched off
        assert all(torch.equal(p, q) for p, q in zip(run(), stock, strict=True))
        with batch_invariant():
            assert dk._libs == libs and invariant(run())
    finally:
        del owner
        gc.collect()
    assert dk._pins == pins  # the owner's finalizer unpinned
    assert (dk._libs == []) == (pins == 0)  # and the overrides went with the last pin
    if pins == 0:
        with pytest.raises(RuntimeError):
            dk.unpin()


def test_a_pinned_op_with_no_stock_kernel_at_its_key_says_so_outside_a_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch has no kernel at a key (XLA here), the pinned passthrough raises what torch would, not a crash."""
    import detaudit.kernels as k

    impl = k._switched("aten::mm", "XLA", lambda a, b: "ours")
    with pytest.raises(NotImplementedError, match="aten::mm has no XLA kernel in this build of torch"):
        impl(None, torch.ones(1, 1), torch.ones(1, 1))
    monkeypatch.setattr(k, "_depth", 1)  # inside a batch_invariant() block: ours runs
    assert impl(None, torch.ones(1, 1), torch.ones(1, 1)) == "ours"


def test_overrides_compute_the_right_thing() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 7, generator=g)
    a = torch.randn(9, 6, generator=g)
    m = torch.randn(6, 4, generator=g)
    bias = torch.randn(4, generator=g)
    bias2 = torch.randn(9, 4, generator=g)
    half = torch.randn(3, 10, generator=g).to(torch.bfloat16)
    with batch_invariant(), torch.inference_mode():
        got = {
            "addmm": torch.addmm(bias, a, m, beta=0.5, alpha=-2.0),
            "addmm2d": torch.addmm(bias2, a, m, beta=3.0),
            "bmm": torch.bmm(x, torch.randn(5, 7, 3, generator=g)),
            "mean": x.mean(dim=(0, 2), keepdim=True),
            "sum": x.sum(1, dtype=torch.float64),
            "sum_all": x.sum(),
            "sum_bool": (x > 0).sum(-1),
            "softmax": x.softmax(1),
            "log_softmax": F.log_softmax(x, 0),
            "half_to_float": torch.ops.aten._log_softmax(half, 1, True),
            "rms": F.rms_norm(x, (6, 7), torch.randn(6, 7, generator=g), 1e-5),
        }
    assert torch.allclose(got["addmm"], 0.5 * bias - 2.0 * a @ m, atol=1e-5)
    assert torch.allclose(got["addmm2d"], 3.0 * bias2 + a @ m, atol=1e-5)
    assert got["mean"].shape == (1, 6, 1) and torch.allclose(got["mean"], x.mean(dim=(0, 2), keepdim=True))
    assert got["sum"].dtype == torch.float64 and torch.allclose(got["sum"], x.double().sum(1))
    assert torch.allclose(got["sum_all"], x.sum(), atol=1e-4)
    assert torch.equal(got["sum_bool"], (x > 0).sum(-1))
    assert torch.allclose(got["softmax"], x.softmax(1), atol=1e-6)
    assert torch.allclose(got["log_softmax"], F.log_softmax(x, 0), atol=1e-6)
    assert got["half_to_float"].dtype == torch.float32
    assert torch.allclose(got["half_to_float"], F.log_softmax(half.float(), 1), atol=1e-6)
    assert got["rms"].shape == x.shape


def test_coverage_names_protected_and_unprotected_ops() -> None:
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(3, 32)
    with batch_invariant(), torch.inference_mode(), coverage() as cov:
        h = lin(x).log_softmax(-1)
        F.layer_norm(h, (16,))
        F.scaled_dot_product_attention(h[None, None], h[None, None], h[None, None])
    assert cov.protected["aten::addmm"] == 1 and cov.protected["aten::_log_softmax"] == 1
    assert "aten::native_layer_norm" in cov.unprotected
    assert any("scaled_dot_product" in k for k in cov.unprotected)
    assert not cov.ok and json.loads(json.dumps(cov.to_dict()))["ok"] is False
    with torch.inference_mode(), coverage() as off:  # mode not installed: the matmul itself is unprotected
        lin(x)
    assert off.unprotected["aten::addmm"] == 1 and not off.protected


def test_rms_norm_api_matches_torch_and_is_invariant() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 96, generator=g).to(torch.bfloat16)
    r = torch.randn(40, 96, generator=g).to(torch.bfloat16)
    w = torch.randn(96, generator=g).to(torch.bfloat16)
    y = rms_norm(x, w, 1e-6)
    assert (y.float() - F.rms_norm(x.float(), (96,), w.float(), 1e-6)).abs().max() < 0.05
    assert torch.equal(rms_norm(x[7:9], w, 1e-6), y[7:9])
    normed, new_res = fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(new_res, x + r)
    assert torch.equal(normed, rms_norm(x + r, w, 1e-6))
    n1, r1 = fused_add_rms_norm(x[:1], r[:1], w, 1e-6)
    assert torch.equal(n1, normed[:1]) and torch.equal(r1, new_res[:1])


@pytest.mark.parametrize("gqa", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_paged_attention_cpu_correct_and_prefill_decode_invariant(gqa: int, dtype: torch.dtype) -> None:
    hkv, d, page = 2, 32, 16
    lens, qlens = [150, 20, 9], [150, 4, 1]
    g = torch.Generator().manual_seed(gqa)
    kc, vc, bt = paged_kv_cache(lens, hkv, d, page, dtype, g)
    q = torch.randn(sum(qlens), hkv * gqa, d, generator=g).to(dtype)
    scale = 1 / math.sqrt(d)

    def call(qq, tables, ql, ctx, inv=True, caches=(kc, vc)):
        cu = torch.tensor([0, *torch.tensor(ql).cumsum(0).tolist()], dtype=torch.int32)
        return paged_attention(
            qq, caches[0], caches[1], tables, cu, torch.tensor(ctx, dtype=torch.int32), scale, batch_invariant=inv
        )

    full = call(q, bt, qlens, lens)
    ref = call(q.double(), bt, qlens, lens, inv=False, caches=(kc.double(), vc.double()))
    assert not torch.isnan(full).any()
    assert (full.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
    for p in (0, 63, 64, 65, 149):  # token p of sequence 0 as a decode step alone == its row in the mixed prefill
        assert torch.equal(call(q[p : p + 1], bt[:1], [1], [p + 1]), full[p : p + 1]), p
    assert torch.equal(call(q[100:150], bt[:1], [50], [150]), full[100:150])  # chunked prefill
    assert torch.equal(call(q[150:154], bt[1:2], [4], [20]), full[150:154])  # alone vs beside others


def test_paged_attention_rejects_bad_shapes() -> None:
    q = torch.randn(3, 3, 8)
    kc = torch.randn(4, 16, 2, 8)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="GQA"):
        paged_attention(
            q,
            kc,
            kc,
            torch.zeros(1, 1, dtype=torch.int32),
            cu,
            torch.tensor([3], dtype=torch.int32),
            1.0,
            batch_invariant=True,
        )


def test_cli_probe_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    from detaudit.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["probe", "kernels", "--device", "tpu"])
    assert e.value.code == 2
    main(["probe", "kernels", "--device", "cpu", "--dtype", "fp32", "--quick", "--json"])
    out = json.loads(capsys.readouterr().out)
    ours = [r for r in out["rows"] if r["impl"] == "ours"]
    stock = [r for r in out["rows"] if r["impl"] == "stock"]
    assert ours and all(r["invariant"] for r in ours)
    assert any(not r["invariant"] for r in stock)
