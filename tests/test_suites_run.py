"""`detaudit run --suite`: every suite entry is its own prompt id with N per arm; bad suites exit 2 before any run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from detaudit.probes.suites import load_suite
from runhelp import NYC, QUEENS, cli

from detaudit.rundir.io import load_manifest, read_samples


def test_suite_smoke_gives_one_prompt_id_per_entry_with_n_each(
    scripted_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    smoke = load_suite("smoke").prompts
    # The chat entry forks at a known position under a known schedule; the others always agree.
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC},
        default="Q",
        schedules={smoke[2].messages[-1]["content"]: [("Q", 3), ("N", 1)]},
    )
    out = tmp_path / "run"
    res = cli(
        capsys,
        "run",
        "--suite",
        "smoke",
        "-n",
        "4",
        "--concurrency",
        "1,2",
        "--base-url",
        server.base_url,
        "--model",
        "scripted-model",
        "--out",
        out,
        "--json",
    )
    assert res.code == 0, res.err
    manifest = load_manifest(out)
    assert manifest.suite == "smoke"
    assert [p.prompt_id for p in manifest.prompts] == ["capital", "count", "feynman-short"]
    assert [p.rationale for p in manifest.prompts] == [p.rationale for p in smoke]
    rows = read_samples(out, columns=["prompt_id", "arm", "status"]).to_pylist()
    assert Counter((r["prompt_id"], r["arm"]) for r in rows) == {
        (pid, arm): 4 for pid in ("capital", "count", "feynman-short") for arm in ("c1", "c2")
    }
    assert all(r["status"] == "ok" for r in rows)
    # Each entry's own max_tokens went out with its requests; the chat entry went as its message list.
    texts = {p.prompt or p.messages[-1]["content"] for p in smoke}
    sent = Counter()
    for entry in server.log:  # the log also holds the capability probe's request, which is not a suite prompt
        body = entry["body"]
        text = body["messages"][-1]["content"]
        if text in texts:
            sent[(text, body["max_tokens"])] += 1
    assert sent == {
        ("What is the capital of France? Answer in one word.", 8): 8,
        ("Count from 1 to 10, separated by commas.", 32): 8,
        ("Tell me about Richard Feynman", 48): 8,
    }
    # The summary (summary.json and --json) has one entry per suite prompt; only the scheduled one forks.
    summary = json.loads(res.out)
    assert summary == json.loads((out / "summary.json").read_text())
    unique = {(p["prompt_id"], a["arm"]): a["unique"] for p in summary["prompts"] for a in p["arms"]}
    assert unique[("capital", "c1")] == 1 and unique[("count", "c2")] == 1
    assert unique[("feynman-short", "c1")] == 2 and unique[("feynman-short", "c2")] == 2


def test_own_suite_file_is_recorded_by_path(scripted_server, tmp_path: Path, capsys) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    own = tmp_path / "own.jsonl"
    own.write_text('{"id": "one", "prompt": "Hello", "max_tokens": 5}\n{"id": "two", "prompt": "Bye"}\n')
    out = tmp_path / "run"
    res = cli(
        capsys,
        "run",
        "--suite",
        own,
        "-n",
        "2",
        "--max-tokens",
        "9",
        "--base-url",
        server.base_url,
        "--model",
        "scripted-model",
        "--out",
        out,
    )
    assert res.code == 0, res.err
    manifest = load_manifest(out)
    assert manifest.suite == str(own) and [p.prompt_id for p in manifest.prompts] == ["one", "two"]
    # An entry without max_tokens falls back to the run's --max-tokens.
    sent = Counter((e["body"]["messages"][-1]["content"], e["body"]["max_tokens"]) for e in server.log)
    assert sent[("Hello", 5)] == 2 and sent[("Bye", 9)] == 2  # the rest of the log is the capability probe


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prompts:\n  - id: a\n    prompt: x\n  - id: a\n    prompt: y\n", ":4: duplicate id 'a' (first used on line"),
        ("prompts:\n  - id: a\n    prompt: ''\n", ":3: entry 'a' has an empty prompt"),
        ("prompts:\n  - id: a\n    prompt: x\n    maxtokens: 5\n", ":4: unknown entry key 'maxtokens'"),
        ("prompts:\n  - id: a\n    prompt: x\n    max_tokens: -1\n", ":4: entry 'a' has bad max_tokens -1"),
    ],
)
def test_malformed_suite_exits_2_naming_the_problem_and_writes_nothing(
    scripted_server, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = tmp_path / "run"
    res = cli(
        capsys,
        "run",
        "--suite",
        bad,
        "-n",
        "2",
        "--base-url",
        server.base_url,
        "--model",
        "scripted-model",
        "--out",
        out,
    )
    assert res.code == 2
    assert f"{bad}{expected}" in res.err
    assert not out.exists() and not server.log


def test_unknown_suite_name_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = cli(capsys, "run", "--suite", "standrad", "--base-url", "http://127.0.0.1:9/v1", "--out", tmp_path / "r")
    assert res.code == 2 and "unknown suite 'standrad'" in res.err
