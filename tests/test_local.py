"""`detaudit local` end to end on CPU: a tiny bf16 model under the mixed scenario, stock vs bundled kernels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from detaudit.cli.app import main
from detaudit.rundir.io import load_manifest, read_samples

N = 200
MAX_TOKENS = 16
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
    # On CPU stock kernels diverge through where a prompt's chunks start; a prefix cache gives every copy after the
    # first the same cached blocks and takes that away (tests/test_prefix_cache.py shows what it does instead).
    "--no-prefix-cache",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(model: Path, out: Path, kernels: str) -> dict:
    main(["local", "--model", str(model), "--kernels", kernels, "--out", str(out), "--json", *ARGS])
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_mixed_load_stock_forks_batch_invariant_does_not(tiny_model_dir, tmp_path, capsys):
    stock = _run(tiny_model_dir, tmp_path / "stock", "stock")
    bi = _run(tiny_model_dir, tmp_path / "bi", "batch-invariant")
    capsys.readouterr()
    # Negative control: the same engine and load with stock kernels gives several completions for one prompt.
    assert stock["prompts"][0]["arms"][0]["unique"] > 1
    assert bi["prompts"][0]["arms"][0]["unique"] == 1
    assert bi["prompts"][0]["verdict"] == "deterministic"
    for out, kernels in ((tmp_path / "stock", "stock"), (tmp_path / "bi", "batch-invariant")):
        manifest = load_manifest(out)
        assert manifest.status == "complete" and manifest.target.kind == "local"
        engine = manifest.target.engine
        assert engine["kernels"] == kernels and engine["dtype"] == "bfloat16" and engine["device"] == "cpu"
        assert engine["torch"] == torch.__version__ and engine["scenarios"] == ["mixed"] and engine["seed"] == 0
        assert engine["threads"] == 1
        arm = engine["arms"]["mixed"]
        assert arm["fillers"] == N and 1 == arm["batch_seqs_min"] < arm["batch_seqs_max"] <= 16
        assert arm["distinct_batch_shapes"] > 10 and arm["batch_tokens_max"] <= 32
        assert [(a.name, a.concurrency) for a in manifest.arms] == [("mixed", 16)]
        rows = read_samples(out).to_pylist()
        assert len(rows) == N and sorted(r["sample_index"] for r in rows) == list(range(N))
        assert all(len(r["token_ids"]) == len(r["logprobs"]) == r["completion_tokens"] == MAX_TOKENS for r in rows)
        assert not (out / "shards").exists()


def test_same_seed_same_run(tiny_model_dir, tmp_path, capsys):
    """Arrivals are counted in steps, so a stock run is reproducible: every target sees the same batches again."""
    small = [
        "--prompt",
        "import os",
        "--prompt",
        "x = 1",
        "-n",
        "6",
        "--scenario",
        "single,prefix",
        "--max-tokens",
        "8",
        "--max-batch",
        "4",
        "--max-batched-tokens",
        "24",
        "--top-logprobs",
        "2",
    ]
    tables = []
    for name in ("a", "b"):
        main(["local", "--model", str(tiny_model_dir), "--out", str(tmp_path / name), "--json", *small])
        tables.append(read_samples(tmp_path / name).to_pylist())
    capsys.readouterr()
    a, b = tables
    assert len(a) == 2 * 2 * 6
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    assert [r["logprobs"] for r in a] == [r["logprobs"] for r in b]
    assert {r["arm"] for r in a} == {"single", "prefix"}
    assert all(len(r["top_token_ids"][0]) == 2 and r["top_token_ids"][0][0] == r["token_ids"][0] for r in a)


def _exit(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def test_bad_input_exits_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    base = ["local", "--prompt", "hi", "-n", "1", "--out", str(tmp_path / "out")]
    foreign = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, foreign)
    cfg = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    code, err = _exit([*base, "--model", str(foreign)], capsys)
    assert code == 2 and "unsupported architecture 'gpt2'" in err and "qwen3" in err and "mistral" in err
    code, err = _exit([*base, "--model", str(tmp_path / "no-such-model")], capsys)
    assert code == 2 and "does not exist" in err
    code, err = _exit([*base, "--model", str(tiny_model_dir), "--dtype", "int8"], capsys)
    assert code == 2 and "unsupported dtype 'int8'" in err
    code, err = _exit([*base, "--model", str(tiny_model_dir), "--dtype", "float16"], capsys)
    assert code == 2 and "float16 is not supported on CPU" in err
    code, err = _exit([*base, "--model", str(tiny_model_dir), "--scenario", "burst"], capsys)
    assert code == 2 and "unknown scenario 'burst'" in err
    if not torch.cuda.is_available():
        code, err = _exit([*base, "--model", str(tiny_model_dir), "--device", "cuda"], capsys)
        assert code == 2 and "no CUDA device" in err
    # -n 1e20 built its workload until memory ran out; --max-tokens past --max-model-len left a started run behind
    code, err = _exit([*base, "--model", str(tiny_model_dir), "-n", "99999999999999999999"], capsys)
    assert code == 2 and "a run holds at most" in err
    code, err = _exit([*base, "--model", str(tiny_model_dir), "--max-tokens", "5000"], capsys)  # --max-model-len 1024
    assert code == 2 and "leaves no room for a prompt" in err
    assert not (tmp_path / "out").exists()


def test_progress_reports_each_arm_from_zero_once_the_engine_is_loaded(tiny_model_dir, tmp_path):
    """The CLI shows "loading …" until an arm reports 0 of N, so that call must come first, before any request ends."""
    from detaudit.audit.local_engine import LocalRunSpec, run_local
    from detaudit.engine.llm import EngineConfig

    calls: list[tuple[str, int, int]] = []
    spec = LocalRunSpec(
        engine=EngineConfig(str(tiny_model_dir), max_batch=4, max_batched_tokens=64, max_model_len=128),
        prompts=["Tell me about Richard Feynman"],
        repeats=3,
        scenarios=["single", "mixed"],
        out=tmp_path / "run",
        max_tokens=3,
        top_logprobs=0,
        seed=0,
        force=False,
    )
    run_local(spec, lambda arm, done, total: calls.append((arm, done, total)))
    assert [c for c in calls if c[1] == 0] == [("single", 0, 3), ("mixed", 0, 3)]
    assert calls[0] == ("single", 0, 3) and calls[-1] == ("mixed", 3, 3)
    assert [c[1] for c in calls if c[0] == "single"] == [0, 1, 2, 3]


def test_serial_control_arm_makes_the_stock_verdict_load_dependent(tiny_model_dir, tmp_path, capsys):
    """`--scenario serial,mixed` is the local `--concurrency 1,N`: each serial request runs alone (batch size 1), so
    stock kernels agree there and fork under load, and the analysis can say the divergence is load-dependent."""
    out = tmp_path / "run"
    main(
        [
            "local",
            "--model",
            str(tiny_model_dir),
            "--kernels",
            "stock",
            "--out",
            str(out),
            "--json",
            "--prompt",
            "Tell me about Richard Feynman",
            "-n",
            "40",
            "--scenario",
            "serial,mixed",
            "--max-tokens",
            "16",
            "--max-batch",
            "16",
            "--max-batched-tokens",
            "32",
            "--top-logprobs",
            "0",
            "--no-prefix-cache",  # as in ARGS: the load-dependence shown here is chunking's
        ]
    )
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    serial, mixed = summary["prompts"][0]["arms"]
    assert (serial["arm"], serial["concurrency"], serial["unique"]) == ("serial", 1, 1)
    assert (mixed["arm"], mixed["concurrency"]) == ("mixed", 16) and mixed["unique"] > 1
    assert summary["prompts"][0]["verdict"] == "load-dependent"
    stats = load_manifest(out).target.engine["arms"]
    assert stats["serial"]["batch_seqs_max"] == 1 and stats["serial"]["fillers"] == 0
    assert stats["mixed"]["batch_seqs_max"] > 1


def test_prefix_scenario_records_cold_and_warm_cache_hits_per_sample(tiny_model_dir, tmp_path, capsys):
    """`--scenario serial,prefix`: the serial arm flushes the prefix cache before each request (cached_tokens 0
    everywhere); the prefix arm's copies find the cache cold or warm, fully or in part, and with the bundled
    kernels all agree."""
    out = tmp_path / "run"
    prompt = "Tell me about Richard Feynman, his diagrams and the path integral, in a few plain sentences"
    argv = ["local", "--model", str(tiny_model_dir), "--kernels", "batch-invariant", "--out", str(out), "--json"]
    argv += ["--prompt", prompt, "-n", "24", "--scenario", "serial,prefix", "--max-tokens", "4"]
    main([*argv, "--max-batch", "8", "--max-batched-tokens", "24", "--top-logprobs", "0"])
    capsys.readouterr()
    rows = read_samples(out).to_pylist()
    serial = [r["cached_tokens"] for r in rows if r["arm"] == "serial"]
    warm = [r["cached_tokens"] for r in rows if r["arm"] == "prefix"]
    full = (rows[0]["prompt_tokens"] - 1) // 16 * 16
    assert serial == [0] * 24 and len(warm) == 24 and 0 in warm and full in warm
    assert len({tuple(r["logprobs"]) for r in rows}) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"][0]["verdict"] == "deterministic"
    stats = load_manifest(out).target.engine["arms"]
    assert stats["serial"]["prefix_cache_flushes"] == 24 and stats["serial"]["cached_prompt_tokens"] == 0
    assert stats["prefix"]["prefix_cache_flushes"] > 0 and stats["prefix"]["cached_prompt_tokens"] >= sum(warm) > 0
