"""`detaudit rescore`: teacher-forced logprobs vs the ones a run recorded."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from detaudit.audit.rescoring import check_model, compare
from detaudit.cli.app import main
from detaudit.rundir.io import load_manifest, read_rescore, read_samples, write_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bi_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rescore") / "run"
    main(
        [
            "local",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "def fibonacci(n):",
            "--prompt",
            "import os",
            "-n",
            "6",
            "--scenario",
            "mixed",
            "--kernels",
            "batch-invariant",
            "--max-tokens",
            "16",
            "--max-batch",
            "8",
            "--max-batched-tokens",
            "24",
            "--out",
            str(out),
            "--json",
        ]
    )
    return out


def test_same_model_and_kernels_give_zero_gap_stock_does_not(bi_run, tiny_model_dir, capsys):
    capsys.readouterr()
    main(["rescore", str(bi_run), "--model", str(tiny_model_dir), "--kernels", "batch-invariant", "--json"])
    captured = capsys.readouterr()
    bi = json.loads(captured.out)
    assert "warning" not in captured.err and bi["model_check"]["status"] == "same"  # the model that sampled
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


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def _said(err: str) -> list[str]:
    """stderr less the model-loading progress lines (plain lines: captured output is not a terminal)."""
    return [line for line in err.splitlines() if not line.startswith("loading ")]


def test_another_model_warns_once_and_is_recorded(bi_run, tiny_model_dir, tmp_path, capsys):
    run = shutil.copytree(bi_run, tmp_path / "run")
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    capsys.readouterr()
    main(["rescore", str(run), "--model", str(other), "--json"])
    captured = capsys.readouterr()
    assert len(_warnings(captured.err)) == 1 and len(_said(captured.err)) == 1
    assert "is not the model that sampled" in captured.err and str(tiny_model_dir) in captured.err
    check = json.loads(captured.out)["model_check"]
    assert check["status"] == "different" and check["model"] == str(other)
    assert check["run_model"] == str(tiny_model_dir)
    assert json.loads((run / "summary.json").read_text())["rescore"]["model_check"] == check

    # An endpoint run records a served name: not an error, but said to be unverified.
    manifest = load_manifest(run)
    target = manifest.target.model_copy(update={"kind": "endpoint", "model": "my-model", "engine": {}})
    write_manifest(run, manifest.model_copy(update={"target": target}))
    main(["rescore", str(run), "--model", str(tiny_model_dir), "--json"])
    captured = capsys.readouterr()
    assert len(_said(captured.err)) == 1 and "could not be verified" in captured.err
    assert "'my-model'" in captured.err and json.loads(captured.out)["model_check"]["status"] == "unverified"


def test_check_model_verdicts(bi_run, tiny_model_dir, tmp_path):
    manifest = load_manifest(bi_run)
    info = {"architecture": "qwen3", "model_path": str(tiny_model_dir)}
    assert check_model(manifest, str(tiny_model_dir), info)["status"] == "same"
    assert check_model(manifest, str(tiny_model_dir), {**info, "architecture": "llama"})["status"] == "different"
    moved = manifest.model_copy(
        update={
            "target": manifest.target.model_copy(
                update={"model": "gone", "engine": {**manifest.target.engine, "model_path": str(tmp_path / "gone")}}
            )
        }
    )
    verdict = check_model(moved, str(tiny_model_dir), info)
    assert verdict["status"] == "unverified" and "not a directory here" in verdict["reason"]
    nameless = manifest.model_copy(update={"target": manifest.target.model_copy(update={"model": None, "engine": {}})})
    assert check_model(nameless, str(tiny_model_dir), info)["status"] == "unverified"


def test_bad_run_directories_fail_before_the_model_loads(bi_run, tmp_path, capsys):
    """--model names no model at all: the run directory's error must come first (it came after the model loaded,
    and a missing samples.parquet read as 'no row can be rescored')."""
    nope = str(tmp_path / "no-model")
    missing = shutil.copytree(bi_run, tmp_path / "missing")
    (missing / "samples.parquet").unlink()
    corrupt = shutil.copytree(bi_run, tmp_path / "corrupt")
    (corrupt / "samples.parquet").write_bytes(b"PAR1 garbage PAR1")
    for run, fragment in ((missing, "samples.parquet is missing"), (corrupt, "corrupt or unreadable Parquet")):
        with pytest.raises(SystemExit) as exc:
            main(["rescore", str(run), "--model", nope])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and fragment in err, err


def test_a_completion_past_max_model_len_is_named(bi_run, tiny_model_dir, tmp_path, capsys):
    run = shutil.copytree(bi_run, tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["rescore", str(run), "--model", str(tiny_model_dir), "--max-model-len", "17"])
    err = capsys.readouterr().err
    # it said "prompt (N tokens) + max_tokens (0) exceeds the engine's max model length"
    assert exc.value.code == 2 and len(_said(err)) == 1 and "max_tokens" not in err, err
    assert "12 sample(s) do not fit --max-model-len 17" in err and "+ 16 completion tokens" in err, err
