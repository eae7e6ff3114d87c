"""Capability probe: what an endpoint really returns, so a run asks for the richest capture it can get.

Servers accept parameters they ignore (`transformers serve` answers HTTP 200 with `"logprobs": null`; Ollama's
compat layer has dropped logprobs), so nothing is assumed: each capability is requested and the answer inspected.
A handful of tiny requests (max_tokens 4) per API, on a probe prompt of its own so scripted schedules and prefix
caches of the audited prompts are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detaudit.audit.client import Api, CallResult, OpenAIClient

PROBE_PROMPT = "Reply with one word: ready."
PROBE_MAX_TOKENS = 4
CAPTURE_ORDER = ("text", "tokens", "token_ids")


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


async def probe_api(
    client: OpenAIClient, api: Api, model: str | None, extra_body: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Probe one API. `request_fields` in the result are what a run adds to each request for the best capture."""
    extra = dict(extra_body or {})
    out: dict[str, Any] = {"ok": False, "error": None, "seed_accepted": False, "system_fingerprint": False,
                           "logprobs": False, "top_logprobs": False, "bytes": False, "token_ids": None,
                           "stream": False, "capture": "text", "request_fields": {}}  # fmt: skip

    def ok(res: CallResult) -> bool:
        return res.completion is not None

    res = await client.call(api, _body(api, model, {**extra, "seed": 0}))
    out["seed_accepted"] = ok(res)
    if not ok(res):
        res = await client.call(api, _body(api, model, extra))
    if not ok(res):
        out["error"] = res.error
        return out
    assert res.completion is not None
    out["ok"] = True
    out["system_fingerprint"] = res.completion.system_fingerprint is not None
    out["model"] = res.completion.model

    lp = logprob_fields(api, 2)
    res = await client.call(api, _body(api, model, {**extra, **lp, "return_token_ids": True}))
    ids_via = "return_token_ids"
    if not ok(res):  # strict servers reject unknown fields with a 400
        res = await client.call(api, _body(api, model, {**extra, **lp}))
        ids_via = None
    c = res.completion
    if c is not None:
        out["logprobs"] = c.logprobs is not None
        out["top_logprobs"] = c.top_logprobs is not None
        out["bytes"] = c.token_bytes is not None
        if c.token_ids is not None and ids_via:
            out["token_ids"] = ids_via
    if out["logprobs"] and out["token_ids"] is None:
        res = await client.call(api, _body(api, model, {**extra, **lp, "return_tokens_as_token_ids": True}))
        if res.completion is not None and res.completion.token_ids is not None:
            out["token_ids"] = "return_tokens_as_token_ids"

    res = await client.call(api, _body(api, model, extra), stream=True)
    out["stream"] = ok(res)
    if not out["stream"]:
        out["stream_error"] = res.error

    if out["token_ids"]:
        out["capture"] = "token_ids"
        out["request_fields"] = {out["token_ids"]: True}
    elif out["logprobs"]:
        out["capture"] = "tokens"
    return out


async def probe_endpoint(
    client: OpenAIClient,
    model: str | None,
    apis: tuple[Api, ...] = ("chat", "completions"),
    extra_body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Probe each API in `apis`; the result is stored as manifest.probe and printed by `detaudit probe endpoint`."""
    return {"model": model, "apis": {api: await probe_api(client, api, model, extra_body) for api in apis}}
