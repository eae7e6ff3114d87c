"""`detaudit probe endpoint` reports what each server shape really returns, and the run picks its capture from it."""

from __future__ import annotations

import json

import pytest
from runhelp import cli

_VLLM = {"token_ids": "return_token_ids", "capture": "token_ids", "request_fields": {"return_token_ids": True}}
_NO_IDS = {"token_ids": None, "request_fields": {}}


@pytest.mark.parametrize(
    "capture,expected",
    [
        ("vllm", {"logprobs": True, "top_logprobs": True, **_VLLM, "seed": "ignored-or-unknown"}),
        ("openai", {"logprobs": True, "top_logprobs": True, **_NO_IDS, "capture": "tokens", "seed": "accepted"}),
        (
            "text",
            {"logprobs": False, "top_logprobs": False, **_NO_IDS, "capture": "text", "seed": "ignored-or-unknown"},
        ),
        # chat-shaped logprobs on /v1/completions too, each entry with its id: ids with no switch asked for
        (
            "llama-server",
            {"logprobs": True, "top_logprobs": True, "bytes": True, "token_ids": "logprobs", "capture": "token_ids"}
            | {"request_fields": {}, "seed": "ignored-or-unknown"},
        ),
    ],
)
def test_probe_endpoint_shapes(capture, expected, scripted_server, capsys) -> None:
    server = scripted_server(capture=capture, system_fingerprint=None)
    r = cli(capsys, "probe", "endpoint", "--base-url", server.base_url, "--json")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    assert result["model"] == "scripted-model" and result["models"] == ["scripted-model"]
    for api in ("chat", "completions"):
        got = result["apis"][api]
        assert got["ok"] and got["stream"]
        assert got["system_fingerprint"] is False
        assert {k: got[k] for k in expected} == expected, api
        # usage in a stream only where the run asks for it (stream_options, chat)
        assert got["stream_usage"] is (api == "chat")
    assert result["apis"]["chat"]["bytes"] is (capture != "text")  # the legacy completions shape has no bytes


def test_probe_tells_a_seed_from_a_server_that_takes_any_field(scripted_server, capsys) -> None:
    """Taking `seed` is evidence only from a server that refuses a made-up field (llama-cpp-python takes
    `bogus_field`): the table says ignored-or-unknown and why; a strict server's seed stays accepted."""
    lenient = scripted_server(capture="llama-server")
    r = cli(capsys, "probe", "endpoint", "--base-url", lenient.base_url, "--api", "chat")
    assert r.code == 0, r.err
    (row,) = [line for line in r.out.splitlines() if line.startswith("│ seed ")]
    assert "ignored-or-unknown" in row and "accepted" not in row.replace("ignored-or-unknown", "")
    assert "also accepted a made-up field" in " ".join(r.out.split())
    first = list(lenient.log)[0]["body"]  # the seed went out beside the made-up field, in one request
    assert first["seed"] == 0 and first["detaudit_probe_bogus_field"] is True
    strict = scripted_server(capture="openai")
    r = cli(capsys, "probe", "endpoint", "--base-url", strict.base_url, "--api", "chat")
    (row,) = [line for line in r.out.splitlines() if line.startswith("│ seed ")]
    assert "accepted" in row and "ignored" not in row and "made-up field" not in r.out


def test_probe_reports_missing_api_and_streaming(scripted_server, capsys, monkeypatch) -> None:
    server = scripted_server(apis=["chat"], stream=False, api_key="sk-probe-secret-42")
    monkeypatch.delenv("PROBE_KEY", raising=False)
    r = cli(capsys, "probe", "endpoint", "--base-url", server.base_url, "--api-key-env", "PROBE_KEY", "--json")
    assert r.code == 2 and "PROBE_KEY" in r.err
    monkeypatch.setenv("PROBE_KEY", "sk-probe-secret-42")
    r = cli(
        capsys,
        "probe",
        "endpoint",
        "--base-url",
        server.base_url,
        "--api-key-env",
        "PROBE_KEY",
        "--json",
        "--retries",
        0,
    )
    assert r.code == 0, r.err
    result = json.loads(r.out)
    assert result["apis"]["chat"]["ok"] and not result["apis"]["chat"]["stream"]
    assert not result["apis"]["completions"]["ok"] and "HTTP 404" in result["apis"]["completions"]["error"]
    r = cli(capsys, "probe", "endpoint", "--base-url", server.base_url, "--api-key-env", "PROBE_KEY", "--retries", 0)
    assert r.code == 0, r.err
    assert "HTTP 404" in r.out and "sk-probe-secret-42" not in r.out + r.err
    monkeypatch.delenv("PROBE_KEY")
    r2 = cli(capsys, "probe", "endpoint", "--base-url", server.base_url, "--api", "chat", "--json")
    assert r2.code == 2 and "refused the credentials" in r2.err


def test_probe_with_token_id_strings_only(scripted_server, capsys) -> None:
    # An OpenAI-strict server rejects return_token_ids; the probe falls back and records no ids.
    server = scripted_server(capture="openai")
    r = cli(capsys, "probe", "endpoint", "--base-url", server.base_url, "--api", "completions", "--json")
    got = json.loads(r.out)["apis"]["completions"]
    assert got["token_ids"] is None and got["logprobs"] and got["request_fields"] == {}


def test_probe_nan_timeout_is_a_usage_error(capsys) -> None:
    """It was an internal error (httpx: deadline must not be NaN); refused before any connection."""
    r = cli(capsys, "probe", "endpoint", "--base-url", "http://127.0.0.1:9/v1", "--timeout", "nan")
    assert (r.code, r.err.count("\n")) == (2, 1) and "--timeout must be > 0" in r.err, r.err
