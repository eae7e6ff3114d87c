"""`detaudit rescore`: teacher-forced logprobs vs the ones a run recorded."""

from __future__ import annotations

import json
import math

import pytest

from detaudit.cli.app import main
from detaudit.engine.rescore import compare
from detaudit.rundir.io import read_rescore, read_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bi_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rescore") / "run"
    main(["local", "--model", str(tiny_model_dir), "--prompt", "def fibonacci(n):", "--prompt", "import os", "-n", "6",
          "--kernels", "batch-invariant", "--max-tokens", "16", "--max-batch", "8", "--max-batched-tokens", "24",
          "--out", str(out), "--json"])  # fmt: skip
    return out


def test_same_model_and_kernels_give_zero_gap_stock_does_not(bi_run, tiny_model_dir, capsys):
    capsys.readouterr()
    main(["rescore", str(bi_run), "--model", str(tiny_model_dir), "--kernels", "batch-invariant", "--json"])
    bi = json.loads(capsys.readouterr().out)
    assert bi["rows_compared"] == 12 and bi["tokens_compared"] == 12 * 16
    assert bi["max_abs_delta"] == 0 and bi["tokens_equal"] == bi["tokens_compared"] and bi["kl_mean"] == 0
    table = read_rescore(bi_run).to_pylist()
    samples = {r["sample_index"]: r for r in read_samples(bi_run).to_pylist()}
    assert all(r["rescored_logprobs"] == samples[r["sample_index"]]["logprobs"] for r in table)
    assert json.loads((bi_run / "summary.json").read_text())["rescore"]["max_abs_delta"] == 0
    main(["analyze", str(bi_run), "--json"])  # rewrites summary.json: the rescore section must survive
    capsys.readouterr()
    kept = json.loads((bi_run / "summary.json").read_text())["rescore"]
    assert kept == bi and kept["kernels"] == "batch-invariant" and kept["model"] == str(tiny_model_dir)

    main(["rescore", str(bi_run), "--model", str(tiny_model_dir), "--kernels", "stock", "--json"])
    stock = json.loads(capsys.readouterr().out)
    assert stock["max_abs_delta"] > 0 and stock["tokens_equal"] < stock["tokens_compared"]
    assert stock["first_diff_min"] is not None and stock["max_abs_delta"] < 0.1


def test_compare_figures():
    row = compare([-1.0, -2.0, None, -0.5], [-1.0, -2.5, -3.0, -0.25])
    assert row["abs_delta"] == [0.0, 0.5, None, 0.25]
    assert row["max_abs_delta"] == 0.5 and math.isclose(row["mean_abs_delta"], 0.25)
    assert row["first_diff"] == 1 and math.isclose(row["kl_estimate"], 0.5 - 0.25)
    assert compare(None, [-1.0])["abs_delta"] is None


def test_not_a_run_dir_exits_2(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["rescore", str(tmp_path), "--model", str(tiny_model_dir)])
    assert exc.value.code == 2 and "not a detaudit run directory" in capsys.readouterr().err
