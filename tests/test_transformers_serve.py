"""`detaudit run` against a real `transformers serve` of a tiny offline model: text-only capture, both APIs."""

from __future__ import annotations

import json

from runhelp import cli

from detaudit.rundir.io import load_manifest, read_samples


def test_run_against_transformers_serve(transformers_serve, tiny_model_dir, capsys, tmp_path) -> None:
    out = tmp_path / "chat"
    r = cli(
        capsys,
        "run",
        "--base-url",
        transformers_serve,
        "--model",
        tiny_model_dir,
        "-p",
        "def parse_args(",
        "-n",
        4,
        "-c",
        "1,4",
        "--max-tokens",
        8,
        "--json",
        "--out",
        out,
    )
    assert r.code == 0, r.err
    manifest = load_manifest(out)
    # transformers serve accepts logprobs and ignores them (HTTP 200, "logprobs": null): the probe must notice
    assert manifest.capture == "text" and manifest.probe["logprobs"] is False and manifest.probe["stream"] is True
    rows = read_samples(out).to_pylist()
    assert len(rows) == 8 and all(row["status"] == "ok" and row["text"] for row in rows)
    assert all(row["token_ids"] is None and row["logprobs"] is None for row in rows)
    assert {row["finish_reason"] for row in rows} <= {"length", "stop"}
    summary = json.loads(r.out)
    assert summary["unit"] == "text"
    assert summary["unique_per_prompt"][0]["by_arm"]["c1"] == 1  # served one at a time, greedy is repeatable
    _check_verdict_by_hand(summary, rows, max_tokens=8)


def _check_verdict_by_hand(summary: dict, rows: list[dict], max_tokens: int) -> None:
    """The counts and the verdict, recomputed from the Parquet rows with the rules of docs/summary.md: an answer is
    compared only when it ended for a stated reason (stop, or length at max_tokens); distinct texts per arm; then
    deterministic / load-dependent / load-independent from the serial arm (c1) and the loaded one (4 answers an arm:
    enough to judge; no errors, as asserted above)."""

    def compared(row: dict) -> bool:
        at_limit = row["finish_reason"] == "length" and row["completion_tokens"] in (None, max_tokens)
        return row["status"] == "ok" and (row["finish_reason"] == "stop" or at_limit)

    distinct = {arm: len({r["text"] for r in rows if r["arm"] == arm and compared(r)}) for arm in ("c1", "c4")}
    pooled = len({r["text"] for r in rows if compared(r)})
    cut = {arm: sum(r["arm"] == arm and r["status"] == "ok" and not compared(r) for r in rows) for arm in distinct}
    prompt = summary["prompts"][0]
    assert {a["arm"]: a["unique"] for a in prompt["arms"]} == distinct
    assert {a["arm"]: a["truncated"] for a in prompt["arms"]} == cut
    if cut["c1"] * 2 > 4 or cut["c4"] * 2 > 4:
        expected = "inconclusive"  # most answers of an arm cut short: nothing to judge
    elif distinct["c1"] > 1:
        expected = "load-independent"
    else:
        expected = "load-dependent" if pooled > 1 else "deterministic"  # pooled: each arm one, but not the same
    assert prompt["verdict"] == expected, (prompt["verdict"], prompt["verdict_reason"], distinct, cut)


def test_completions_api_streamed_against_transformers_serve(
    transformers_serve, tiny_model_dir, capsys, tmp_path
) -> None:
    out = tmp_path / "compl"
    r = cli(
        capsys,
        "run",
        "--base-url",
        transformers_serve,
        "--model",
        tiny_model_dir,
        "-p",
        "import os\n",
        "-n",
        3,
        "--api",
        "completions",
        "--stream",
        "--max-tokens",
        6,
        "--out",
        out,
    )
    assert r.code == 0, r.err
    rows = read_samples(out).to_pylist()
    assert [row["status"] for row in rows] == ["ok"] * 3
    assert len({row["text"] for row in rows}) == 1
