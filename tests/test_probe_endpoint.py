"""`detaudit probe endpoint` reports what each server shape really returns, and the run picks its capture from it."""

from __future__ import annotations

import json

import pytest
from runhelp import cli


@pytest.mark.parametrize(
    "capture,expected",
    [
        ("vllm", {"logprobs": True, "top_logprobs": True, "token_ids": "return_token_ids", "capture": "token_ids"}),
        ("openai", {"logprobs": True, "top_logprobs": True, "token_ids": None, "capture": "tokens"}),
        ("text", {"logprobs": False, "top_logprobs": False, "token_ids": None, "capture": "text"}),
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
        assert got["ok"] and got["stream"] and got["seed_accepted"]
        assert got["system_fingerprint"] is False
        assert {k: got[k] for k in expected} == expected
    assert result["apis"]["chat"]["bytes"] is (capture != "text")  # the legacy completions shape has no bytes


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
