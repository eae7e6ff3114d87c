"""Background temperature (#18) against the local engine: known temperatures recovered, greedy bounded near 0, and a
stock run under load, recorded by `detaudit local`, with T_bg > 0 whose interval excludes 0 (the small-N CI version
of benchmarks/background_temperature_engine.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from engine_temperature import covers, engine, sharpen, trial
from runhelp import cli

from detaudit.cli.app import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sharp_engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    model = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("sharp") / "model")
    return engine(sharpen(model, 10.0), max_batch=16)


def test_known_temperature_is_recovered(sharp_engine):
    """T = 0.05, four trials of 16 samples x 24 tokens: each flips, and the 95 % intervals hold T (a miss is a 1 in
    20 event per trial; these seeds hit none, the benchmark measures the rate)."""
    results = [trial(sharp_engine, i, 16, 0.05) for i in range(4)]
    assert all(r.kind == "estimate" and r.flips > 0 and r.outside_top_k == 0 for r in results)
    assert sum(covers(r, 0.05) for r in results) >= 3
    assert 0.5 < float(np.median([r.estimate for r in results])) / 0.05 < 2.0


def test_greedy_sampling_gives_an_upper_bound_near_zero(sharp_engine):
    results = [trial(sharp_engine, i, 16, 0.0) for i in range(2)]
    for r in results:
        assert (r.kind, r.flips, r.estimate, r.lower) == ("upper-bound", 0, 0.0, 0.0)
        assert r.trials == 16 * 24 and r.upper is not None and r.upper < 0.1


def test_stock_run_under_load_has_a_background_temperature(tiny_model_dir, tmp_path, capsys):
    """`detaudit local` at temperature 0, serial and 16 in flight, stock kernels: the serial arm never flips (an upper
    bound), the loaded arm flips at near-ties: T_bg > 0 with its interval excluding 0; the forks are near-ties under
    load. The same with batch-invariant kernels: no flip anywhere. Without the prefix cache: with it, every target
    request after the first reuses the prompt's cached prefill, and 24 samples of this model then show no fork."""
    args = ["--prompt", "Tell me about Richard Feynman", "-n", "24", "--scenario", "serial,mixed", "--max-tokens",
            "16", "--max-batch", "16", "--max-batched-tokens", "32", "--dtype", "bfloat16",
            "--top-logprobs", "8", "--no-prefix-cache"]  # fmt: skip
    docs = {}
    for kernels in ("stock", "batch-invariant"):
        out = tmp_path / kernels
        main(["local", "--model", str(tiny_model_dir), "--kernels", kernels, "--out", str(out), *args])
        docs[kernels] = json.loads((out / "summary.json").read_text())["background"]
    capsys.readouterr()
    stock = {a["arm"]: a["temperature"] for a in docs["stock"]["arms"]}
    assert stock["serial"]["kind"] == "upper-bound" and stock["serial"]["flips"] == 0
    mixed = stock["mixed"]
    assert mixed["kind"] == "estimate" and mixed["flips"] > 0 and 0 < mixed["lower"] < mixed["estimate"]
    assert docs["stock"]["shares"]["load"] > 0.5 and docs["stock"]["shares"]["near-tie"] > 0.5
    for arm in docs["batch-invariant"]["arms"]:
        assert arm["temperature"]["kind"] == "upper-bound" and arm["temperature"]["flips"] == 0
    assert docs["batch-invariant"]["shares"] is None
    # the gate judges each arm's estimate; compare gives B - A with an interval around it
    failed = cli(capsys, "gate", tmp_path / "stock", "--max-background-temperature", mixed["estimate"] / 2)
    assert failed.code == 1 and "FAIL max-background-temperature" in failed.out and "mixed T_bg" in failed.out
    passed = cli(capsys, "gate", tmp_path / "stock", "--max-background-temperature", mixed["estimate"] * 2)
    assert passed.code == 0 and "PASS max-background-temperature" in passed.out
    compared = cli(capsys, "compare", tmp_path / "batch-invariant", tmp_path / "stock", "--json")
    assert compared.code == 0, compared.err
    diff = json.loads(compared.out)["background_temperature"]
    assert diff["a"]["kind"] == "upper-bound" and diff["b"]["kind"] == "estimate"
    assert diff["difference"] == diff["b"]["estimate"] and diff["lower"] < diff["difference"] < diff["upper"]
