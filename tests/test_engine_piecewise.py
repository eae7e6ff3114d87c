"""The padded piecewise path that prefill CUDA graphs replay, run eagerly on CPU: with bundled kernels it gives the
same bits as the unpadded engine (generation with chunked prefill and mixed steps, and teacher-forced scoring);
buckets; and the captured pieces read nothing back from the device."""

from __future__ import annotations

import pytest
import torch
from engine_steps import TEXTS, HostReads, outputs, staggered

from detaudit.engine.graphs import DecodeGraphs
from detaudit.engine.llm import Engine, EngineConfig
from detaudit.engine.piecewise import PiecewiseGraphs, token_buckets
from detaudit.engine.sequence import Sequence

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _engine(model, kernels: str, *, piecewise: bool) -> Engine:
    """max_batched_tokens 40: prompts (about 15-20 tokens with the chat template) are chunked and share steps
    with decodes, so step sizes vary and pad to buckets 16, 24, 32 and 40."""
    eng = Engine(
        EngineConfig(
            str(model),
            device="cpu",
            dtype="bfloat16",
            kernels=kernels,
            max_batch=6,
            max_model_len=128,
            max_batched_tokens=40,
        )
    )
    assert eng.runner.prefill_graphs is None  # CPU: eager and unpadded by default
    if piecewise:
        eng.runner.prefill_graphs = PiecewiseGraphs(eng.runner.paged_model, eng.cfg.max_batched_tokens, capture=False)
        eng.runner.decode_graphs = DecodeGraphs(eng.runner.paged_model, eng.cfg.max_batch, capture=False)
    return eng


def _staggered(eng: Engine) -> tuple[list[Sequence], list[int]]:
    """One arrival a step; returns the sequences and the real token counts of the steps run piecewise."""
    return staggered(eng, 6, eng.runner.prefill_graphs, lambda ids, *_: len(ids))


def test_padded_piecewise_path_gives_the_same_bits_with_bundled_kernels(tiny_model_dir):
    """Piecewise pieces over padded rows + attention on the real rows, run eagerly: logprobs, tokens and top-k
    bitwise those of the unpadded engine, and every block the block manager owns holds the same K/V bits."""
    plain = _engine(tiny_model_dir, "batch-invariant", piecewise=False)
    ref, no_sizes = _staggered(plain)
    padded = _engine(tiny_model_dir, "batch-invariant", piecewise=True)
    got, sizes = _staggered(padded)
    assert not no_sizes and len(sizes) >= 4
    buckets = padded.runner.prefill_graphs.buckets
    assert buckets == [16, 24, 32, 40]
    assert any(s not in buckets for s in sizes) and any(s > 16 for s in sizes)  # padding rows were there
    for a, b in zip(ref, got, strict=True):
        assert a.output_ids == b.output_ids
        assert a.logprobs == b.logprobs  # bitwise
        assert a.top_ids == b.top_ids and a.top_logprobs == b.top_logprobs
    assert padded.graph_replays == 0 and padded.prefill_graph_replays == 0  # CPU: nothing captured, ran eagerly
    n = plain.scheduler.blocks.num_blocks
    layers = zip(plain.runner.paged_model.cache.layers, padded.runner.paged_model.cache.layers, strict=True)
    for (k0, v0), (k1, v1) in layers:
        assert torch.equal(k0[:n], k1[:n]) and torch.equal(v0[:n], v1[:n])
        assert not torch.equal(k0[n], k1[n])  # the padding rows wrote the dummy block


def test_a_step_routed_to_a_larger_token_bucket_gives_the_same_bits_with_bundled_kernels(tiny_model_dir):
    """Every step with prefill sent to the largest bucket (as a measured route would when it replays fastest):
    tokens, logprobs and top-k bitwise those of the unpadded engine."""
    from detaudit.engine.graph_timing import cheapest_route

    ref, _ = _staggered(_engine(tiny_model_dir, "batch-invariant", piecewise=False))
    routed = _engine(tiny_model_dir, "batch-invariant", piecewise=True)
    graphs = routed.runner.prefill_graphs
    graphs.route = cheapest_route({b: 1.0 for b in graphs.buckets})  # all equal: ties go to the smaller...
    assert graphs.route == {b: b for b in graphs.buckets}
    graphs.route = cheapest_route({16: 3.0, 24: 3.0, 32: 2.5, 40: 2.0})  # ...and the largest cheapest takes all
    assert set(graphs.route.values()) == {40}
    got, sizes = _staggered(routed)
    assert any(s < 24 for s in sizes)
    assert outputs(got) == outputs(ref)  # bitwise


def test_steps_held_to_a_faster_graph_size_give_the_same_bits_with_bundled_kernels(tiny_model_dir):
    """StepFit on the padded path, with replay times that make 16 tokens the fastest size per token (each far
    longer than a CPU step, so the measured overhead is 0): prompt tokens are held back so that no step with prefill
    holds more than 16 tokens once a step has been measured, and the tokens, logprobs and top-k are bitwise those of
    the unpadded engine that fills every step."""
    from detaudit.engine.scheduler import StepFit

    ref, _ = _staggered(_engine(tiny_model_dir, "batch-invariant", piecewise=False))
    fitted = _engine(tiny_model_dir, "batch-invariant", piecewise=True)
    graphs = fitted.runner.prefill_graphs
    graphs.replay_ms = {16: 10_000.0, 24: 30_000.0, 32: 32_000.0, 40: 34_000.0}
    fitted.step_fit = fitted.scheduler.fit = StepFit(graphs.buckets, graphs.cost_ms)
    got, sizes = _staggered(fitted)
    assert fitted.step_fit.overhead_ms == 0.0
    assert sizes[0] > 16 and all(s <= 16 for s in sizes[1:]) and fitted.fitted_steps >= 3
    assert outputs(got) == outputs(ref)  # bitwise


def test_piecewise_scoring_gives_the_same_bits_with_bundled_kernels(tiny_model_dir):
    """Teacher-forced scoring (rescore) through the padded piecewise path: every logprob bitwise the same."""
    plain = _engine(tiny_model_dir, "batch-invariant", piecewise=False)
    padded = _engine(tiny_model_dir, "batch-invariant", piecewise=True)
    pairs = [
        (plain.encode_chat([{"role": "user", "content": t}]), [5, 9, 14, 3][: 1 + i % 4])
        for i, t in enumerate(TEXTS[:3])
    ]
    ref, got = plain.score(pairs), padded.score(pairs)
    assert all(len(r) == len(c) for r, (_, c) in zip(ref, pairs, strict=True))
    assert ref == got


def test_padded_piecewise_path_runs_with_stock_kernels(tiny_model_dir):
    """Stock kernels take the padded path too; on this CPU at these shapes the greedy tokens stay the model's."""
    seqs, sizes = _staggered(_engine(tiny_model_dir, "stock", piecewise=True))
    assert sizes and all(len(s.output_ids) == s.params.max_tokens for s in seqs)
    ref, _ = _staggered(_engine(tiny_model_dir, "stock", piecewise=False))
    assert [s.output_ids for s in seqs] == [s.output_ids for s in ref]


def test_no_graphs_off_cuda(tiny_model_dir):
    info = _engine(tiny_model_dir, "stock", piecewise=False).info()
    assert info["cuda_graph_token_sizes"] == [] and info["cuda_graph_stats"] is None


def test_token_buckets():
    assert token_buckets(16) == [16]
    assert token_buckets(40) == [16, 24, 32, 40]
    assert token_buckets(2048) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert token_buckets(300) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 300]
    assert token_buckets(8) == [8]


@pytest.mark.parametrize("kernels", ["stock", "batch-invariant"])
def test_the_captured_pieces_read_nothing_back_from_the_device(tiny_model_dir, kernels):
    """Every piece a prefill graph records (embedding, RoPE, norms, projections, KV write, MLP) asks the device
    for no value on the host, so capture cannot fail on a sync; attention, between pieces, is not captured."""
    from detaudit.engine.config import kernel_context

    eng = _engine(tiny_model_dir, kernels, piecewise=True)
    graphs = eng.runner.prefill_graphs
    with torch.inference_mode(), kernel_context(kernels), HostReads() as reads:
        for i in range(graphs.model.num_pieces):
            graphs._piece(i, 32)
    assert reads.seen == []
