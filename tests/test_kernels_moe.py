"""The Mixture-of-Experts op (detaudit.kernels.moe): batch invariance of its bundled path on CPU, the stock path's
load dependence, correctness against a float64 reference, top-k ties, coverage; the Triton kernels' logic under
TRITON_INTERPRET=1 (fp32: the interpreter cannot do bf16 ``tl.dot``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from detaudit.kernels import batch_invariant, coverage
from detaudit.kernels.moe import moe, moe_forward, route
from interp import INTERPRETED, fixed_order_dot, inner, run_file_under_interpreter  # tests/ is on sys.path

if INTERPRETED:
    fixed_order_dot()  # tokens' rows move between expert tiles with the batch: see tests/interp.py

E, H, INTER, K = 8, 256, 128, 2


def _weights(dtype: torch.dtype, hidden: int = H, inter: int = INTER, tokens: int = 40) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    router = (torch.randn(E, hidden, generator=g) / hidden**0.5).to(dtype)
    w13 = (torch.randn(E, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(E, hidden, inter, generator=g) / inter**0.5).to(dtype)
    return x, router, w13, w2


def _reference(x: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen3-MoE block in float64: softmax, top-k, renormalise, per-expert SwiGLU, weighted sum."""
    x, router, w13, w2 = (t.double() for t in (x, router, w13, w2))
    probs = torch.softmax(x @ router.t(), -1)
    weights, ids = torch.topk(probs, K, -1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(K):
            gate, up = (w13[ids[t, j]] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w2[ids[t, j]] @ (F.silu(gate) * up))
    return out


def _alone_vs_batch(dtype: torch.dtype, bi: bool) -> int:
    """Rows whose bits differ between the whole batch and the row alone (every expert then sees one token)."""
    x, router, w13, w2 = _weights(dtype)
    full = moe_forward(x, router, w13, w2, K, True, batch_invariant=bi)
    alone = torch.cat([moe_forward(x[i : i + 1], router, w13, w2, K, True, batch_invariant=bi) for i in range(40)])
    assert _rel(full, _reference(x, router, w13, w2)) < (1e-6 if dtype == torch.float32 else 2e-2)
    return int((alone != full).any(1).sum())


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


@pytest.mark.skipif(INTERPRETED, reason="CPU path; the interpreter run is for the Triton kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_bundled_path_is_invariant_and_stock_is_not(dtype: torch.dtype) -> None:
    assert _alone_vs_batch(dtype, bi=True) == 0
    # Negative control: alone, every expert gets one token and the stock path splits K; in the batch it does not.
    assert _alone_vs_batch(dtype, bi=False) > 20


@pytest.mark.skipif(INTERPRETED, reason="CPU path")
def test_top_k_ties_go_to_the_lowest_expert_index() -> None:
    # Small integers: every logit is exact in any summation order, so tied experts tie to the bit whichever column
    # of the GEMM computes them (torch's CPU GEMM may round a column by its place: seen on AMD EPYC).
    x = torch.randint(-3, 4, (5, 16), generator=torch.Generator().manual_seed(1)).float() / 8
    router = torch.randint(-3, 4, (6, 16), generator=torch.Generator().manual_seed(2)).float() / 8
    router[[1, 3, 4]] = router[5].clone()  # experts 1, 3, 4 and 5 score exactly alike for every token
    router[[0, 2]] = -10 * router[5]  # and two far below them
    ids, weights = route(x, router, 3, True, batch_invariant=True)
    plus = (x @ router[5]) > 0  # the tied experts lead when their shared score is positive
    assert 0 < int(plus.sum()) < 5
    assert ids[plus].tolist() == [[1, 3, 4]] * int(plus.sum())
    tied = weights[plus]
    assert torch.equal(tied[:, 0], tied[:, 1]) and torch.equal(tied[:, 1], tied[:, 2])
    assert torch.allclose(tied, torch.full_like(tied, 1 / 3), rtol=0, atol=1e-7)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32


@pytest.mark.skipif(INTERPRETED, reason="CPU path")
def test_the_op_switches_with_batch_invariant_and_shows_in_coverage() -> None:
    x, router, w13, w2 = _weights(torch.bfloat16)
    with torch.inference_mode(), coverage() as off:
        stock = moe(x[:3], router, w13, w2, K, True)
    with batch_invariant(), torch.inference_mode(), coverage() as on:
        bi = moe(x[:3], router, w13, w2, K, True)
    assert off.unprotected["detaudit::moe"] == 1 and not off.protected
    assert on.protected["detaudit::moe"] == 1 and on.ok
    assert torch.equal(stock, moe_forward(x[:3], router, w13, w2, K, True, batch_invariant=False))
    assert torch.equal(bi, moe_forward(x[:3], router, w13, w2, K, True, batch_invariant=True))
    with pytest.raises(ValueError, match="moe: x"):
        moe_forward(x[:, :8], router, w13, w2, K, True, batch_invariant=True)


# ---- Triton kernels under the interpreter ---------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="this is the outer run")
def test_triton_kernels_under_interpreter() -> None:
    pytest.importorskip("triton")
    run_file_under_interpreter(__file__, passed=4)


@inner
def test_triton_grouped_experts_match_the_reference_and_cpu_path() -> None:
    from detaudit.kernels import triton_moe

    x, router, w13, w2 = _weights(torch.float32, hidden=64, inter=32, tokens=12)
    ids, weights = route(x, router, K, True, batch_invariant=True)
    ref = _reference(x, router, w13, w2)
    for bi in (True, False):
        y = triton_moe.experts(x, ids, w13, w2, batch_invariant=bi)
        out = (y.double() * weights[..., None].double()).sum(1)
        assert _rel(out, ref) < 1e-5, bi
    # The padded layout: every pair once, grouped by expert in stable order, runs padded to BLOCK_M.
    sorted_pairs, block_expert = triton_moe.align(ids, E, 16)
    real = sorted_pairs[sorted_pairs < ids.numel()]
    assert sorted(real.tolist()) == list(range(ids.numel()))
    assert ids.reshape(-1)[real].tolist() == sorted(ids.reshape(-1).tolist())
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_pairs[b * 16 : (b + 1) * 16]
        rows = rows[rows < ids.numel()]
        assert (e == -1) == (len(rows) == 0) and all(ids.reshape(-1)[rows] == e)


@inner
def test_triton_bundled_path_rows_do_not_depend_on_the_batch() -> None:
    """A token alone vs in the batch: its pair rows land elsewhere in their experts' tiles (see tests/interp.py's
    caveat: the interpreter's numpy BLAS could round by position; the GPU test checks it on the device too)."""
    from detaudit.kernels import triton_moe

    # 6 tokens an expert: no split-K in the batch; alone, K = 128 splits in two halves of two BLOCK_K steps each
    x, router, w13, w2 = _weights(torch.float32, hidden=128, inter=32, tokens=24)
    ids, _ = route(x, router, K, True, batch_invariant=True)
    full = triton_moe.experts(x, ids, w13, w2, batch_invariant=True)
    for t in (0, 11, 23):
        alone = triton_moe.experts(x[t : t + 1], ids[t : t + 1], w13, w2, batch_invariant=True)
        assert torch.equal(alone[0], full[t]), t
    stock_full = triton_moe.experts(x, ids, w13, w2, batch_invariant=False)
    stock_alone = [triton_moe.experts(x[t : t + 1], ids[t : t + 1], w13, w2, batch_invariant=False) for t in range(4)]
    assert any(not torch.equal(a[0], stock_full[t]) for t, a in enumerate(stock_alone))  # split-K alone


@inner
def test_triton_router_matches_the_cpu_router_and_breaks_ties_low() -> None:
    """The one-kernel router: the CPU path's experts and weights (fp32 here), a token's choice alone equal to its
    choice in the batch, and on an exact tie the lowest expert index, as the stable sort gives."""
    from detaudit.kernels import triton_moe

    x, router, _, _ = _weights(torch.float32, hidden=96, tokens=37)  # H not a multiple of BLOCK_H, T of BLOCK_T
    for renormalize in (True, False):
        ids, weights = triton_moe.route(x, router, 3, renormalize)
        cpu_ids, cpu_weights = route(x, router, 3, renormalize, batch_invariant=True)
        assert torch.equal(ids, cpu_ids) and weights.dtype == torch.float32
        torch.testing.assert_close(weights, cpu_weights, rtol=1e-5, atol=1e-6)
    ids, weights = triton_moe.route(x, router, K, True)
    for t in (0, 17, 36):
        alone = triton_moe.route(x[t : t + 1], router, K, True)
        assert torch.equal(alone[0][0], ids[t]) and torch.equal(alone[1][0], weights[t]), t
    tied = torch.zeros(E, 96)
    tied[[2, 5, 6], 0] = 1.0  # experts 2, 5 and 6 tie on top; then the five zero logits tie
    got, w = triton_moe.route(torch.ones(1, 96), tied, 4, True)
    assert got.tolist() == [[2, 5, 6, 0]] and float(w.sum()) == pytest.approx(1.0)


@inner
def test_triton_combine_sums_the_slots_in_fp32() -> None:
    from detaudit.kernels import triton_moe
    from detaudit.kernels.moe import combine

    g = torch.Generator().manual_seed(1)
    y = torch.randn(5, K + 1, 300, generator=g)
    weights = torch.rand(5, K + 1, generator=g)
    out = triton_moe.combine(y, weights, torch.float32)
    torch.testing.assert_close(out, combine(y, weights, torch.float32), rtol=1e-6, atol=1e-6)
    assert torch.equal(triton_moe.combine(y[2:3], weights[2:3], torch.float32), out[2:3])
