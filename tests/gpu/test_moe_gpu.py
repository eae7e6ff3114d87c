"""GPU proof of the Mixture-of-Experts op and engine (run on the H200; skipped without CUDA): the Triton grouped
GEMMs' batch-invariant path gives a token the same bits in every batch, the stock path does not, both can be
captured in a CUDA graph, and a tiny Qwen3-MoE engine keeps its bits alone vs in a batch and across graph replay.

Needs no conftest fixture (runs with --noconftest): the tiny model is built here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# A Qwen3-30B-A3B layer's expert count, top-k and widths, at half its hidden size to keep the test quick.
E, K, H, INTER = 128, 8, 1024, 768
SIZES = (1, 2, 3, 7, 16, 17, 33, 64, 65, 128, 255, 512, 1024, 2048)


def _weights(dtype: torch.dtype, tokens: int = 2048) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, H, device="cuda", generator=g).to(dtype)
    router = (torch.randn(E, H, device="cuda", generator=g) * H**-0.5).to(dtype)
    w13 = (torch.randn(E, 2 * INTER, H, device="cuda", generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, INTER, device="cuda", generator=g) * INTER**-0.5).to(dtype)
    return x, router, w13, w2


def _reference(
    x: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The MoE block in float64 (transformers' Qwen3-MoE math), token by token over its top-k experts, or over the
    experts `ids` a path chose (a bf16 router can pick another expert on a near-tie: by design, not an error of
    the expert GEMMs this checks)."""
    x, router, w13, w2 = (t.double() for t in (x, router, w13, w2))
    probs = torch.softmax(x @ router.t(), -1)
    if ids is None:
        weights, ids = torch.topk(probs, K, -1)
    else:
        weights = probs.gather(-1, ids)
    weights = weights / weights.sum(-1, keepdim=True)
    h = torch.einsum("tkoh,th->tko", w13[ids], x)
    act = F.silu(h[..., :INTER]) * h[..., INTER:]
    return (torch.einsum("tkhi,tki->tkh", w2[ids], act) * weights[..., None]).sum(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bundled_moe_is_batch_invariant_and_stock_is_not(dtype: torch.dtype) -> None:
    from detaudit.kernels.moe import moe_forward, route

    x, router, w13, w2 = _weights(dtype)
    probe = [0, 1, 5, 16, 17]

    def run(rows: torch.Tensor, bi: bool) -> torch.Tensor:
        return moe_forward(rows, router, w13, w2, K, True, batch_invariant=bi)

    for bi in (True, False):
        # float64 [16, k, 2I, H] gathers: a few GB. The stock router runs in the model dtype, so stock is checked
        # against its own expert choice (against the float64 routing it was 7 % off on the H200 in bf16, as a
        # near-tie expert picked by a bf16 router would make it; not re-run on a GPU since).
        ids = None if bi else route(x[:16], router, K, True, batch_invariant=False)[0]
        ref = _reference(x[:16], router, w13, w2, ids)
        err = float((run(x[:16], bi).double() - ref).norm() / ref.norm())
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), (bi, err)
    alone = {p: run(x[p : p + 1], True) for p in probe}
    stock_alone = {p: run(x[p : p + 1], False) for p in probe}
    stock_differs = 0
    for m in SIZES:
        if m <= max(probe):
            continue
        out, stock = run(x[:m], True), run(x[:m], False)
        for p in probe:
            assert torch.equal(out[p : p + 1], alone[p]), (m, p)
            stock_differs += not torch.equal(stock[p : p + 1], stock_alone[p])
    print(f"{dtype}: stock rows differing alone vs in a batch: {stock_differs}")
    assert stock_differs > 0  # negative control: split-K and tiles follow the load


@pytest.mark.parametrize("bi", [True, False], ids=["bi", "stock"])
def test_moe_captures_in_a_cuda_graph(bi: bool) -> None:
    """No host read of device values: both paths replay from a graph with the eager bits."""
    from detaudit.kernels.moe import moe_forward

    x, router, w13, w2 = _weights(torch.bfloat16, tokens=96)
    eager = moe_forward(x, router, w13, w2, K, True, batch_invariant=bi)
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe_forward(static, router, w13, w2, K, True, batch_invariant=bi)  # warm-up off the default stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_forward(static, router, w13, w2, K, True, batch_invariant=bi)
    static.copy_(x.flip(0))
    graph.replay()
    assert torch.equal(out, moe_forward(x.flip(0), router, w13, w2, K, True, batch_invariant=bi))
    static.copy_(x)
    graph.replay()
    assert torch.equal(out, eager)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detaudit.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gpu-moe") / "qwen3-moe", "qwen3-moe", dtype="bfloat16")


def _engine(model: Path, kernels: str, graphs: bool):  # noqa: ANN202
    from detaudit.engine.llm import Engine, EngineConfig

    return Engine(
        EngineConfig(
            str(model),
            device="cuda",
            dtype="bfloat16",
            kernels=kernels,
            max_batch=8,
            max_batched_tokens=128,
            max_model_len=512,
            cuda_graphs=graphs,
        )
    )


def test_moe_engine_alone_vs_in_batch_and_graphs_bitwise(moe_dir: Path) -> None:
    from detaudit.engine.sequence import SamplingParams, Sequence

    params = SamplingParams(max_tokens=24, ignore_eos=True)
    texts = ["def fibonacci(n):", "import os", "Tell me about Richard Feynman " * 4, "x = 1", "class Vector:"]
    results = {}
    for name, graphs in (("graphs", True), ("eager", False)):
        eng = _engine(moe_dir, "batch-invariant", graphs)
        target = eng.encode_chat([{"role": "user", "content": texts[0]}])
        alone = eng.generate([target], params)[0]
        seqs = []
        for text in texts[1:]:
            eng.add(Sequence(eng.encode_chat([{"role": "user", "content": text}]), params))
            eng.step()
        seqs.append(eng.add(Sequence(target, params)))
        while eng.scheduler.has_work():
            eng.step()
        assert seqs[0].output_ids == alone.output_ids and seqs[0].logprobs == alone.logprobs, name
        rescored = eng.score([(alone.prompt_ids, alone.output_ids)])[0]
        assert rescored == alone.logprobs, name  # decode == re-prefill
        results[name] = alone.logprobs
    assert results["graphs"] == results["eager"]
