"""`detaudit serve` as a real process on 127.0.0.1, driven with the official openai SDK and raw HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from runhelp import wait_healthy
from scripted_server import free_port  # tests/ is on sys.path under pytest

from detaudit.rundir.io import load_manifest

PROMPT = [{"role": "user", "content": "def fibonacci(n):"}]


def _start(model: Path, kernels: str, log_dir: Path, budget: int = 48) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("detaudit")
    log = open(log_dir / f"serve-{kernels}.log", "wb")
    proc = subprocess.Popen([str(exe), "serve", "--model", str(model), "--kernels", kernels, "--port", str(port),
                             "--max-batch", "8", "--max-batched-tokens", str(budget), "--max-model-len", "512"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, Path(log.name))
    return proc, f"{base}/v1"


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


@pytest.fixture(scope="module")
def bi_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    proc, base = _start(tiny_model_dir, "batch-invariant", tmp_path_factory.mktemp("serve"))
    try:
        yield base, str(tiny_model_dir)
    finally:
        _stop(proc)


def test_models_and_chat_with_logprobs_and_token_ids(bi_server):
    base, model = bi_server
    client = openai.OpenAI(base_url=base, api_key="unused")
    assert [m.id for m in client.models.list().data] == [model]
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"return_token_ids": True})  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop") and r.usage.completion_tokens == len(choice.logprobs.content)
    assert r.system_fingerprint == "detaudit-engine-batch-invariant-bfloat16-cpu"
    ids = choice.model_extra["token_ids"]
    assert len(ids) == r.usage.completion_tokens and r.model_extra["prompt_token_ids"]
    first = choice.logprobs.content[0]
    assert first.top_logprobs[0].logprob == first.logprob and len(first.top_logprobs) == 3
    assert "".join(bytes(c.bytes).decode("utf-8", "replace") for c in choice.logprobs.content) == choice.message.content
    # Same request streamed: same tokens, same logprobs, same text.
    chunks = list(client.chat.completions.create(model=model, messages=PROMPT, max_tokens=12, temperature=0,
                                                 logprobs=True, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"return_token_ids": True}))  # fmt: skip
    streamed = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == choice.message.content
    assert [t for c in streamed for t in (c.choices[0].model_extra or {}).get("token_ids", [])] == ids
    assert [x.logprob for c in streamed if c.choices[0].logprobs for x in c.choices[0].logprobs.content] == [
        x.logprob for x in choice.logprobs.content
    ]
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_completions_tokens_as_ids_stop_and_seed(bi_server):
    base, model = bi_server
    client = openai.OpenAI(base_url=base, api_key="unused")
    r = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=10, temperature=0, logprobs=2,
                                  extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    toks = r.choices[0].logprobs.tokens
    assert all(t.startswith("token_id:") for t in toks)
    assert [int(t.split(":")[1]) for t in toks] == r.choices[0].model_extra["token_ids"]
    text = r.choices[0].text
    stop = text[3:6]
    cut = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]
    hot = [client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=10, temperature=1.0,
                                     seed=s).choices[0].text for s in (5, 5, 6)]  # fmt: skip
    assert hot[0] == hot[1] != hot[2]


def test_concurrent_requests_share_batches_and_stay_identical(bi_server):
    base, model = bi_server
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)

    def one(i: int) -> list[int]:
        msgs = PROMPT if i % 2 == 0 else [{"role": "user", "content": f"filler {i} " * (i % 7 + 1)}]
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                           extra_body={"return_token_ids": True})  # fmt: skip
        return r.choices[0].model_extra["token_ids"] if i % 2 == 0 else None

    with cf.ThreadPoolExecutor(12) as pool:
        results = [x for x in pool.map(one, range(24)) if x is not None]
    assert len(results) == 12 and all(r == results[0] for r in results)


def test_errors_in_openai_shape(bi_server):
    base, model = bi_server
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=PROMPT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=PROMPT, n=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=PROMPT, max_tokens=100_000)
    r = httpx.post(f"{base}/chat/completions", json={"model": model, "messages": PROMPT, "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(f"{base}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "message" in r.json()["error"]
    r = httpx.get(f"{base}/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_bad_serve_arguments_exit_2(tmp_path):
    exe = Path(sys.executable).with_name("detaudit")
    r = subprocess.run([str(exe), "serve", "--model", str(tmp_path / "missing")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_busy_port_and_bad_queue_are_one_line_exit_2_before_the_model_loads(tmp_path, capsys):
    """uvicorn alone logged a bind error over three lines and exited 3, after loading the model."""
    from runhelp import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli(capsys, "serve", "--model", tmp_path / "not-loaded", "--port", port)
    assert (r.code, r.err.count("\n")) == (2, 1) and f"cannot listen on 127.0.0.1:{port}" in r.err, r.err
    r = cli(capsys, "serve", "--model", tmp_path / "not-loaded", "--max-queue", "-1")
    assert (r.code, r.err.count("\n")) == (2, 1) and "--max-queue must be at least 1" in r.err, r.err


def test_json_body_roundtrip_is_plain_json(bi_server):
    """A raw client sees standard JSON (no SDK smoothing): object type, id prefix, usage totals."""
    base, model = bi_server
    body = httpx.post(f"{base}/chat/completions", json={"model": model, "messages": PROMPT, "max_tokens": 3},
                      timeout=60).json()  # fmt: skip
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert json.loads(json.dumps(body)) == body


def test_graceful_shutdown_finishes_in_flight_requests(tiny_model_dir, tmp_path):
    """SIGTERM: stop accepting, let the request in flight finish, stop the engine thread; uvicorn then re-raises
    the signal, so the exit status is the conventional -SIGTERM."""
    proc, base = _start(tiny_model_dir, "stock", tmp_path)
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    model = str(tiny_model_dir)
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.chat.completions.create, model=model, messages=PROMPT, max_tokens=200,
                              temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        time.sleep(1.0)
        code = _stop(proc)
        r = pending.result(timeout=60)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 200
    assert code in (0, -signal.SIGTERM)
    assert "shut down cleanly" in (tmp_path / "serve-stock.log").read_text()


@pytest.mark.slow
def test_detaudit_run_sees_load_dependence_with_stock_and_none_with_bundled(bi_server, tiny_model_dir, tmp_path,
                                                                           capsys):  # fmt: skip
    """The project's own audit against this server: 16 identical requests in flight get their prompts chunked at
    different places; stock attention turns that into different completions, bundled kernels do not."""
    from runhelp import cli

    # A 16-token budget cuts the 23-token prompt differently depending on what else runs in the step.
    stock_proc, stock_base = _start(tiny_model_dir, "stock", tmp_path, budget=16)
    verdicts = {}
    try:
        for name, base in (("stock", stock_base), ("bi", bi_server[0])):
            out = tmp_path / name
            res = cli(capsys, "run", "--base-url", base, "--model", str(tiny_model_dir), "--prompt",
                      "Tell me about Richard Feynman", "-n", "24", "--concurrency", "1,16", "--max-tokens", "8",
                      "--out", out, "--json")  # fmt: skip
            assert res.code == 0, res.err
            summary = json.loads((out / "summary.json").read_text())
            verdicts[name] = summary["prompts"][0]["verdict"]
            assert load_manifest(out).capture == "token_ids"
    finally:
        _stop(stock_proc)
    assert verdicts == {"stock": "load-dependent", "bi": "deterministic"}


def test_overloaded_queue_answers_503(tiny_model_dir):
    """In process (ASGI test client): with no room left in the wait queue a request gets OpenAI's 503 shape."""
    from fastapi.testclient import TestClient

    from detaudit.engine.llm import Engine, EngineConfig
    from detaudit.engine.server import create_app

    engine = Engine(EngineConfig(str(tiny_model_dir), max_batch=2, max_batched_tokens=32, max_model_len=128))
    with TestClient(create_app(engine, model_name="tiny", max_queue=0)) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": PROMPT, "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
