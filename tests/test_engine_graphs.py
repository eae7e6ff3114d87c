"""The padded decode path that CUDA graphs replay, run eagerly on CPU: with bundled kernels it gives the same bits as
the unpadded step; buckets, the decode-only test, the reserved dummy block and the --cuda-graphs switch."""

from __future__ import annotations

import pytest
import torch
from engine_steps import HostReads, outputs, staggered
from hypothesis import given
from hypothesis import strategies as st

from detaudit.engine.graph_timing import cheapest_route
from detaudit.engine.graphs import DecodeGraphs, decode_buckets, is_decode_only
from detaudit.engine.llm import Engine, EngineConfig
from detaudit.engine.scheduler import ScheduledBatch
from detaudit.engine.sequence import SamplingParams, Sequence

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _engine(model, kernels: str) -> Engine:
    return Engine(
        EngineConfig(
            str(model),
            device="cpu",
            dtype="bfloat16",
            kernels=kernels,
            max_batch=6,
            max_model_len=128,
            max_batched_tokens=64,
        )
    )


def _staggered(eng: Engine) -> tuple[list[Sequence], list[int]]:
    """Decode steps of 1..6 sequences occur (3 and 5 pad to buckets 4 and 6) next to mixed prefill + decode steps;
    returns the sequences and the sizes of the steps that took the padded decode path."""
    return staggered(eng, 8, eng.runner.decode_graphs, lambda batch: len(batch.seqs))


def test_padded_decode_path_gives_the_same_bits_with_bundled_kernels(tiny_model_dir):
    """The graph path's input building and padding rows, run eagerly: logprobs, tokens and top-k bitwise equal."""
    plain = _engine(tiny_model_dir, "batch-invariant")
    assert plain.runner.decode_graphs is None  # CPU: eager and unpadded by default
    ref, no_sizes = _staggered(plain)
    padded = _engine(tiny_model_dir, "batch-invariant")
    padded.runner.decode_graphs = DecodeGraphs(padded.runner.paged_model, padded.cfg.max_batch, capture=False)
    got, sizes = _staggered(padded)
    assert not no_sizes
    assert {3, 5} <= set(sizes) and 1 in sizes  # padding rows were there (3 -> 4, 5 -> 6)
    for a, b in zip(ref, got, strict=True):
        assert a.output_ids == b.output_ids
        assert a.logprobs == b.logprobs  # bitwise
        assert a.top_ids == b.top_ids and a.top_logprobs == b.top_logprobs
    assert padded.graph_replays == 0  # nothing captured on CPU: the padded forward ran eagerly
    # Padding rows wrote only the dummy block: every block the block manager hands out holds the same bits.
    n = plain.scheduler.blocks.num_blocks
    layers = zip(plain.runner.paged_model.cache.layers, padded.runner.paged_model.cache.layers, strict=True)
    for (k0, v0), (k1, v1) in layers:
        assert torch.equal(k0[:n], k1[:n]) and torch.equal(v0[:n], v1[:n])
        assert not torch.equal(k0[n], k1[n])


def test_a_step_routed_to_a_larger_size_gives_the_same_bits_with_bundled_kernels(tiny_model_dir):
    """Replay times that make the largest size the cheapest send every decode step there (1 -> 6 rows, 5 padding
    rows): tokens, logprobs and top-k bitwise those of the unpadded engine."""
    ref, _ = _staggered(_engine(tiny_model_dir, "batch-invariant"))
    routed = _engine(tiny_model_dir, "batch-invariant")
    graphs = DecodeGraphs(routed.runner.paged_model, routed.cfg.max_batch, capture=False)
    graphs.route = cheapest_route({1: 4.0, 2: 4.0, 4: 3.5, 6: 3.0})
    routed.runner.decode_graphs = graphs
    ran_as: list[int] = []
    fill = graphs._fill
    graphs._fill = lambda seqs, bs: (ran_as.append(bs), fill(seqs, bs))  # type: ignore[method-assign]
    got, sizes = _staggered(routed)
    assert {1, 3, 5} <= set(sizes) and set(ran_as) == {6}
    assert outputs(got) == outputs(ref)  # bitwise


@given(st.dictionaries(st.integers(1, 4096), st.floats(0.01, 100.0), min_size=1, max_size=40))
def test_the_route_takes_the_fastest_size_that_holds_the_batch(times):
    route = cheapest_route(times)
    assert set(route) == set(times)
    for size, runs_as in route.items():
        holding = [s for s in times if s >= size]
        fastest = min(times[s] for s in holding)
        assert runs_as >= size and times[runs_as] == fastest
        assert runs_as == min(s for s in holding if times[s] == fastest)  # on a tie, the least padding
    assert cheapest_route({1: 1.0, 2: 2.0, 4: 3.0}) == {1: 1, 2: 2, 4: 4}  # times rising with size: no reroute


def test_padded_decode_path_runs_with_stock_kernels(tiny_model_dir):
    """Stock SDPA on CPU takes the padding rows (context 1 in the dummy block) too; tokens stay the model's."""
    padded = _engine(tiny_model_dir, "stock")
    padded.runner.decode_graphs = DecodeGraphs(padded.runner.paged_model, padded.cfg.max_batch, capture=False)
    seqs, sizes = _staggered(padded)
    assert sizes and all(len(s.output_ids) == s.params.max_tokens for s in seqs)
    ref, _ = _staggered(_engine(tiny_model_dir, "stock"))
    assert [s.output_ids for s in seqs] == [s.output_ids for s in ref]


def test_dummy_block_is_outside_the_block_managers_range(tiny_model_dir):
    eng = _engine(tiny_model_dir, "stock")
    n = eng.scheduler.blocks.num_blocks
    cache = eng.runner.paged_model.cache
    assert cache.dummy_block == n and cache.layers[0][0].shape[0] == n + 1
    taken = []
    while eng.scheduler.blocks.num_free:
        seq = Sequence([1], SamplingParams(max_tokens=15))
        eng.scheduler.blocks.grow(seq, 16)
        taken += seq.block_table
    assert sorted(taken) == list(range(n))


def test_buckets_and_decode_only():
    assert decode_buckets(1) == [1]
    assert decode_buckets(6) == [1, 2, 4, 6]
    assert decode_buckets(128) == [1, 2, 4, *range(8, 129, 8)]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    decoding = Sequence([5, 6], SamplingParams())
    decoding.output_ids = [7]
    decoding.num_cached = 2
    fresh = Sequence([5, 6], SamplingParams())
    one_token_prompt = Sequence([5], SamplingParams())
    scored = Sequence([5, 6], SamplingParams(max_tokens=0), score_only=True, score_from=1)
    scored.num_cached = 1
    assert is_decode_only(ScheduledBatch([decoding, one_token_prompt], [1, 1]))
    assert not is_decode_only(ScheduledBatch([decoding, fresh], [1, 2]))
    assert not is_decode_only(ScheduledBatch([decoding, fresh], [1, 1]))  # a 1-token chunk mid-prompt
    assert not is_decode_only(ScheduledBatch([scored], [1]))


def test_cuda_graphs_are_recorded_and_only_effective_on_cuda(tiny_model_dir):
    eng = Engine(EngineConfig(str(tiny_model_dir), device="cpu", dtype="float32", cuda_graphs=True))
    assert eng.info()["cuda_graphs"] is False and eng.info()["cuda_graph_sizes"] == []


def test_cuda_graphs_switch_is_refused_for_a_managed_engine(capsys):
    from detaudit.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["local", "--engine", "vllm", "--model", "m", "--prompt", "x", "--no-cuda-graphs"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs only appl" in err and "--engine detaudit" in err


# aten ops whose output size or value is only known after reading the device (a host sync, illegal in a capture).
@pytest.mark.parametrize("kernels", ["stock", "batch-invariant"])
def test_the_captured_forward_reads_nothing_back_from_the_device(tiny_model_dir, kernels):
    """What a decode graph records — embedding, RoPE, KV write, norms, projections, lm_head — asks the device for
    no value on the host. (Attention is left out: its CPU paths read lengths on the host; on CUDA it reads none,
    which tests/gpu checks by capturing it.)"""
    from detaudit.engine.config import kernel_context

    eng = _engine(tiny_model_dir, kernels)
    graphs = DecodeGraphs(eng.runner.paged_model, eng.cfg.max_batch, capture=False)
    graphs.attn_fn = lambda q, *_args: q.clone()
    graphs._fill([], 4)
    with torch.inference_mode(), kernel_context(kernels), HostReads() as reads:
        graphs._forward(4)
    assert reads.seen == []
    with HostReads() as control:  # the mode does see host reads
        torch.ones(3).sum().item()
        torch.ones(3)[torch.ones(3) > 0]
    assert control.seen == ["aten::_local_scalar_dense", "aten::index.Tensor"]
