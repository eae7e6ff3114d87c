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
from typing import Any

import httpx
import openai
import pytest
from servers import Server, detaudit_serve_argv, free_port, start  # tests/ is on sys.path under pytest

from detaudit.rundir.io import load_manifest

PROMPT = [{"role": "user", "content": "def fibonacci(n):"}]


def _start(model: Path, kernels: str, log_dir: Path, budget: int = 48, *extra: str) -> Server:
    port = free_port()
    options = ("--kernels", kernels, "--max-batch", 8, "--max-batched-tokens", budget, "--max-model-len", 512, *extra)
    argv = detaudit_serve_argv(model, port, *options)
    return start(argv, log=log_dir / f"serve-{kernels}.log", port=port, env={"OMP_NUM_THREADS": "1"})


def _stop(server: Server) -> int:
    return server.stop(timeout=60)


@pytest.fixture(scope="module")
def bi_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    server = _start(tiny_model_dir, "batch-invariant", tmp_path_factory.mktemp("serve"))
    try:
        yield server.base_url, str(tiny_model_dir)
    finally:
        _stop(server)


def test_models_and_chat_with_logprobs_and_token_ids(bi_server):
    base, model = bi_server
    client = openai.OpenAI(base_url=base, api_key="unused")
    assert [m.id for m in client.models.list().data] == [model]
    r = client.chat.completions.create(
        model=model,
        messages=PROMPT,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_token_ids": True},
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop") and r.usage.completion_tokens == len(choice.logprobs.content)
    assert r.system_fingerprint == "detaudit-engine-batch-invariant-bfloat16-cpu"
    ids = choice.model_extra["token_ids"]
    assert len(ids) == r.usage.completion_tokens and r.model_extra["prompt_token_ids"]
    first = choice.logprobs.content[0]
    assert first.top_logprobs[0].logprob == first.logprob and len(first.top_logprobs) == 3
    assert "".join(bytes(c.bytes).decode("utf-8", "replace") for c in choice.logprobs.content) == choice.message.content
    # Same request streamed: same tokens, same logprobs, same text.
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=PROMPT,
            max_tokens=12,
            temperature=0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
    )
    streamed = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == choice.message.content
    assert [t for c in streamed for t in (c.choices[0].model_extra or {}).get("token_ids", [])] == ids
    assert [x.logprob for c in streamed if c.choices[0].logprobs for x in c.choices[0].logprobs.content] == [
        x.logprob for x in choice.logprobs.content
    ]
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_usage_reports_the_prompt_tokens_the_prefix_cache_supplied(bi_server):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: 0 for a prompt never seen, its full 16-token blocks but
    the last token for the same prompt again (non-streamed, and in a stream's final usage chunk)."""
    base, model = bi_server
    client = openai.OpenAI(base_url=base, api_key="unused")
    messages = [{"role": "system", "content": "cache me " * 30}, {"role": "user", "content": "and then?"}]
    cold = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0)
    p = cold.usage.prompt_tokens
    assert p > 32 and cold.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (p - 1) // 16 * 16
    text = [{"role": "user", "content": "cache me " * 30}]  # the same words behind another template prefix: no hit
    other = client.chat.completions.create(model=model, messages=text, max_tokens=1, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_completions_tokens_as_ids_stop_and_seed(bi_server):
    base, model = bi_server
    client = openai.OpenAI(base_url=base, api_key="unused")
    r = client.completions.create(
        model=model,
        prompt="def fibonacci(n):",
        max_tokens=10,
        temperature=0,
        logprobs=2,
        extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True},
    )
    toks = r.choices[0].logprobs.tokens
    assert all(t.startswith("token_id:") for t in toks)
    assert [int(t.split(":")[1]) for t in toks] == r.choices[0].model_extra["token_ids"]
    text = r.choices[0].text
    stop = text[3:6]
    cut = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]
    hot = [
        client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=10, temperature=1.0, seed=s)
        .choices[0]
        .text
        for s in (5, 5, 6)
    ]
    assert hot[0] == hot[1] != hot[2]


def test_concurrent_requests_share_batches_and_stay_identical(bi_server):
    base, model = bi_server
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)

    def one(i: int) -> list[int]:
        msgs = PROMPT if i % 2 == 0 else [{"role": "user", "content": f"filler {i} " * (i % 7 + 1)}]
        r = client.chat.completions.create(
            model=model, messages=msgs, max_tokens=16, temperature=0, extra_body={"return_token_ids": True}
        )
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
    r = subprocess.run(
        [str(exe), "serve", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
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
    body = httpx.post(
        f"{base}/chat/completions", json={"model": model, "messages": PROMPT, "max_tokens": 3}, timeout=60
    ).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert json.loads(json.dumps(body)) == body


def test_graceful_shutdown_finishes_in_flight_requests(tiny_model_dir, tmp_path):
    """SIGTERM: stop accepting, let the request in flight finish, stop the engine thread; uvicorn then re-raises
    the signal, so the exit status is the conventional -SIGTERM."""
    server = _start(tiny_model_dir, "stock", tmp_path)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    model = str(tiny_model_dir)
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client.chat.completions.create,
            model=model,
            messages=PROMPT,
            max_tokens=200,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        time.sleep(1.0)
        code = _stop(server)
        r = pending.result(timeout=60)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 200
    assert code in (0, -signal.SIGTERM)
    assert "shut down cleanly" in (tmp_path / "serve-stock.log").read_text()


@pytest.mark.slow
def test_detaudit_run_sees_load_dependence_with_stock_and_none_with_bundled(
    bi_server, tiny_model_dir, tmp_path, capsys
):
    """The project's own audit against this server: 16 identical requests in flight get their prompts chunked at
    different places; stock attention turns that into different completions, bundled kernels do not."""
    from runhelp import cli

    # A 16-token budget cuts the 23-token prompt differently depending on what else runs in the step. Without the
    # prefix cache: with it, every copy after the first starts past the same cached block (docs/engine.md).
    stock = _start(tiny_model_dir, "stock", tmp_path, 16, "--no-prefix-cache")
    verdicts = {}
    try:
        for name, base in (("stock", stock.base_url), ("bi", bi_server[0])):
            out = tmp_path / name
            res = cli(
                capsys,
                "run",
                "--base-url",
                base,
                "--model",
                str(tiny_model_dir),
                "--prompt",
                "Tell me about Richard Feynman",
                "-n",
                "24",
                "--concurrency",
                "1,16",
                "--max-tokens",
                "8",
                "--out",
                out,
                "--json",
            )
            assert res.code == 0, res.err
            summary = json.loads((out / "summary.json").read_text())
            verdicts[name] = summary["prompts"][0]["verdict"]
            assert load_manifest(out).capture == "token_ids"
    finally:
        _stop(stock)
    assert verdicts == {"stock": "load-dependent", "bi": "deterministic"}


def test_overloaded_queue_answers_503(tiny_model_dir):
    """In process (ASGI test client): with no room left in the wait queue a request gets OpenAI's 503 shape."""
    from fastapi.testclient import TestClient

    from detaudit.engine.llm import Engine, EngineConfig
    from detaudit.server import create_app

    engine = Engine(EngineConfig(str(tiny_model_dir), max_batch=2, max_batched_tokens=32, max_model_len=128))
    with TestClient(create_app(engine, model_name="tiny", max_queue=0)) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": PROMPT, "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"


def test_an_app_that_shut_down_lets_its_engine_go(tiny_model_dir):
    """FastAPI caches route functions process-wide: once the app has shut down nothing of it may keep the engine (its
    memory, and a batch-invariant engine's pin on the kernel overrides) alive in a process that serves again."""
    import gc
    import weakref

    import detaudit.kernels as dk
    from fastapi.testclient import TestClient

    from detaudit.engine.llm import Engine, EngineConfig
    from detaudit.server import create_app

    gc.collect()
    pins = dk._pins
    engine = Engine(EngineConfig(str(tiny_model_dir), kernels="batch-invariant", max_batch=2, max_model_len=128))
    gone = weakref.ref(engine)
    with TestClient(create_app(engine, model_name="tiny")) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2})
        assert r.status_code == 200 and dk._pins == pins + 1
    del engine, client, r
    gc.collect()
    assert gone() is None and dk._pins == pins


# ---------------------------------------------------------------- admission: nothing reaches the engine that it
# cannot run, and every refusal is OpenAI's error JSON (docs/engine.md, "Admission and cancellation")

ERROR_KEYS = {"message", "type", "param", "code"}


def _error(r: httpx.Response, status: int) -> dict:
    """The error object of an answer that must be `status` with OpenAI's error body, nothing more."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_poisoned_long_prompt_among_30_concurrent_requests_fails_alone(bi_server):
    """The issue's must-show: a prompt longer than --max-model-len without max_tokens used to pass admission with a
    negative budget and make the engine step raise, failing every request packed with it (30 of 30)."""
    base, model = bi_server

    def one(i: int) -> httpx.Response:
        content = "word " * 600 if i == 15 else f"say {i}"  # 600 words: far past --max-model-len 512
        body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        if i != 15:
            body["max_tokens"] = 8
        return httpx.post(f"{base}/chat/completions", json=body, timeout=300)

    with cf.ThreadPoolExecutor(31) as pool:
        answers = list(pool.map(one, range(31)))
    assert sorted(r.status_code for r in answers) == [200] * 30 + [400]
    err = _error(answers[15], 400)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "messages", "context_length_exceeded")
    assert all(r.json()["choices"][0]["message"]["content"] is not None for i, r in enumerate(answers) if i != 15)


def test_room_left_is_checked_before_admission(bi_server):
    """--max-model-len 512: the prompt must leave room for a token, and max_tokens must fit the room left."""
    base, model = bi_server

    def post(prompt: list[int], **kw) -> httpx.Response:
        return httpx.post(
            f"{base}/completions", json={"model": model, "prompt": prompt, "ignore_eos": True, **kw}, timeout=120
        )

    for prompt_len in (512, 600):  # no room at all: refused, not one token past the limit
        err = _error(post([7] * prompt_len), 400)
        assert (err["param"], err["code"]) == ("prompt", "context_length_exceeded")
        assert f"the prompt has {prompt_len}" in err["message"]
    err = _error(post([7] * 511, max_tokens=2), 400)
    assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded") and "at most 1" in err["message"]
    assert _error(post([7] * 10, max_tokens=10**30), 400)["param"] == "max_tokens"
    r = post([7] * 511)  # one token of room, no max_tokens: exactly that token
    assert r.status_code == 200 and r.json()["usage"] == {
        "prompt_tokens": 511,
        "completion_tokens": 1,
        "total_tokens": 512,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    r = post([7] * 510, max_tokens=2)  # its first 31 blocks of 16 tokens are the previous prompt's
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 512
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 496}
    chat = {"model": model, "messages": PROMPT}
    err = _error(httpx.post(f"{base}/chat/completions", json={**chat, "max_completion_tokens": 600}), 400)
    assert err["param"] == "max_completion_tokens"


_BAD_REQUESTS = {
    # messages
    "message without content": ({"messages": [{"role": "user"}]}, "messages.0.content"),
    "content null": ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    "content a number": ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    "content an object": ({"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages.0.content"),
    "image content part": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.0.content",
    ),
    "text part without text": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content"),
    "lone surrogate": ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    "tool role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    "no role": ({"messages": [{"content": "x"}]}, "messages.0.role"),
    "message a string": ({"messages": ["hello"]}, "messages.0"),
    "messages a string": ({"messages": "hello"}, "messages"),
    "messages an object": ({"messages": {"role": "user", "content": "x"}}, "messages"),
    "messages empty": ({"messages": []}, "messages"),
    "no messages": ({"messages": ...}, "messages"),  # ... drops the field
    # sampling fields of the wrong type or out of range
    "temperature a string": ({"temperature": "0.5"}, "temperature"),
    "temperature too high": ({"temperature": 3}, "temperature"),
    "top_p zero": ({"top_p": 0}, "top_p"),
    "max_tokens zero": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens negative": ({"max_tokens": -5}, "max_tokens"),
    "max_tokens a float": ({"max_tokens": 5.0}, "max_tokens"),
    "max_tokens a bool": ({"max_tokens": True}, "max_tokens"),
    "max_completion_tokens zero": ({"max_completion_tokens": 0}, "max_completion_tokens"),
    "seed a string": ({"seed": "1"}, "seed"),
    "stream a string": ({"stream": "yes"}, "stream"),
    "stream_options.include_usage a string": (
        {"stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    "stop a number": ({"stop": 5}, "stop"),
    "five stops": ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "top_logprobs too many": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "model a number": ({"model": 123}, "model"),
    # what the engine cannot do is refused, not ignored
    "n=2": ({"n": 2}, "n"),
    "n=0": ({"n": 0}, "n"),
    "presence_penalty": ({"presence_penalty": 0.5}, "presence_penalty"),
    "logit_bias": ({"logit_bias": {"5": 100}}, "logit_bias"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "json response_format": ({"response_format": {"type": "json_object"}}, "response_format"),
}


@pytest.mark.parametrize("fields,param", list(_BAD_REQUESTS.values()), ids=list(_BAD_REQUESTS))
def test_malformed_chat_request_is_400_in_openai_shape(bi_server, fields, param):
    base, model = bi_server
    body = {k: v for k, v in {"model": model, "messages": PROMPT, "max_tokens": 2, **fields}.items() if v is not ...}
    with httpx.Client(timeout=60) as client:
        raw = json.dumps(body).encode()  # ASCII-escaped: httpx's json= cannot encode the lone surrogate
        err = _error(
            client.post(f"{base}/chat/completions", content=raw, headers={"content-type": "application/json"}), 400
        )
        assert (err["type"], err["param"]) == ("invalid_request_error", param), err
        # the connection was answered, not reset, and the server still serves on it
        assert (
            client.post(
                f"{base}/chat/completions", json={"model": model, "messages": PROMPT, "max_tokens": 1}
            ).status_code
            == 200
        )


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'"text"', None),
        (b"null", None),
        (b'{"model": "m", "prompt": "\\ud800"}', "prompt"),
        (b'{"model": "m", "prompt": [[1, 2]]}', "prompt"),
        (b'{"model": "m", "prompt": [-1]}', "prompt"),
        (b'{"model": "m", "prompt": []}', "prompt"),
        (b'{"model": "m", "prompt": ["a", "b"]}', "prompt"),
        (b'{"model": "m", "prompt": "x", "echo": true}', "echo"),
        (b'{"model": "m", "prompt": "x", "logprobs": true}', "logprobs"),
        (b'{"model": "m", "prompt": "x", "temperature": NaN}', "temperature"),
    ],
)
def test_malformed_completion_body_is_400_in_openai_shape(bi_server, body, param):
    base, model = bi_server
    body = body.replace(b'"m"', json.dumps(model).encode())
    r = httpx.post(f"{base}/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert _error(r, 400)["param"] == param


def test_developer_role_and_text_parts_are_accepted(bi_server):
    """`developer` (OpenAI's newer `system`) and a list of text parts, as current SDKs send them, render as the
    system message and the parts joined by newlines would."""
    base, model = bi_server
    parts = [{"type": "text", "text": "def fibonacci"}, {"type": "text", "text": "(n):"}]

    def prompt_ids(messages: list[dict]) -> list[int]:
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": 1,
            "presence_penalty": 0,
            "tool_choice": "none",
            "return_token_ids": True,
        }
        r = httpx.post(f"{base}/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["prompt_token_ids"]

    new = prompt_ids([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}])
    old = prompt_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def fibonacci\n(n):"}])
    assert new == old


# ---------------------------------------------------------------- one request never fails another; a client that
# leaves frees its seat. The app runs under uvicorn on 127.0.0.1 in this process, so the test can see the engine.

POISON = 13  # a completions prompt starting with this token id makes the engine's forward raise (fault injected)


@pytest.fixture(scope="module")
def local_server(tiny_model_dir: Path) -> Iterator[tuple[str, Any, list]]:
    """(base URL, engine, every sequence admitted) of `detaudit serve`'s app on 127.0.0.1, batch-invariant kernels,
    4 seats, --max-model-len 2048, with a fault injected: a step holding a POISON prompt records its tokens, then
    raises (so recovery must also undo what the failed step wrote)."""
    import threading

    import torch
    import uvicorn

    from detaudit.engine.llm import Engine, EngineConfig
    from detaudit.server import create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(
        EngineConfig(
            str(tiny_model_dir), kernels="batch-invariant", max_batch=4, max_batched_tokens=64, max_model_len=2048
        )
    )
    step, add, admitted = engine.runner.step, engine.add, []

    def faulty_step(batch, eos_ids):
        step(batch, eos_ids)
        if any(s.prompt_ids[0] == POISON for s in batch.seqs):
            raise IndexError("injected fault")

    def recording_add(seq):
        admitted.append(seq)
        return add(seq)

    engine.runner.step, engine.add = faulty_step, recording_add
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, model_name="tiny"), host="127.0.0.1", port=free_port(), log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}", engine, admitted
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        torch.set_num_threads(threads)


def test_a_step_that_raises_fails_only_the_request_that_raises(local_server):
    """Defence in depth: were a request to make the forward raise anyway, the engine reruns the step one sequence
    at a time; only the one that raises alone fails (500, OpenAI's shape), the others get the very tokens they get
    without the fault (batch-invariant kernels), and the server goes on serving."""
    base, engine, _ = local_server
    prompt = [5, 6, 7, 8, 9, 10]

    def one(i: int) -> httpx.Response:
        ids = [POISON, *prompt] if i == 7 else prompt
        return httpx.post(
            f"{base}/v1/completions",
            json={
                "model": "tiny",
                "prompt": ids,
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
            timeout=300,
        )

    alone = one(0).json()["choices"][0]["token_ids"]
    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    err = _error(answers[7], 500)
    assert err["type"] == "server_error" and "IndexError: injected fault" in err["message"]
    assert [r.status_code for i, r in enumerate(answers) if i != 7] == [200] * 15
    assert all(r.json()["choices"][0]["token_ids"] == alone for i, r in enumerate(answers) if i != 7)
    assert httpx.get(f"{base}/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks  # nothing leaked


def test_the_engine_refuses_what_a_step_could_not_run(local_server):
    """Behind the server's checks, Engine.add refuses on its own: the issue's poison was a prompt 5 tokens past the
    limit with max_tokens -5, whose reservation (prompt + max_tokens) looked exactly full."""
    from detaudit.engine.sequence import SamplingParams, Sequence
    from detaudit.errors import UsageError

    _, engine, _ = local_server
    limit = engine.max_model_len
    for prompt, max_tokens, why in [
        ([5] * (limit + 5), -5, "max_tokens must be at least 1"),
        ([5] * limit, 0, "max_tokens must be at least 1"),
        ([5, engine.spec.vocab_size], 1, "outside the model's vocabulary"),
        ([5, -1], 1, "outside the model's vocabulary"),
        ([5] * limit, 1, "exceeds the engine's max model length"),
    ]:
        with pytest.raises(UsageError, match=why):
            engine.add(Sequence(prompt, SamplingParams(max_tokens=max_tokens)))
    assert not engine.scheduler.waiting


def test_unexpected_handler_error_is_a_json_500(local_server, monkeypatch):
    base, engine, _ = local_server
    monkeypatch.setattr(engine, "encode_text", lambda _text: 1 / 0)
    r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=60)
    err = _error(r, 500)
    assert err["type"] == "server_error" and "ZeroDivisionError" in err["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_clients_that_leave_free_their_seats(local_server, stream):
    """4 clients take every seat with 2000-token requests, then drop their connections: their sequences are aborted
    (a non-streamed one used to run to its end while the next request waited, 29.5 s after 200 such clients), so a
    fresh request is served at once, long before the dropped ones could have finished."""
    base, engine, admitted = local_server
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps(
        {
            "model": "tiny",
            "prompt": [5, 6, 7],
            "max_tokens": 2000,
            "temperature": 0,
            "ignore_eos": True,
            "stream": stream,
        }
    ).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    before = len(admitted)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    for s in socks:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 60
    while httpx.get(f"{base}/health").json()["running"] < 4:
        assert time.monotonic() < deadline, "the four requests never ran"
        time.sleep(0.02)
    dropped = admitted[before:]
    for s in socks:
        s.close()
    t0 = time.monotonic()
    r = httpx.post(
        f"{base}/v1/completions",
        json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True},
        timeout=60,
    )
    waited = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert [s.finish_reason for s in dropped] == ["abort"] * 4
    assert all(len(s.output_ids) < 2000 for s in dropped)
    assert waited < 20, waited
    assert httpx.get(f"{base}/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks
