"""Capability probe: what an endpoint really returns, so a run asks for the richest capture it can get.

Servers accept parameters they ignore (`transformers serve` answers HTTP 200 with `"logprobs": null`; Ollama's
compat layer has dropped logprobs; llama-cpp-python takes any field at all), so nothing is assumed: each capability
is requested and the answer inspected, and `seed` is judged against a made-up field sent beside it.
A handful of tiny requests (max_tokens 4) per API, on a probe prompt of its own so scripted schedules and prefix
caches of the audited prompts are untouched.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from detaudit.audit.client import OpenAIClient
from detaudit.audit.completion import Api, CallResult

PROBE_PROMPT = "Reply with one word: ready."
PROBE_MAX_TOKENS = 4
CAPTURE_ORDER = ("text", "tokens", "token_ids")
# Sent with the first probe request beside `seed`: no server knows it, so one that accepts it accepts any field.
BOGUS_FIELD = "detaudit_probe_bogus_field"


def _body(api: Api, model: str | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {**extra, "max_tokens": PROBE_MAX_TOKENS, "temperature": 0}
    if model:
        body["model"] = model
    if api == "chat":
        body["messages"] = [{"role": "user", "content": PROBE_PROMPT}]
    else:
        body["prompt"] = PROBE_PROMPT
    return body


def logprob_fields(api: Api, top_k: int) -> dict[str, Any]:
    """The request fields that ask for per-token logprobs (and top-k alternatives when top_k > 0)."""
    if api == "chat":
        return {"logprobs": True, **({"top_logprobs": top_k} if top_k else {})}
    return {"logprobs": max(top_k, 1)}


def stream_fields(api: Api) -> dict[str, Any]:
    """The request fields a streamed request adds: usage in the last chunk (chat; not every completions server
    takes stream_options)."""
    return {"stream_options": {"include_usage": True}} if api == "chat" else {}


async def probe_api(
    client: OpenAIClient, api: Api, model: str | None, extra_body: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Probe one API. `request_fields` in the result are what a run adds to each request for the best capture."""
    extra = dict(extra_body or {})
    out: dict[str, Any] = {
        "ok": False,
        "error": None,
        "seed": "rejected",
        "system_fingerprint": False,
        "logprobs": False,
        "top_logprobs": False,
        "bytes": False,
        "token_ids": None,
        "stream": False,
        "stream_usage": False,
        "capture": "text",
        "request_fields": {},
    }

    def ok(res: CallResult) -> bool:
        return res.completion is not None

    # A server that takes a made-up field takes anything: its taking `seed` says nothing about honouring it.
    res = await client.call(api, _body(api, model, {**extra, "seed": 0, BOGUS_FIELD: True}))
    if ok(res):
        out["seed"] = "ignored-or-unknown"
    else:
        res = await client.call(api, _body(api, model, {**extra, "seed": 0}))
        out["seed"] = "accepted" if ok(res) else "rejected"
    if not ok(res):
        res = await client.call(api, _body(api, model, extra))
    if not ok(res):
        out["error"] = res.error
        return out
    assert res.completion is not None
    out["ok"] = True
    out["system_fingerprint"] = res.completion.system_fingerprint is not None
    out["model"] = res.completion.model

    # Logprobs first on their own: whichever shape they come in (answers.py reads every known one), and ids may
    # come with them (llama-server's entry ids); only then vLLM's two switches.
    lp = logprob_fields(api, 2)
    c = (await client.call(api, _body(api, model, {**extra, **lp}))).completion
    if c is not None:
        out["logprobs"] = c.logprobs is not None
        out["top_logprobs"] = c.top_logprobs is not None
        out["bytes"] = c.token_bytes is not None
        out["token_ids"] = "logprobs" if c.token_ids is not None else None
    if out["token_ids"] is None:
        switches = ("return_token_ids", "return_tokens_as_token_ids") if out["logprobs"] else ("return_token_ids",)
        for switch in switches:
            c = (await client.call(api, _body(api, model, {**extra, **lp, switch: True}))).completion
            if c is not None and c.token_ids is not None:  # strict servers reject unknown fields with a 400
                out["token_ids"] = switch
                out["request_fields"] = {switch: True}
                break

    res = await client.call(api, _body(api, model, {**extra, **stream_fields(api)}), stream=True)
    out["stream"] = ok(res)
    if res.completion is not None:
        out["stream_usage"] = res.completion.completion_tokens is not None
    else:
        out["stream_error"] = res.error

    if out["token_ids"]:
        out["capture"] = "token_ids"
    elif out["logprobs"]:
        out["capture"] = "tokens"
    return out


async def probe_endpoint(
    client: OpenAIClient,
    model: str | None,
    apis: tuple[Api, ...] = ("chat", "completions"),
    extra_body: Mapping[str, Any] | None = None,
    cache: bool = False,
) -> dict[str, Any]:
    """Probe each API in `apis` (with `cache`, its prefix cache too, as `probe_cache`); printed by `detaudit probe
    endpoint`."""
    out: dict[str, Any] = {"model": model, "apis": {}}
    for api in apis:
        res = await probe_api(client, api, model, extra_body)
        if cache and res["ok"]:
            res["cache"] = await probe_cache(client, api, model, extra_body)
        out["apis"][api] = res
    return out


# Long enough to fill a few cache blocks of any common size (vLLM's 16 tokens, our engine's), short enough for a
# tiny model's context; its first line is unique to each probe, so its first request is a miss.
CACHE_PROBE_PROMPT = (
    "[probe {tag}]\nThe quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly; "
    "pack my box with five dozen liquor jugs, and sphinx of black quartz, judge my vow. Reply with one word."
)


async def probe_cache(
    client: OpenAIClient, api: Api, model: str | None, extra_body: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Whether the endpoint reports prefix-cache hits (usage.prompt_tokens_details.cached_tokens) and honours vLLM's
    cache_salt: the same new prompt twice (the second should hit), then once more with a salt of its own (a miss
    when the salt is honoured); failing that, whether POST /reset_prefix_cache (vLLM's dev route, `detaudit
    serve`'s) empties the cache. `cold` is how a run's cold arms are made: "cache_salt" or "reset" only when it was
    seen to work, else "nonce"."""
    extra = dict(extra_body or {})
    extra.pop("cache_salt", None)
    tag = secrets.token_hex(8)

    def body(salt: str | None = None) -> dict[str, Any]:
        out = _body(api, model, {**extra, **({"cache_salt": salt} if salt else {})})
        text = CACHE_PROBE_PROMPT.format(tag=tag)
        if api == "chat":
            out["messages"] = [{"role": "user", "content": text}]
        else:
            out["prompt"] = text
        return out

    out: dict[str, Any] = {"reports_cached_tokens": False, "warm_hit": None, "cache_salt": "unknown", "cold": "nonce"}
    first = await client.call(api, body())
    second = await client.call(api, body())
    if first.completion is None or second.completion is None:
        out["error"] = first.error or second.error
        return out
    cached = [first.completion.cached_tokens, second.completion.cached_tokens]
    out["cached_tokens"] = cached
    out["reports_cached_tokens"] = any(c is not None for c in cached)
    if cached[1] is None:
        return out
    out["warm_hit"] = cached[1] > 0
    if not out["warm_hit"]:
        return out  # nothing was cached: a salt's effect cannot be seen
    salted = await client.call(api, body(salt=f"detaudit-probe-{tag}"))
    if salted.completion is None:
        out["cache_salt"] = "rejected"
    elif salted.completion.cached_tokens == 0:
        out["cache_salt"], out["cold"] = "honoured", "cache_salt"
        return out
    else:
        out["cache_salt"] = "ignored"
    out["reset"] = await client.reset_prefix_cache()
    if out["reset"]:
        after = await client.call(api, body())
        if after.completion is not None and after.completion.cached_tokens == 0:
            out["cold"] = "reset"
    return out
