"""What `detaudit run` says before it sends anything (issue #21 items 2 and 12): --dry-run prints each prompt's
request body, the model, the arms, N and the plan and contacts nothing; a large run prints its plan (requests,
completion tokens, the least time at --rate) first; a run past the size limit is refused before the endpoint is
reached; a 404 from a base URL without /v1 suggests it."""

from __future__ import annotations

import json

from runhelp import FEYNMAN, cli


def test_dry_run_prints_the_bodies_and_the_plan_and_contacts_nothing(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server()
    out = tmp_path / "run"
    args = ["run", "--base-url", server.base_url, "-p", FEYNMAN, "-p", "2+2=", "-n", 100, "-c", "1,8"]
    r = cli(capsys, *args, "--model", "gpt-4o-mini", "--max-tokens", 256, "--seed", 7, "--out", out, "--dry-run")
    assert r.code == 0, r.err
    assert server.stats["requests"] == 0 and not out.exists()
    assert "plan: up to 400 requests (2 prompts × -n 100 × 2 arms), at most 102,400 completion tokens" in r.out
    assert "arms: c1 (concurrency 1), c8 (concurrency 8)" in r.out and "model gpt-4o-mini" in r.out
    parts = r.out.split("request body of prompt ")[1:]
    assert [p.split(":")[0] for p in parts] == ["p0", "p1"]
    bodies = [json.loads(p.split(":", 1)[1]) for p in parts]
    assert [b["messages"][0]["content"] for b in bodies] == [FEYNMAN, "2+2="]
    assert all(b["model"] == "gpt-4o-mini" and b["max_tokens"] == 256 and b["seed"] == 7 for b in bodies)
    assert all(b["temperature"] == 0 and "logprobs" not in b for b in bodies)


def test_dry_run_without_model_or_endpoint_still_contacts_nothing(capsys, tmp_path) -> None:
    # Nothing listens on port 9: a run would stop at "unreachable"; a dry run never asks.
    r = cli(capsys, "run", "--base-url", "http://127.0.0.1:9/v1", "-p", "hi", "-n", 50, "--rate", 2, "--dry-run")
    assert r.code == 0, r.err
    assert "model not given: the run takes the only model GET /models lists" in r.out
    assert "completion tokens not capped" in r.out and "at least 25 s at --rate 2/s" in r.out
    r = cli(capsys, "run", "-p", "hi", "--dry-run", "--resume", "--out", tmp_path)
    assert r.code == 2 and "--dry-run shows a new run" in r.err


def test_a_large_run_prints_its_plan_before_it_starts(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server()
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 500, "-c", "1,16", "--max-tokens", 8)
    assert r.code == 0, r.err
    assert r.err.splitlines()[0] == (
        "plan: up to 1,000 requests (1 prompt × -n 500 × 2 arms), at most 8,000 completion tokens"
    )
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 5, "--out", tmp_path / "small")
    assert r.code == 0 and "plan:" not in r.err  # a small run goes straight on


def test_a_run_past_the_size_limit_is_refused_before_the_endpoint_is_reached(scripted_server, capsys) -> None:
    server = scripted_server()
    for args in (["-n", 10_000_001], ["-n", 10_000_000, "-c", "1,64"], ["-n", 5_000_001, "-p", "b"]):
        r = cli(capsys, "run", "--base-url", server.base_url, "-p", "a", *args)
        assert r.code == 2 and "a run holds at most 10000000" in r.err, r.err
    assert server.stats["requests"] == 0


def test_a_404_without_v1_suggests_it(scripted_server, capsys) -> None:
    server = scripted_server()
    bare = server.base_url.removesuffix("/v1")
    r = cli(capsys, "run", "--base-url", bare, "-p", "hi", "-n", 1)  # /models 404s: the model cannot be found
    assert r.code == 2 and r.err.rstrip().endswith(f"(did you mean {bare}/v1?)"), r.err
    r = cli(capsys, "run", "--base-url", bare, "-m", "scripted-model", "-p", "hi", "-n", 1)  # the probe 404s
    assert r.code == 2 and "HTTP 404" in r.err and r.err.rstrip().endswith(f"(did you mean {bare}/v1?)"), r.err
    r = cli(capsys, "probe", "endpoint", "--base-url", bare, "-m", "scripted-model", "--api", "chat")
    assert f"(did you mean {bare}/v1?)" in r.out
    server_404 = scripted_server(apis=("completions",))  # a real 404 under /v1: no suggestion
    r = cli(capsys, "run", "--base-url", server_404.base_url, "-p", "hi", "-n", 1)
    assert r.code == 2 and "HTTP 404" in r.err and "did you mean" not in r.err, r.err
