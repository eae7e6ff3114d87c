"""Answers that are not completions, and the limits of one attempt, against the scripted server on 127.0.0.1.

Each bad answer is sent verbatim on the wire (the server's "raw" fault) to the real client: it must end as an error
with its machine-readable reason and the start of what was sent, retried when another attempt may succeed.
"""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
from runhelp import QUEENS, cli

from detaudit.audit.client import OpenAIClient, _error_message
from detaudit.audit.completion import RAW_CHARS
from detaudit.rundir.io import read_samples

_HEAD = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "scripted-model"}


def _call(server, api: str = "chat", *, stream: bool = False, **client_kw):
    body = {
        "model": "scripted-model",
        **({"messages": [{"role": "user", "content": "x"}]} if api == "chat" else {"prompt": "x"}),
    }

    async def go():
        async with OpenAIClient(server.base_url, **client_kw) as c:
            return await c.call(api, body, stream=stream)

    return asyncio.run(go())


def _entry(token: str, **over) -> dict:
    return {
        "token": token,
        "logprob": -0.5,
        "bytes": list(token.encode("utf-8", "surrogatepass")),
        "top_logprobs": [{"token": token, "logprob": -0.5}, {"token": "x", "logprob": -2.0}],
        **over,
    }


def _chat(message: dict | None = None, *, choice: dict | None = None, **head) -> str:
    """A chat answer (two tokens with logprobs and ids) with `message`, `choice` and head fields replaced."""
    msg = {"role": "assistant", "content": "ab", **(message or {})}
    ch = {
        "index": 0,
        "message": msg,
        "finish_reason": "stop",
        "token_ids": [5, 6],
        "logprobs": {"content": [_entry("a"), _entry("b")]},
        **(choice or {}),
    }
    return json.dumps({**_HEAD, "choices": [ch], "usage": {"prompt_tokens": 3, "completion_tokens": 2}, **head})


def _completion(logprobs: dict) -> str:
    lp = {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"a": -0.5}, {"b": -0.25}],
        **logprobs,
    }
    ch = {"index": 0, "text": "ab", "finish_reason": "stop", "logprobs": lp}
    return json.dumps({**_HEAD, "object": "text_completion", "choices": [ch]})


def _llama(*entries: dict, text: str = "ab") -> str:
    """A /v1/completions answer as llama-server sends it: chat-shaped logprobs, each entry with its token id."""
    ch = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": {"content": list(entries)}}
    return json.dumps({**_HEAD, "object": "text_completion", "choices": [ch]})


def _sse(*events: object, done: bool = True) -> str:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines) + ("data: [DONE]\n\n" if done else "")


def _chunk(delta: dict | None = None, **choice) -> dict:
    ch = {"index": 0, "delta": {"content": "ab"} if delta is None else delta, "finish_reason": None, **choice}
    return {**_HEAD, "object": "chat.completion.chunk", "choices": [ch]}


_STOP = _chunk({}, finish_reason="stop")

# (case, api, streamed, body on the wire, reason, retried)
CASES = [
    ("model is a number", "chat", False, _chat(model=123), "malformed:model", True),
    (
        "usage count is a string",
        "chat",
        False,
        _chat(usage={"prompt_tokens": "8"}),
        "malformed:usage.prompt_tokens",
        True,
    ),
    (
        "token id above int32",
        "chat",
        False,
        _chat(choice={"token_ids": [5, 2**31]}),
        "malformed:choices.token_ids",
        True,
    ),
    (
        "token id not an integer",
        "chat",
        False,
        _chat(choice={"token_ids": [5, 6.5]}),
        "malformed:choices.token_ids",
        True,
    ),
    (
        "finish_reason is a dict",
        "chat",
        False,
        _chat(choice={"finish_reason": {"type": "stop"}}),
        "malformed:choices.finish_reason",
        True,
    ),
    (
        "lone surrogate token",
        "chat",
        False,
        _chat(choice={"logprobs": {"content": [_entry("a"), _entry("\ud800")]}}),
        "malformed:choices.logprobs.content.token",
        True,
    ),
    ("lone surrogate text", "chat", False, _chat({"content": "a\udc00"}), "malformed:choices.message.content", True),
    (
        "token byte above 255",
        "chat",
        False,
        _chat(choice={"logprobs": {"content": [_entry("a", bytes=[97, 256]), _entry("b")]}}),
        "malformed:choices.logprobs.content.bytes",
        True,
    ),
    (
        "logprob is a string",
        "chat",
        False,
        _chat(choice={"logprobs": {"content": [_entry("a", logprob="-0.5"), _entry("b")]}}),
        "malformed:choices.logprobs.content.logprob",
        True,
    ),
    (
        "logprob beyond float32",
        "chat",
        False,
        _chat(choice={"logprobs": {"content": [_entry("a", logprob=-1e39), _entry("b")]}}),
        "malformed:choices.logprobs.content.logprob",
        True,
    ),
    (
        "top logprob is a bool",
        "chat",
        False,
        _chat(choice={"logprobs": {"content": [_entry("a", top_logprobs=[{"token": "a", "logprob": True}])]}}),
        "malformed:choices.logprobs.content.top_logprobs.logprob",
        True,
    ),
    ("NaN is not JSON", "chat", False, _chat().replace('"logprob": -0.5', '"logprob": NaN', 1), "malformed:json", True),
    (
        "content is a list",
        "chat",
        False,
        _chat({"content": [{"type": "text", "text": "ab"}]}),
        "malformed:choices.message.content",
        True,
    ),
    ("not JSON", "chat", False, '{"choices": [', "malformed:json", True),
    ("not a completion", "chat", False, '{"hello": "world"}', "not_openai", True),
    ("an array", "chat", False, "[1, 2]", "not_openai", True),
    ("error object in a 200", "chat", False, '{"error": {"message": "overloaded"}}', "server_error", True),
    ("content null", "chat", False, _chat({"content": None}), "no_content", False),
    ("refusal", "chat", False, _chat({"content": None, "refusal": "I can't help with that."}), "refusal", False),
    (
        "tool call",
        "chat",
        False,
        _chat(
            {
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            }
        ),
        "tool_calls",
        False,
    ),
    ("only index 1", "chat", False, _chat(choice={"index": 1}), "choice_index", True),
    ("no choices", "chat", False, json.dumps({**_HEAD, "choices": []}), "choice_index", True),
    (
        "completions: fewer logprobs than tokens",
        "completions",
        False,
        _completion({"token_logprobs": [-0.5]}),
        "malformed:choices.logprobs.token_logprobs",
        True,
    ),
    (
        "completions: string top logprob",
        "completions",
        False,
        _completion({"top_logprobs": [{"a": "-0.5"}, {"b": -0.25}]}),
        "malformed:choices.logprobs.top_logprobs",
        True,
    ),
    (
        "completions: token id above int32",
        "completions",
        False,
        _completion({"tokens": ["token_id:5", "token_id:99999999999"]}),
        "malformed:choices.logprobs.tokens",
        True,
    ),
    (
        "entry id is a string",
        "chat",
        False,
        _chat(choice={"logprobs": {"content": [_entry("a", id="5"), _entry("b", id=6)]}}),
        "malformed:choices.logprobs.content.id",
        True,
    ),
    (
        "completions, chat-shaped: entry id above int32",
        "completions",
        False,
        _llama(_entry("a", id=5), _entry("b", id=2**31)),
        "malformed:choices.logprobs.content.id",
        True,
    ),
    (
        "completions, chat-shaped: negative alternative id",
        "completions",
        False,
        _llama(_entry("a", id=5, top_logprobs=[{"token": "a", "logprob": -0.5, "id": -1}]), _entry("b", id=6)),
        "malformed:choices.logprobs.content.top_logprobs.id",
        True,
    ),
    (
        "completions, chat-shaped: id and token_id string disagree",
        "completions",
        False,
        _llama(_entry("token_id:5", id=6), _entry("b", id=7)),
        "malformed:choices.logprobs.content.id",
        True,
    ),
    (
        "completions: both shapes at once",
        "completions",
        False,
        _completion({"content": [_entry("a"), _entry("b")]}),
        "malformed:choices.logprobs",
        True,
    ),
    (
        "completions: text null",
        "completions",
        False,
        json.dumps({**_HEAD, "choices": [{"index": 0, "text": None, "finish_reason": "stop"}]}),
        "no_content",
        False,
    ),
    ("stream: only [DONE]", "chat", True, _sse(), "empty_stream", True),
    (
        "stream: only usage",
        "chat",
        True,
        _sse({**_HEAD, "choices": [], "usage": {"prompt_tokens": 3}}),
        "empty_stream",
        True,
    ),
    ("stream: keep-alives and [DONE]", "chat", True, ": keep-alive\n\n" * 3 + _sse(), "empty_stream", True),
    ("stream: error event", "chat", True, _sse(_chunk(), {"error": {"message": "boom"}}), "server_error", True),
    (
        "stream: bad byte",
        "chat",
        True,
        _sse(_chunk(logprobs={"content": [_entry("ab", bytes=[97, -1])]}), _STOP),
        "malformed:choices.logprobs.content.bytes",
        True,
    ),
    ("stream: bad event", "chat", True, _sse(_chunk(), "{not json", _STOP), "malformed:json", True),
    ("stream: refusal", "chat", True, _sse(_chunk({"content": None, "refusal": "No."}), _STOP), "refusal", False),
    (
        "stream: tool call",
        "chat",
        True,
        _sse(_chunk({"tool_calls": [{"index": 0, "id": "c1"}]}), _STOP),
        "tool_calls",
        False,
    ),
    ("stream: no content", "chat", True, _sse(_chunk({"role": "assistant"}), _STOP), "no_content", False),
    ("stream: cut", "chat", True, _sse(_chunk(), done=False), "truncated_stream", True),
    (
        "stream: two index 0",
        "chat",
        True,
        _sse({**_chunk(), "choices": [_chunk()["choices"][0]] * 2}, _STOP),
        "choice_index",
        True,
    ),
]


@pytest.mark.parametrize("case,api,stream,raw,reason,retried", CASES, ids=[c[0] for c in CASES])
def test_bad_answer_is_an_error_with_its_reason(case, api, stream, raw, reason, retried, scripted_server) -> None:
    server = scripted_server(faults={"first": ["raw", "raw"], "raw_body": raw.encode("utf-8", "surrogatepass")})
    res = _call(server, api, stream=stream, retries=1, backoff=0.01)
    assert res.completion is None, case
    assert res.error_reason == reason, (res.error_reason, res.error)
    assert res.attempts == (2 if retried else 1)
    assert res.raw_answer and len(res.raw_answer) <= RAW_CHARS
    assert res.raw_answer.encode("utf-8")  # storable as UTF-8 (a lone surrogate on the wire became U+FFFD)
    assert "\n" not in res.error


def test_the_choice_with_index_0_is_taken_not_the_first(scripted_server) -> None:
    first, second = {"index": 1, "message": {"content": "one"}}, {"index": 0, "message": {"content": "zero"}}
    server = scripted_server(faults={"first": ["raw"], "raw_body": json.dumps({**_HEAD, "choices": [first, second]})})
    res = _call(server, retries=0)
    assert res.completion is not None and res.completion.text == "zero"


def test_vllm_answers_still_parse_whole_and_streamed(scripted_server) -> None:
    """The strict parser keeps the shapes the real servers send: a valid answer of every field parses."""
    server = scripted_server(faults={"first": ["raw"], "raw_body": _chat()})
    c = _call(server, retries=0).completion
    assert c.text == "ab" and c.token_ids == [5, 6] and c.tokens == ["a", "b"] and c.token_bytes == [b"a", b"b"]
    assert c.top_tokens == [["a", "x"], ["b", "x"]] and c.prompt_tokens == 3 and c.finish_reason == "stop"
    server = scripted_server(faults={"first": ["raw"], "raw_body": _sse(_chunk(), _STOP)})
    c = _call(server, stream=True, retries=0).completion
    assert c.text == "ab" and c.finish_reason == "stop" and c.model == "scripted-model"


def _with_ids(token: str, tid: int) -> dict:
    return _entry(
        token,
        id=tid,
        top_logprobs=[{"token": token, "logprob": -0.5, "id": tid}, {"token": "x", "logprob": -2.0, "id": 9}],
    )


def test_llama_server_shape_on_completions_gives_ids_whole_and_streamed(scripted_server) -> None:
    """Chat-shaped logprobs on /v1/completions (llama-server) are per-token data, and each entry's `id` a token id:
    ids, strings, bytes and both alternative columns come back, whole or streamed."""
    server = scripted_server(faults={"first": ["raw"], "raw_body": _llama(_with_ids("a", 5), _with_ids("b", 6))})
    c = _call(server, "completions", retries=0).completion
    assert c.text == "ab" and c.token_ids == [5, 6] and c.tokens == ["a", "b"] and c.token_bytes == [b"a", b"b"]
    assert c.logprobs == [-0.5, -0.5] and c.top_token_ids == [[5, 9], [6, 9]]
    assert c.top_tokens == [["a", "x"], ["b", "x"]] and c.top_logprobs == [[-0.5, -2.0], [-0.5, -2.0]]
    chunks = [
        {**_HEAD, "choices": [{"index": 0, "text": t, "logprobs": {"content": [_with_ids(t, i)]}}]}
        for t, i in (("a", 5), ("b", 6))
    ]
    stop = {**_HEAD, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
    server = scripted_server(faults={"first": ["raw"], "raw_body": _sse(*chunks, stop)})
    c = _call(server, "completions", stream=True, retries=0).completion
    assert c.text == "ab" and c.token_ids == [5, 6] and c.top_token_ids == [[5, 9], [6, 9]]
    # alternatives out of order are sorted with their ids; an entry without ids leaves ids unknown, strings kept
    unsorted = _entry(
        "a", id=5, top_logprobs=[{"token": "x", "logprob": -2.0, "id": 9}, {"token": "a", "logprob": -0.5, "id": 5}]
    )
    server = scripted_server(faults={"first": ["raw"], "raw_body": _llama(unsorted, _entry("b"))})
    c = _call(server, "completions", retries=0).completion
    assert c.token_ids is None and c.tokens == ["a", "b"] and c.top_token_ids is None
    assert c.top_tokens == [["a", "x"], ["b", "x"]]


def test_the_legacy_shape_on_chat_is_read_too(scripted_server) -> None:
    """Shapes do not follow the API: legacy completions lists in a chat answer are per-token data as well."""
    legacy = {"tokens": ["a", "b"], "token_logprobs": [-0.5, -0.25], "top_logprobs": [{"a": -0.5}, {"b": -0.25}]}
    server = scripted_server(faults={"first": ["raw"], "raw_body": _chat(choice={"logprobs": legacy})})
    c = _call(server, retries=0).completion
    assert c.tokens == ["a", "b"] and c.logprobs == [-0.5, -0.25] and c.top_tokens == [["a"], ["b"]]


def test_secrets_in_a_bad_answer_are_scrubbed_from_raw_answer(scripted_server) -> None:
    key = "sk-live-echoed-1234"
    server = scripted_server(faults={"first": ["raw"], "raw_body": '{"echo": "Bearer ' + key + '"}'})
    res = _call(server, retries=0, api_key=key)
    assert res.error_reason == "not_openai" and key not in res.raw_answer and "***" in res.raw_answer


def test_server_error_text_is_one_bounded_line() -> None:
    body = orjson.dumps({"error": {"message": "line one\nline two\x1b]0;x\x07 " + "y" * 5000}})
    msg = _error_message(body, "application/json")
    assert msg.startswith("line one line two") and "\n" not in msg and len(msg) <= 200
    assert _error_message(b"<html>" + b"z" * 10_000, "text/html").startswith("HTML error page")


# ---------------------------------------------------------------------------- limits of one attempt


@pytest.mark.parametrize(
    "fault,stream", [("trickle", False), ("trickle", True), ("keepalive", False), ("keepalive", True)]
)
def test_timeout_is_a_deadline_for_the_whole_attempt(fault, stream, scripted_server) -> None:
    """A byte every 0.2 s (or keep-alives) never trips an idle timeout; the deadline stops the attempt anyway."""
    server = scripted_server(
        completions={"Q": QUEENS}, default="Q", faults={"first": [fault], "trickle_s": 0.2, "hang_s": 3}
    )
    res = _call(server, stream=stream, retries=0, timeout=1.0)
    assert res.error_reason == "deadline", res.error
    assert 0.9 < res.latency_s < 2.5
    assert res.raw_answer  # what had come so far


def test_a_deadline_is_retried(scripted_server) -> None:
    server = scripted_server(
        completions={"Q": QUEENS}, default="Q", faults={"first": ["trickle"], "trickle_s": 0.2, "hang_s": 3}
    )
    res = _call(server, retries=1, backoff=0.01, timeout=1.0)
    assert res.completion is not None and res.completion.text == server.text("Q")
    assert res.attempts == 2 and res.errors[0].startswith("deadline")


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_over_the_size_limit_is_too_large_and_not_retried(stream, scripted_server) -> None:
    """Read with no content-length (raw bodies come chunked): the client stops at the limit, not at the end."""
    raw = _sse(*[_chunk()] * 4000) if stream else _chat({"content": "z" * 600_000})
    server = scripted_server(faults={"first": ["raw"], "raw_body": raw})
    res = _call(server, stream=stream, retries=3, max_response_bytes=100_000)
    assert res.error_reason == "too_large" and res.attempts == 1, res.error
    assert len(res.raw_answer) == RAW_CHARS


def test_a_declared_length_over_the_limit_is_refused_before_reading(scripted_server) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    res = _call(server, retries=3, max_response_bytes=100)
    assert res.error_reason == "too_large" and res.attempts == 1
    assert _call(server, retries=0, max_response_bytes=10_000).completion is not None


# ---------------------------------------------------------------------------- into the run directory


def test_error_rows_carry_reason_and_raw_answer(scripted_server, capsys, tmp_path) -> None:
    faults = {"first": ["raw", "raw"], "prompts": ["hi"], "raw_body": _chat(model=123)}
    server = scripted_server(completions={"Q": QUEENS}, default="Q", faults=faults)
    out = tmp_path / "r"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 5, "--retries", 0, "--out", out)
    assert r.code == 0, r.err
    rows = sorted(read_samples(out).to_pylist(), key=lambda row: row["sample_index"])
    assert [row["sample_index"] for row in rows] == [0, 1, 2, 3, 4]
    failed = [row for row in rows if row["status"] == "error"]
    assert len(failed) == 2 and all(row["error_reason"] == "malformed:model" for row in failed)
    assert all(row["raw_answer"].startswith('{"id": "chatcmpl-1"') for row in failed)
    ok = [row for row in rows if row["status"] == "ok"]
    assert ok[0]["error_reason"] is None and ok[0]["raw_answer"] is None


def test_max_response_bytes_is_recorded_and_checked(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    out = tmp_path / "r"
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "-p",
        "hi",
        "-n",
        1,
        "--max-response-bytes",
        1_000_000,
        "--out",
        out,
    )
    assert r.code == 0, r.err
    from detaudit.rundir.io import load_manifest

    assert load_manifest(out).params.max_response_bytes == 1_000_000
    r = cli(
        capsys, "run", "--base-url", server.base_url, "-p", "hi", "--max-response-bytes", 0, "--out", tmp_path / "bad"
    )
    assert r.code == 2 and "--max-response-bytes" in r.err and not (tmp_path / "bad").exists()
    r = cli(capsys, "run", "--resume", "--out", out, "--max-response-bytes", 5)
    assert r.code == 2 and "--max-response-bytes" in r.err
