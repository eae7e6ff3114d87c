"""`detaudit run --cache cold,warm` against real servers: our own `detaudit serve` (prefix cache on, cached_tokens
reported, /reset_prefix_cache for cold), stock kernels against the bundled ones; and `transformers serve`, which
reports no cached_tokens (the cache state is unverified, and the report and gate say so).

Stock `detaudit serve` computes a warm request's rows past its cached block as servers' extend attention does (the
cached K/V and the new tokens in two parts, merged by log-sum-exp; kernels/attention.py), where a cold request is
one causal pass: in bfloat16 the two differ by a rounding of the attention output, and on this prompt the tiny
model's greedy tokens part ways within 8 tokens (docs/gate.md, "Prefix-cache invariance")."""

from __future__ import annotations

import json
from pathlib import Path

from runhelp import cli
from servers import Server, detaudit_serve_argv, free_port, launch

from detaudit.rundir.io import load_manifest, read_samples

# 30 prompt tokens in the tiny model's chat template: 16 of them (one full block) come from the cache when warm.
PROMPT = "alpha beta gamma delta epsilon zeta eta theta iota"


def _serve(model: Path, kernels: str, log_dir: Path) -> Server:
    port = free_port()
    options = ("--kernels", kernels, "--dtype", "bfloat16", "--max-batch", 4, "--max-model-len", 256)
    argv = detaudit_serve_argv(model, port, *options)
    return launch(argv, log=log_dir / f"serve-{kernels}.log", port=port, env={"OMP_NUM_THREADS": "1"})


def _run(capsys, base: str, model: Path, out: Path, *extra: object) -> dict:
    r = cli(
        capsys, "run", "--base-url", base, "--model", model, "-p", PROMPT, "-n", 2, "--max-tokens", 8,
        "--cache", "cold,warm", "--out", out, *extra,
    )  # fmt: skip
    assert r.code == 0, r.err
    return json.loads((out / "summary.json").read_text())


def test_detaudit_serve_stock_tokens_change_cold_vs_warm_bundled_do_not(tiny_model_dir, tmp_path, capsys) -> None:
    started = [_serve(tiny_model_dir, k, tmp_path) for k in ("stock", "batch-invariant")]  # loading side by side
    try:
        for server in started:
            server.wait_ready(120)
        summaries = {
            kernels: _run(capsys, server.base_url, tiny_model_dir, tmp_path / kernels)
            for kernels, server in zip(("stock", "bi"), started, strict=True)
        }
    finally:
        for server in started:
            server.stop(timeout=60)
    for kernels, summary in summaries.items():
        manifest = load_manifest(tmp_path / kernels)
        assert manifest.probe["cache"]["cold"] == "reset" and manifest.probe["cache"]["reports_cached_tokens"]
        prompt = summary["prompts"][0]
        # the proof: every cold answer computed its 30 prompt tokens, every warm one took 16 from the cache
        assert [(a["arm"], a["cache"]["evidence"], a["cache"]["cached_tokens_max"]) for a in prompt["arms"]] == [
            ("c1-cold", "cold", 0),
            ("c1-warm", "warm", 16),
        ]
        assert prompt["cache"]["evidence"] == "verified"
        rows = read_samples(tmp_path / kernels).to_pylist()
        assert {r["prompt_tokens"] for r in rows} == {30}
    stock, bi = summaries["stock"]["prompts"][0], summaries["bi"]["prompts"][0]
    assert stock["verdict"] == "cache-dependent", stock["verdict_reason"]
    assert stock["cache"]["same_completion"] is False
    assert bi["cache"]["same_completion"] is True
    assert bi["verdict"] == "deterministic", bi["verdict_reason"]
    assert (bi["cache"]["cold_vectors"], bi["cache"]["warm_vectors"], bi["cache"]["shared_vectors"]) == (1, 1, 1)
    assert cli(capsys, "gate", tmp_path / "stock", "--require-cache-invariant").code == 1
    assert cli(capsys, "gate", tmp_path / "bi", "--require-cache-invariant").code == 0


def test_transformers_serve_reports_no_cached_tokens(transformers_serve, tiny_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    r = cli(
        capsys, "run", "--base-url", transformers_serve, "--model", tiny_model_dir, "-p", "def parse_args(",
        "-n", 2, "--max-tokens", 4, "--cache", "cold,warm", "--out", out,
    )  # fmt: skip
    assert r.code == 0, r.err
    probe = load_manifest(out).probe["cache"]
    assert probe["reports_cached_tokens"] is False and probe["cold"] == "nonce"
    assert read_samples(out).column("cached_tokens").null_count == 4
    prompt = json.loads((out / "summary.json").read_text())["prompts"][0]
    assert prompt["cache"]["evidence"] == "unverified" and prompt["cache"]["cold_method"] == "nonce"
    assert [a["cache"]["reporting"] for a in prompt["arms"]] == [0, 0]
    assert cli(capsys, "report", out, "--md", tmp_path / "r.md").code == 0
    md = (tmp_path / "r.md").read_text()
    assert "cold cache asked; unverified: none of 2 answers reported cached\\_tokens" in md
    g = cli(capsys, "gate", out, "--require-cache-invariant")
    assert g.code == 3 and "cache state unverified (no cached_tokens reported)" in g.out
