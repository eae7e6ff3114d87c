"""`detaudit probe ...`: what a target can do. `probe endpoint` asks an OpenAI-compatible endpoint directly."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from detaudit.audit.capabilities import probe_endpoint
from detaudit.audit.client import OpenAIClient
from detaudit.audit.endpoint import resolve_model, v1_hint
from detaudit.audit.request import (
    DEFAULT_KEY_ENV,
    MAX_SECONDS,
    api_key_from_env,
    base_url_or_default,
    check_base_url,
    check_credentials,
    parse_extra_body,
    parse_headers,
)
from detaudit.cli import helpfmt, options
from detaudit.cli.options import like
from detaudit.errors import UsageError
from detaudit.redact import redact_url
from detaudit.termsafe import json_text, safe

probe_app = typer.Typer(
    help="Probe what a target can do before auditing it.",
    no_args_is_help=True,
    cls=helpfmt.Group,
    epilog=helpfmt.example("detaudit probe endpoint --base-url http://127.0.0.1:8000/v1"),
)

_ROWS = [
    ("answers", "ok"),
    ("seed", "seed"),
    ("system_fingerprint", "system_fingerprint"),
    ("logprobs", "logprobs"),
    ("top_logprobs", "top_logprobs"),
    ("token bytes", "bytes"),
    ("token ids via", "token_ids"),
    ("streaming", "stream"),
    ("usage in streams", "stream_usage"),
    ("capture a run gets", "capture"),
]
# With --cache: rows from each API's `cache` entry (capabilities.probe_cache).
_CACHE_ROWS = [
    ("cached_tokens reported", "reports_cached_tokens"),
    ("repeat hits the cache", "warm_hit"),
    ("cache_salt", "cache_salt"),
    ("cold arms made by", "cold"),
]


async def _probe(
    base_url: str,
    api_key: str | None,
    headers: dict[str, str],
    model: str | None,
    apis: tuple[Any, ...],
    timeout: float,
    retries: int,
    extra: dict[str, Any],
    cache: bool,
) -> dict[str, Any]:
    async with OpenAIClient(
        base_url, api_key=api_key, headers=headers, timeout=timeout, retries=retries, backoff=0.2
    ) as client:
        model, models = await resolve_model(client, model, base_url)
        result = await probe_endpoint(client, model, apis, extra, cache)
    return {"base_url": redact_url(base_url), "models": models, **result}


def render_probe(result: dict[str, Any], console: Console) -> None:
    """The capability table; every value the endpoint sent (model, fingerprint, errors) shown as plain safe text."""
    table = Table(title=Text(f"{safe(result['base_url'])}  model {safe(result['model'])}"))
    table.add_column("capability")
    for api in result["apis"]:
        table.add_column(api)
    rows = [(label, key, False) for label, key in _ROWS]
    if any("cache" in res for res in result["apis"].values()):
        rows += [(label, key, True) for label, key in _CACHE_ROWS]
    for label, key, in_cache in rows:
        cells = []
        for res in result["apis"].values():
            v = (res.get("cache") or {}).get(key) if in_cache else res.get(key)
            cells.append(Text("yes" if v is True else "no" if v in (False, None) else safe(v)))
        table.add_row(label, *cells)
    console.print(table)
    for api, res in result["apis"].items():
        if res.get("error"):
            hint = v1_hint(result["base_url"], res["error"])
            console.print(f"{api}: {safe(res['error'] + hint)}", highlight=False, markup=False, soft_wrap=True)
    if any(res.get("seed") == "ignored-or-unknown" for res in result["apis"].values()):
        console.print(
            "seed ignored-or-unknown: the server also accepted a made-up field, so accepting seed is no evidence "
            "that it is honoured",
            highlight=False,
            markup=False,
        )


@probe_app.command(
    "endpoint",
    help="Which APIs answer; whether logprobs, top_logprobs, token ids, streaming, seed "
    "and system_fingerprint come back.",
    epilog=helpfmt.example("detaudit probe endpoint --base-url http://127.0.0.1:8000/v1 --api both --json"),
    cls=helpfmt.Command,
)
def endpoint_command(
    base_url: options.BaseUrl = None,
    api_key_env: Annotated[
        str, like(options.ApiKeyEnv, help="Environment variable holding the key.")
    ] = DEFAULT_KEY_ENV,
    model: Annotated[str | None, like(options.Model, help="Model name (default: the only model listed).")] = None,
    api: Annotated[str, like(options.Api, help="chat, completions or both.")] = "both",
    header: Annotated[list[str], like(options.Header, help="Extra 'Name: value' header (repeatable).")] = [],
    extra_body: Annotated[str | None, like(options.ExtraBody, help="JSON object merged into every request.")] = None,
    timeout: Annotated[float, like(options.Timeout, help="Seconds per HTTP attempt.")] = 30.0,
    retries: Annotated[int, like(options.Retries, help="Retries per probe request.")] = 2,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache",
            help="Also probe the prefix cache: whether cached_tokens are reported, whether cache_salt or "
            "POST /reset_prefix_cache make a repeat miss (what `run --cache cold` will use).",
        ),
    ] = False,
    as_json: Annotated[bool, like(options.Json, help="Print the result as JSON.")] = False,
) -> None:
    if api not in ("chat", "completions", "both"):
        raise UsageError(f"--api must be chat, completions or both, got {api!r}")
    if not 0 < timeout <= MAX_SECONDS:  # `not`: NaN fails too
        raise UsageError(f"--timeout must be > 0 and at most {MAX_SECONDS:g} s, got {timeout}")
    if retries < 0:
        raise UsageError(f"--retries must be >= 0, got {retries}")
    url = check_base_url(base_url_or_default(base_url))
    key = api_key_from_env(api_key_env)
    headers = parse_headers(header)
    check_credentials(url, key, headers, api_key_env)
    apis = ("chat", "completions") if api == "both" else (api,)
    extra = parse_extra_body(extra_body)
    result = asyncio.run(_probe(url, key, headers, model, apis, timeout, retries, extra, cache))
    if as_json:
        typer.echo(json_text(result))
    else:
        render_probe(result, Console())
