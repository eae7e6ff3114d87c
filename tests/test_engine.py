"""The local engine on tiny CPU models: HF parity, batch invariance with bundled kernels, decode == re-prefill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from detaudit.engine.llm import Engine, EngineConfig
from detaudit.engine.sequence import SamplingParams, Sequence
from detaudit.tiny import ARCHS, MOE_ARCHS

PROMPT = [{"role": "user", "content": "def fibonacci(n):"}]
OTHERS = ["import os", "class Vector:\n    def __init__(self, x, y):", "Tell me about Richard Feynman " * 6, "x = 1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from detaudit.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("engine-archs")
    dirs = {a: build_tiny_model(root / a, a, seed=1) for a in ARCHS}
    # Llama 3's scaled RoPE, in the config.json form hub checkpoints have (rope_scaling + top-level rope_theta).
    dirs["llama3-rope"] = root / "llama3-rope"
    shutil.copytree(dirs["llama"], dirs["llama3-rope"])
    cfg = json.loads((dirs["llama"] / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    (dirs["llama3-rope"] / "config.json").write_text(json.dumps(cfg))
    # Qwen3-MoE with dense layers among the sparse ones: decoder_sparse_step 2 and mlp_only_layers [3] leave only
    # layer 1 sparse (layers 0, 2 and 3 have a dense MLP of intermediate_size).
    from transformers import AutoConfig, AutoModelForCausalLM

    moe_cfg = AutoConfig.from_pretrained(dirs["qwen3-moe"])
    moe_cfg.decoder_sparse_step, moe_cfg.mlp_only_layers = 2, [3]
    dirs["qwen3-moe-dense-layers"] = root / "qwen3-moe-dense-layers"
    shutil.copytree(dirs["qwen3-moe"], dirs["qwen3-moe-dense-layers"], ignore=shutil.ignore_patterns("*.safetensors"))
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(moe_cfg).save_pretrained(dirs["qwen3-moe-dense-layers"])
    return dirs


def _engine(model: Path, kernels: str = "stock", dtype: str = "bfloat16", **kw) -> Engine:
    cfg = dict(max_batch=8, max_model_len=256, max_batched_tokens=64)
    cfg.update(kw)
    return Engine(EngineConfig(str(model), device="cpu", dtype=dtype, kernels=kernels, **cfg))


@pytest.mark.parametrize("arch", [*ARCHS, "llama3-rope", "qwen3-moe-dense-layers"])
def test_matches_transformers_fp32(arch_dirs, arch):
    """Own model code == the transformers module: same greedy tokens, logprobs within fp32 noise."""
    from transformers import AutoModelForCausalLM

    eng = _engine(arch_dirs[arch], dtype="float32")
    if arch in MOE_ARCHS or arch.startswith("qwen3-moe"):
        assert eng.spec.moe_layers == ({1} if arch == "qwen3-moe-dense-layers" else set(range(4)))
    ids = eng.encode_chat(PROMPT)
    seq = eng.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True, top_logprobs=3))[0]
    hf = AutoModelForCausalLM.from_pretrained(arch_dirs[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ids + seq.output_ids])).logits[0].float(), -1)
    rows = lp[len(ids) - 1 : -1]
    assert rows.argmax(-1).tolist() == seq.output_ids
    ref = rows.gather(1, torch.tensor(seq.output_ids)[:, None])[:, 0]
    assert torch.allclose(ref, torch.tensor(seq.logprobs), atol=1e-4)
    assert seq.top_ids[0][0] == seq.output_ids[0] and len(seq.top_ids[0]) == 3


def _alone_and_in_batch(model: Path, kernels: str) -> tuple[Sequence, list[Sequence]]:
    """The target request alone, then among others arriving over time under several token budgets, which cut
    its prompt into chunks at different places (as load does on a server). No prefix cache: every run of the target
    computes its whole prompt (with it, the later runs start past the first run's blocks; test_prefix_cache.py)."""
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eng = _engine(model, kernels, prefix_cache=False)
    target = eng.encode_chat(PROMPT)
    alone = eng.generate([target], params)[0]
    others = [eng.encode_chat([{"role": "user", "content": t}]) for t in OTHERS]
    in_batch = []
    for budget in (24, 40, 64):
        eng.scheduler.max_batched_tokens = budget
        eng.add(Sequence(others[0], params))
        eng.add(Sequence(others[2], params))
        eng.step()
        eng.step()
        eng.add(Sequence(others[1], params))
        in_batch.append(eng.add(Sequence(target, params)))
        eng.add(Sequence(others[3], params))
        while eng.scheduler.has_work():
            eng.step()
    return alone, in_batch


def test_alone_vs_in_batch_bitwise_with_bundled_kernels(tiny_model_dir):
    alone, in_batch = _alone_and_in_batch(tiny_model_dir, "batch-invariant")
    for seq in in_batch:
        assert seq.output_ids == alone.output_ids
        assert seq.logprobs == alone.logprobs  # every step, bitwise


def _decode_vs_prefill(model: Path, kernels: str) -> tuple[list[float], list[float]]:
    eng = _engine(model, kernels, max_batched_tokens=256)
    prompts = [eng.encode_chat(PROMPT)] + [eng.encode_chat([{"role": "user", "content": t}]) for t in OTHERS]
    seqs = eng.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    rescored = eng.score([(s.prompt_ids, s.output_ids) for s in seqs])
    return [lp for s in seqs for lp in s.logprobs], [lp for r in rescored for lp in r]


def test_decode_logprobs_equal_prefill_recompute_bitwise(tiny_model_dir):
    decoded, prefilled = _decode_vs_prefill(tiny_model_dir, "batch-invariant")
    assert decoded == prefilled


def test_stock_kernels_are_sensitive(tiny_model_dir):
    """Negative control: with stock SDPA the same checks see different bits, so the two tests above can fail."""
    decoded, prefilled = _decode_vs_prefill(tiny_model_dir, "stock")
    assert decoded != prefilled
    assert max(abs(a - b) for a, b in zip(decoded, prefilled, strict=True)) < 0.1  # same model, just other bits
    alone, in_batch = _alone_and_in_batch(tiny_model_dir, "stock")
    assert any(seq.logprobs != alone.logprobs for seq in in_batch)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model_dir):
    eng = _engine(tiny_model_dir, "batch-invariant")
    ids = eng.encode_chat(PROMPT)
    hot = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    a = eng.generate([ids], hot)[0]
    b, _, _ = eng.generate([ids, eng.encode_chat([{"role": "user", "content": OTHERS[1]}]), ids[:5]], hot)
    c = eng.generate([ids], SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True))[0]
    greedy = eng.generate([ids], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert a.output_ids == b.output_ids
    assert c.output_ids != a.output_ids and greedy.output_ids != a.output_ids


def test_stop_on_eos_and_length(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    ids = eng.encode_chat(PROMPT)
    free = eng.generate([ids], SamplingParams(max_tokens=5))[0]
    assert free.finish_reason == "length" and len(free.output_ids) == 5
    stop_at = free.output_ids[2]
    stopped = eng.generate([ids], SamplingParams(max_tokens=5, stop_token_ids=(stop_at,)))[0]
    assert stopped.finish_reason == "stop" and stopped.output_ids[-1] == stop_at
    assert len(stopped.output_ids) == free.output_ids.index(stop_at) + 1


def test_a_broken_model_directory_is_a_usage_error_not_an_internal_one(tiny_model_dir, tmp_path):
    """Corrupt config.json / safetensors / tokenizer and a file for a directory were tracebacks (exit 70)."""
    from detaudit.errors import UsageError

    def broken(name: str, damage) -> str:
        path = tmp_path / name
        shutil.copytree(tiny_model_dir, path)
        damage(path)
        return str(path)

    cases = {
        broken("config", lambda p: (p / "config.json").write_text("{bad")): "config.json: not valid JSON",
        broken("weights", lambda p: (p / "model.safetensors").write_bytes(b"junk")): "unreadable safetensors",
        broken("tokenizer", lambda p: (p / "tokenizer.json").unlink()): "cannot load its tokenizer",
        str(tiny_model_dir / "config.json"): "is not a directory",
    }
    for model, message in cases.items():
        with pytest.raises(UsageError, match=message):
            Engine(EngineConfig(model, dtype="float32"))


def test_a_kv_cache_that_cannot_be_allocated_is_a_usage_error(tiny_model_dir):
    """--max-batch 1e11 was an internal error (DefaultCPUAllocator: can't allocate memory)."""
    from detaudit.errors import UsageError

    with pytest.raises(UsageError, match="does not fit in cpu memory"):
        Engine(EngineConfig(str(tiny_model_dir), dtype="float32", max_batch=10**11, max_batched_tokens=10**11))


def test_too_few_kv_blocks_for_one_sequence_is_a_usage_error(tiny_model_dir):
    """Preemption makes room by taking blocks back; a sequence that cannot fit alone could never run."""
    from detaudit.errors import UsageError

    with pytest.raises(UsageError, match="--kv-blocks 15 cannot hold one sequence of --max-model-len 256"):
        _engine(tiny_model_dir, kv_blocks=15)
    assert _engine(tiny_model_dir, kv_blocks=16).info()["kv_blocks"] == 16


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_moe_alone_vs_in_batch_and_decode_vs_prefill_bitwise(arch_dirs, arch):
    """Mixture-of-Experts layers with bundled kernels: per-step logprobs alone == in a batch, decode == re-prefill,
    bitwise, though the batch changes how many tokens each expert gets; stock kernels see other bits."""
    alone, in_batch = _alone_and_in_batch(arch_dirs[arch], "batch-invariant")
    for seq in in_batch:
        assert seq.output_ids == alone.output_ids and seq.logprobs == alone.logprobs
    decoded, prefilled = _decode_vs_prefill(arch_dirs[arch], "batch-invariant")
    assert decoded == prefilled
    stock_alone, stock_in_batch = _alone_and_in_batch(arch_dirs[arch], "stock")
    assert any(seq.logprobs != stock_alone.logprobs for seq in stock_in_batch)


def test_moe_weights_drawn_at_load(tmp_path, capsys):
    """`tiny-model --weights-at-load` writes no weights; the engine draws the same seeded ones at every load."""
    from detaudit.cli.app import main

    path = tmp_path / "m"
    main(["tiny-model", str(path), "--arch", "qwen3-moe", "--seed", "5", "--weights-at-load"])
    assert "weights drawn at load" in capsys.readouterr().out
    assert not list(path.glob("*.safetensors")) and (path / "config.json").is_file()
    runs = []
    for _ in range(2):
        eng = _engine(path, "batch-invariant")
        runs.append(eng.generate([eng.encode_chat(PROMPT)], SamplingParams(max_tokens=6, ignore_eos=True))[0])
    assert runs[0].output_ids == runs[1].output_ids and runs[0].logprobs == runs[1].logprobs
    assert eng.spec.num_experts == 8 and eng.spec.moe_layers == frozenset(range(4))
