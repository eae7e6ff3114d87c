"""`detaudit local` on a tiny Qwen3-MoE under the mixed scenario: stock kernels fork, the bundled ones do not.

The model is the tiny qwen3-moe (8 experts, top-2) cut to its first 2 layers (config.json's num_hidden_layers; the
engine loads only the layers the config names) to keep the two 200-request runs quick on a 2-core CPU. Seed 3
forks the most under stock kernels, at 12 tokens (4 distinct completions) and at 16 (6); seeds 0-4 at 16 tokens
gave 2, 1, 1, 6, 2 with stock kernels, and 1 with the bundled ones (seeds 3 and 4 run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detaudit.cli.app import main
from detaudit.rundir.io import load_manifest, read_samples

N = 200
MAX_TOKENS = 16
SEED = 3
ARGS = [
    "--prompt",
    "Tell me about Richard Feynman",
    "-n",
    str(N),
    "--scenario",
    "mixed",
    "--max-tokens",
    str(MAX_TOKENS),
    "--max-batch",
    "16",
    "--max-batched-tokens",
    "32",
    "--dtype",
    "bfloat16",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(root: Path) -> Path:
    from detaudit.tiny import build_tiny_model

    path = build_tiny_model(root / "qwen3-moe", "qwen3-moe", seed=SEED)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    return path


def _run(model: Path, out: Path, kernels: str) -> dict:
    main(["local", "--model", str(model), "--kernels", kernels, "--out", str(out), "--json", *ARGS])
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_moe_mixed_load_stock_forks_batch_invariant_does_not(tmp_path, capsys):
    model = _model(tmp_path)
    stock = _run(model, tmp_path / "stock", "stock")
    bi = _run(model, tmp_path / "bi", "batch-invariant")
    capsys.readouterr()
    assert stock["prompts"][0]["arms"][0]["unique"] > 1  # negative control: the same load forks with stock kernels
    assert bi["prompts"][0]["arms"][0]["unique"] == 1
    assert bi["prompts"][0]["verdict"] == "deterministic"
    for out, kernels in ((tmp_path / "stock", "stock"), (tmp_path / "bi", "batch-invariant")):
        manifest = load_manifest(out)
        engine = manifest.target.engine
        assert manifest.status == "complete" and engine["architecture"] == "qwen3_moe"
        assert engine["kernels"] == kernels and engine["dtype"] == "bfloat16"
        arm = engine["arms"]["mixed"]
        assert arm["fillers"] == N and 1 == arm["batch_seqs_min"] < arm["batch_seqs_max"] <= 16
        rows = read_samples(out).to_pylist()
        assert len(rows) == N and all(r["completion_tokens"] == MAX_TOKENS for r in rows)
