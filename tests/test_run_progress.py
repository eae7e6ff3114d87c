"""The live progress bar counts distinct completions per prompt, never summed over prompts (issue #23, item 8: a
deterministic 3-prompt arm showed "distinct 3")."""

from __future__ import annotations

import re

from runhelp import FEYNMAN, NYC, QUEENS, cli

from detaudit.cli.run import distinct_text
from detaudit.rundir.io import read_samples


def test_distinct_text_lists_each_prompt_then_summarises() -> None:
    assert distinct_text([1]) == "1"
    assert distinct_text([1, 1, 1]) == "1/1/1"
    assert distinct_text([0, 2, 1, 1, 1, 3]) == "0/2/1/1/1/3"
    assert distinct_text([1, 2, 1, 1, 1, 1, 3]) == "max 3, 2/7 prompts diverged"
    assert distinct_text([1] * 40) == "max 1, 0/40 prompts diverged"


def _bars(err: str) -> dict[str, str]:
    """arm -> its distinct field, from the last progress line of each arm on stderr (plain lines: not a terminal)."""
    return dict(re.findall(r"arm (c\d+):? .*? distinct ([^\s,]+)", err))


def test_progress_counts_distinct_completions_per_prompt(scripted_server, capsys, tmp_path) -> None:
    """Three prompts, each deterministic: 1/1/1 per arm (not 3). Then the middle prompt forks once in 6: 1/2/1,
    and so it stays when a resume counts the rows already on disk."""
    faults = {"first": ["503"] * 2, "prompts": ["three"]}
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 5), ("N", 1)]}, default="Q", faults=faults
    )
    out = tmp_path / "steady"
    args = ["-p", "one", "-p", "two", "-p", "three", "-n", 6, "--concurrency", "1,2", "--retries", 0]
    r = cli(capsys, "run", "--base-url", server.base_url, *args, "--out", out)
    assert r.code == 0, r.err
    assert _bars(r.err) == {"c1": "1/1/1", "c2": "1/1/1"}  # two failed rows of "three" in c1: not completions
    server.reset_counts()
    out = tmp_path / "forked"
    args = ["-p", "one", "-p", FEYNMAN, "-p", "three", "-n", 6, "--concurrency", "1,2", "--retries", 0]
    server.fault_first.extend(["503"] * 2)
    r = cli(capsys, "run", "--base-url", server.base_url, *args, "--out", out)
    assert r.code == 0, r.err
    assert _bars(r.err) == {"c1": "1/2/1", "c2": "1/2/1"}
    r = cli(capsys, "run", "--resume", "--out", out)  # the two failed rows are sent again, the rest read from disk
    assert r.code == 0, r.err
    assert _bars(r.err) == {"c1": "1/2/1", "c2": "1/2/1"}
    assert "errors 0" in r.err and all(row["status"] == "ok" for row in read_samples(out).to_pylist())
