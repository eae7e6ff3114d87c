"""`detaudit run` against a real `transformers serve` of a tiny offline model: text-only capture, both APIs."""

from __future__ import annotations

import json
from pathlib import Path

import handcount
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
    _check_verdict_by_hand(summary, out, max_tokens=8)


def _check_verdict_by_hand(summary: dict, out: Path, max_tokens: int) -> None:
    """The counts and the verdict, recomputed from the Parquet by tests/handcount.py (not detaudit.analysis)."""
    prompt = summary["prompts"][0]
    hand = handcount.count(out, max_tokens)[prompt["prompt_id"]]
    assert {a["arm"]: (a["unique"], a["truncated"]) for a in prompt["arms"]} == {
        arm: (c.unique, c.truncated) for arm, c in hand.items()
    }
    assert prompt["verdict"] == handcount.verdict(hand), (prompt["verdict"], prompt["verdict_reason"], hand)


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
