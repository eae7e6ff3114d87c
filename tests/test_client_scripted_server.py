"""The scripted server keeps its promises: exact schedule counts under concurrency, load mode, shapes, auth, faults."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx

A = ["Richard", " Feynman", " was", " born", " in", " Queens"]
B = A[:4] + [" in", " New", " York"]


async def _many(base_url: str, bodies: list[dict], path: str = "/chat/completions", **kw) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10, limits=httpx.Limits(max_connections=64)) as c:
        return await asyncio.gather(*[c.post(path, json=b, **kw) for b in bodies])


def _chat(prompt: str, **extra) -> dict:
    return {"model": "scripted-model", "messages": [{"role": "user", "content": prompt}], **extra}


def test_exact_counts_by_arrival_under_concurrency(scripted_server) -> None:
    server = scripted_server(completions={"A": A, "B": B}, schedules={"P": [("A", 92), ("B", 8)]})
    replies = asyncio.run(_many(server.base_url, [_chat("P") for _ in range(100)]))
    texts = Counter(r.json()["choices"][0]["message"]["content"] for r in replies)
    assert texts == {server.text("A"): 92, server.text("B"): 8}


def test_load_mode_serial_vs_loaded(scripted_server) -> None:
    server = scripted_server(
        completions={"A": A, "B": B, "C": A[:2]}, latency_s=0.05, schedules={"P": {"serial": "A", "loaded": ["B", "C"]}}
    )

    async def serial() -> set[str]:
        async with httpx.AsyncClient(base_url=server.base_url) as c:
            return {
                (await c.post("/chat/completions", json=_chat("P"))).json()["choices"][0]["message"]["content"]
                for _ in range(5)
            }

    assert asyncio.run(serial()) == {server.text("A")}
    loaded = asyncio.run(_many(server.base_url, [_chat("P") for _ in range(20)]))
    assert len({r.json()["choices"][0]["message"]["content"] for r in loaded}) > 1


def test_vllm_ids_logprobs_and_openai_strictness(scripted_server) -> None:
    server = scripted_server(completions={"A": A}, default="A")
    (r,) = asyncio.run(_many(server.base_url, [_chat("x", logprobs=True, top_logprobs=3, return_token_ids=True)]))
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == server.token_ids("A")
    assert [e["token"] for e in choice["logprobs"]["content"]] == A
    assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 3
    (r,) = asyncio.run(
        _many(
            server.base_url, [{"prompt": "x", "logprobs": 2, "return_tokens_as_token_ids": True}], path="/completions"
        )
    )
    assert r.json()["choices"][0]["logprobs"]["tokens"][0] == f"token_id:{server.token_id('Richard')}"
    strict = scripted_server(capture="openai")
    (r,) = asyncio.run(_many(strict.base_url, [_chat("x", return_token_ids=True)]))
    assert r.status_code == 400
    text_only = scripted_server(capture="text")
    (r,) = asyncio.run(_many(text_only.base_url, [_chat("x", logprobs=True)]))
    assert r.json()["choices"][0]["logprobs"] is None


def test_auth_and_streaming_truncation(scripted_server) -> None:
    server = scripted_server(
        completions={"A": A}, default="A", api_key="sk-test-123", faults={"first": ["truncated_sse"]}
    )
    (r,) = asyncio.run(_many(server.base_url, [_chat("x")]))
    assert r.status_code == 401
    auth = {"headers": {"Authorization": "Bearer sk-test-123"}}
    # the two requests race: the first to arrive is the one cut short, whichever of the two it is
    cut, whole = sorted(
        asyncio.run(_many(server.base_url, [_chat("x", stream=True)] * 2, **auth)), key=lambda r: "[DONE]" in r.text
    )
    assert "[DONE]" not in cut.text and whole.text.rstrip().endswith("data: [DONE]")
    events = [json.loads(line[6:]) for line in whole.text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == server.text("A")


def test_standalone_process_mode(tmp_path) -> None:
    from servers import spawn

    proc, base_url = spawn({"completions": {"A": A, "B": B}, "schedules": {"P": [["A", 3], ["B", 1]]}}, tmp_path)
    try:
        assert base_url.startswith("http://127.0.0.1:")
        replies = asyncio.run(_many(base_url, [_chat("P") for _ in range(4)]))
        texts = Counter(r.json()["choices"][0]["message"]["content"] for r in replies)
        assert texts == {"".join(A): 3, "".join(B): 1}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
