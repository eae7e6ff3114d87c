"""The HTTP client against the scripted server: parsing every shape, retries, Retry-After, broken answers, secrets."""

from __future__ import annotations

import asyncio
import base64

import pytest
from runhelp import NYC, QUEENS

from detaudit.audit.client import OpenAIClient
from detaudit.redact import Scrubber, redact_url, url_secrets


def _call(server, api: str, body: dict, *, stream: bool = False, **client_kw):
    async def go():
        async with OpenAIClient(server.base_url, **client_kw) as c:
            return await c.call(api, body, stream=stream)

    return asyncio.run(go())


def _body(api: str, **extra) -> dict:
    return {
        "model": "scripted-model",
        **({"messages": [{"role": "user", "content": "x"}]} if api == "chat" else {"prompt": "x"}),
        **extra,
    }


@pytest.mark.parametrize("api", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_token_id_strings_and_ids_parse_the_same_whole_or_streamed(api, stream, scripted_server) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    lp = {"logprobs": True, "top_logprobs": 2} if api == "chat" else {"logprobs": 2}
    ids = _call(server, api, _body(api, **lp, return_token_ids=True), stream=stream).completion
    as_ids = _call(server, api, _body(api, **lp, return_tokens_as_token_ids=True), stream=stream).completion
    expected = server.token_ids("Q")
    assert ids.token_ids == expected and ids.tokens == QUEENS and ids.text == server.text("Q")
    assert as_ids.token_ids == expected and as_ids.tokens is None
    assert as_ids.top_token_ids is not None and as_ids.top_token_ids[0][0] == expected[0]
    assert len(ids.logprobs) == len(QUEENS) and len(ids.top_logprobs[0]) == 2
    assert ids.top_logprobs[0][0] >= ids.top_logprobs[0][1]  # best first
    assert ids.finish_reason == "stop" and ids.model == "scripted-model" and ids.system_fingerprint == "fp_scripted"
    if api == "chat":
        assert ids.token_bytes == [t.encode() for t in QUEENS]


def test_invalid_utf8_bytes_and_nul_tokens_are_kept_exactly(scripted_server) -> None:
    odd = [{"token": "caf", "bytes": [99, 97, 102]}, {"token": "\ufffd", "bytes": [0xC3]}, "\x00", ""]
    server = scripted_server(completions={"odd": odd, "Q": QUEENS}, default="odd")
    c = _call(server, "chat", _body("chat", logprobs=True)).completion
    assert c.token_bytes == [b"caf", b"\xc3", b"\x00", b""]
    assert c.text == "caf\ufffd\x00"


def test_retry_after_is_honoured_and_counted(scripted_server) -> None:
    faults = {"first": ["429", "503"], "retry_after": 0.3}
    server = scripted_server(completions={"Q": QUEENS}, default="Q", faults=faults)
    res = _call(server, "chat", _body("chat"), retries=3, backoff=0.01)
    assert res.completion is not None and res.attempts == 3
    assert res.latency_s >= 0.3  # the 429's Retry-After, not the 10 ms backoff
    assert res.errors[0].startswith("HTTP 429") and res.errors[1].startswith("HTTP 503")


def test_retries_run_out_into_a_failure_with_its_reason(scripted_server) -> None:
    server = scripted_server(faults={"first": ["500", "502", "500"]})
    res = _call(server, "chat", _body("chat"), retries=2, backoff=0.01)
    assert res.completion is None and res.attempts == 3
    assert res.error == "HTTP 500: Injected 500 (after 3 attempts)"


def test_client_errors_are_not_retried(scripted_server) -> None:
    server = scripted_server(capture="openai")
    res = _call(server, "chat", _body("chat", return_token_ids=True), retries=5, backoff=0.01)
    assert res.attempts == 1 and res.error.startswith("HTTP 400: Unrecognized request argument")


@pytest.mark.parametrize(
    "fault,stream,reason",
    [
        ("malformed", False, "malformed JSON"),
        ("non_openai", False, "not an OpenAI completion"),
        ("reset", False, "connection broken"),
        ("truncated_sse", True, "stream ended before [DONE] or a finish_reason"),
        ("reset", True, "connection broken"),
        ("html", False, "HTML error page"),
        ("timeout", False, "deadline: no whole answer within 0.5s"),
    ],
)
def test_broken_answers_are_retried_then_succeed(fault, stream, reason, scripted_server) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", faults={"first": [fault], "hang_s": 2})
    res = _call(server, "chat", _body("chat"), stream=stream, retries=1, backoff=0.01, timeout=0.5)
    assert res.completion is not None and res.completion.text == server.text("Q"), res.errors
    assert res.attempts == 2 and reason in res.errors[0]


def test_each_request_is_fresh_no_cache(scripted_server) -> None:
    server = scripted_server(completions={"Q": QUEENS, "N": NYC}, schedules={"x": [("Q", 1), ("N", 1)]})

    async def go():
        async with OpenAIClient(server.base_url) as c:
            return [await c.call("chat", _body("chat")) for _ in range(4)]

    texts = [r.completion.text for r in asyncio.run(go())]
    assert sorted(texts) == sorted([server.text("Q"), server.text("N")] * 2)
    assert server.stats["requests"] == 4


def test_secrets_are_scrubbed_from_errors(scripted_server) -> None:
    server = scripted_server(api_key="sk-live-abcdefgh1234")
    url = server.base_url.replace("http://", "http://alice:hunter2pass@")
    res = _call(
        server, "chat", _body("chat"), retries=0, api_key="sk-live-abcdefgh9999", headers={"X-Secret": "tok-zzzz-5555"}
    )
    assert res.error.startswith("HTTP 401")
    assert redact_url(url) == server.base_url.replace("http://", "http://***@")
    assert redact_url("https://h/v1?api-key=abc123&x=1") == "https://h/v1?api-key=***&x=1"
    # the password, and the Basic-auth token httpx builds from it (a server that echoes the header leaks that)
    assert url_secrets(url) == ["hunter2pass", base64.b64encode(b"alice:hunter2pass").decode()]
    scrub = Scrubber(["Bearer sk-live-abcdefgh9999", "tok-zzzz-5555"])
    assert scrub.scrub("sent sk-live-abcdefgh9999 and tok-zzzz-5555") == "sent *** and ***"
