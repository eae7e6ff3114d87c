"""`detaudit run` end to end against the scripted loopback server: counts, capture levels, APIs, options."""

from __future__ import annotations

import gc
import json
from collections import Counter

import pyarrow.parquet as pq
from runhelp import FEYNMAN, NYC, QUEENS, cli

from detaudit.rundir.io import load_manifest, read_samples


def test_feynman_992_of_1000_in_both_arms(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 992), ("N", 8)]})
    out = tmp_path / "feynman"
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "--prompt",
        FEYNMAN,
        "-n",
        1000,
        "--concurrency",
        "1,64",
        "--out",
        out,
    )
    assert r.code == 0, r.err
    manifest = load_manifest(out)
    assert manifest.status == "complete" and manifest.capture == "token_ids"
    assert manifest.target.model == "scripted-model"  # the only model /models lists
    table = pq.read_table(out / "samples.parquet")
    assert not (out / "shards").exists()
    assert sorted(table.column("sample_index").to_pylist()) == list(range(2000))
    rows = table.to_pylist()
    for arm in ("c1", "c64"):
        counts = Counter(tuple(r["token_ids"]) for r in rows if r["arm"] == arm)
        assert counts == {tuple(server.token_ids("Q")): 992, tuple(server.token_ids("N")): 8}
    first = rows[0]
    assert first["tokens"] == QUEENS or first["tokens"] == NYC
    assert len(first["top_logprobs"][0]) == 2 and first["token_bytes"][0] == b"Richard"
    assert first["system_fingerprint"] == "fp_scripted" and first["finish_reason"] == "stop"
    summary = json.loads((out / "summary.json").read_text())
    by_arm = summary["unique_per_prompt"][0]["by_arm"]
    assert by_arm == {"c1": 2, "c64": 2}
    assert "c64" in r.out and "unique" in r.out


def test_load_dependent_server_serial_arm_is_clean(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC}, latency_s=0.02, schedules={FEYNMAN: {"serial": "Q", "loaded": ["Q", "N"]}}
    )
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "-p",
        FEYNMAN,
        "-n",
        40,
        "-c",
        "1,8",
        "--out",
        tmp_path / "r",
        "--json",
    )
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["unique_per_prompt"][0]["by_arm"]["c1"] == 1
    assert summary["unique_per_prompt"][0]["by_arm"]["c8"] == 2
    assert server.stats["max_in_flight"] > 1


def test_text_only_server_is_compared_on_text(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC}, capture="text", schedules={FEYNMAN: [("Q", 18), ("N", 2)]}
    )
    out = tmp_path / "r"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", FEYNMAN, "-n", 20, "--out", out)
    assert r.code == 0, r.err
    manifest = load_manifest(out)
    assert manifest.capture == "text" and manifest.probe["logprobs"] is False
    assert any("as text" in n for n in manifest.notes)
    rows = read_samples(out).to_pylist()
    assert all(row["token_ids"] is None and row["tokens"] is None for row in rows)
    assert Counter(row["text"] for row in rows) == {server.text("Q"): 18, server.text("N"): 2}
    assert json.loads((out / "summary.json").read_text())["unit"] == "text"


def test_openai_shaped_server_gives_tokens_and_bytes(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", capture="openai")
    out = tmp_path / "r"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 5, "--top-logprobs", 3, "--out", out)
    assert r.code == 0, r.err
    assert load_manifest(out).capture == "tokens"
    row = read_samples(out).to_pylist()[0]
    assert row["token_ids"] is None and row["tokens"] == QUEENS
    assert row["token_bytes"] == [t.encode() for t in QUEENS]
    assert row["top_tokens"][0] == ["Richard", "<alt1>", "<alt2>"]
    # the strict server 400s on unknown fields: the run must not have sent any
    assert all("return_token_ids" not in e["body"] for e in list(server.log)[-5:])


def test_completions_api_streaming_with_token_id_strings(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 9), ("N", 1)]})
    out = tmp_path / "r"
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "-p",
        FEYNMAN,
        "-n",
        10,
        "--api",
        "completions",
        "--stream",
        "--out",
        out,
    )
    assert r.code == 0, r.err
    rows = read_samples(out).to_pylist()
    assert Counter(tuple(row["token_ids"]) for row in rows) == {
        tuple(server.token_ids("Q")): 9,
        tuple(server.token_ids("N")): 1,
    }
    assert all(row["completion_tokens"] is not None or row["status"] == "ok" for row in rows)
    assert all(e["body"].get("stream") for e in list(server.log)[-10:])


def test_request_options_reach_the_server(scripted_server, capsys, tmp_path, monkeypatch) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", api_key="sk-abc-123456")
    monkeypatch.setenv("MY_KEY", "sk-abc-123456")
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "--api-key-env",
        "MY_KEY",
        "-p",
        "hi",
        "-n",
        3,
        "--max-tokens",
        4,
        "--seed",
        7,
        "--stop",
        "\n\n",
        "--top-p",
        0.5,
        "--extra-body",
        '{"cache_salt": "s1"}',
        "--header",
        "X-Team: blue-secret-value",
        "--out",
        tmp_path / "r",
    )
    assert r.code == 0, r.err
    last = list(server.log)[-1]
    body = last["body"]
    assert body["max_tokens"] == 4 and body["seed"] == 7 and body["stop"] == ["\n\n"] and body["top_p"] == 0.5
    assert body["cache_salt"] == "s1" and body["temperature"] == 0 and "n" not in body
    assert last["headers"]["x-team"] == "blue-secret-value"
    rows = read_samples(tmp_path / "r").to_pylist()
    assert [row["finish_reason"] for row in rows] == ["length"] * 3
    assert load_manifest(tmp_path / "r").target.header_names == ["X-Team"]


def test_prompt_file_jsonl_with_messages(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS, "N": NYC}, schedules={"two": "N"}, default="Q")
    pf = tmp_path / "prompts.jsonl"
    pf.write_text(
        '{"prompt": "one"}\n\n{"messages": [{"role": "system", "content": "be brief"}, '
        '{"role": "user", "content": "two"}], "id": "chat-two"}\n'
    )
    out = tmp_path / "r"
    r = cli(capsys, "run", "--base-url", server.base_url, "--prompt-file", pf, "-n", 4, "--out", out)
    assert r.code == 0, r.err
    manifest = load_manifest(out)
    assert [p.prompt_id for p in manifest.prompts] == ["p0", "chat-two"]
    rows = read_samples(out).to_pylist()
    texts = {row["prompt_id"]: row["text"] for row in rows}
    assert texts == {"p0": server.text("Q"), "chat-two": server.text("N")}
    # sample_index = ((prompt_pos * n_arms) + arm_pos) * repeats + repeat
    assert [row["sample_index"] for row in rows if row["prompt_id"] == "chat-two"] == [4, 5, 6, 7]


def test_failed_requests_become_error_rows_after_retries(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS},
        default="Q",
        faults={"first": ["429", "503", "500", "500"], "retry_after": 0.25, "prompts": ["hi"]},
    )
    out = tmp_path / "r"
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "-p",
        "hi",
        "-n",
        4,
        "--retries",
        1,
        "--backoff",
        0.01,
        "--out",
        out,
    )
    assert r.code == 0, r.err
    rows = read_samples(out).to_pylist()
    assert sorted(row["sample_index"] for row in rows) == [0, 1, 2, 3]
    failed = [row for row in rows if row["status"] == "error"]
    # 4 faults, 2 attempts per request (--retries 1): exactly two requests used up their attempts
    assert len(failed) == 2 and all(row["attempts"] == 2 and row["text"] is None for row in failed)
    assert all(row["error"].startswith("HTTP 5") and "after 2 attempts" in row["error"] for row in failed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"]["ok"] + summary["samples"]["errors"] == 4
    assert summary["samples"]["ok"] == sum(row["status"] == "ok" for row in rows)


def test_rate_cap_spaces_the_requests(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    out = tmp_path / "r"
    thresholds = gc.get_threshold()
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 16, "-c", 8, "--rate", 20, "--out", out)
    assert r.code == 0, r.err
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0  # the run's GC tuning is undone
    starts = sorted(read_samples(out).column("started_at").to_pylist())
    assert (starts[-1] - starts[0]).total_seconds() >= 15 / 20 * 0.95  # 16 sends at most 20/s apart
    assert load_manifest(out).params.rate == 20


def test_resume_reruns_failed_rows_and_force_replaces(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS}, default="Q", faults={"rate": 0.5, "seed": 2, "kinds": ["503"], "prompts": ["hi"]}
    )
    out = tmp_path / "r"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 40, "-c", 4, "--retries", 0, "--out", out)
    assert r.code == 0, r.err  # about half failed: kept, summarized, not above the exit-3 threshold
    failed = {row["sample_index"] for row in read_samples(out).to_pylist() if row["status"] == "error"}
    assert 5 < len(failed) <= 20
    server.fault_rate = 0.0
    before = server.stats["requests"]
    r = cli(capsys, "run", "--resume", "--out", out)
    assert r.code == 0, r.err
    rows = read_samples(out).to_pylist()
    assert sorted(row["sample_index"] for row in rows) == list(range(40))
    assert all(row["status"] == "ok" for row in rows)
    # only the failed indices were sent again (plus /models; a resume does not probe again)
    assert server.stats["requests"] - before == len(failed) + 1
    assert load_manifest(out).status == "complete" and not (out / "shards").exists()
    run_id = load_manifest(out).run_id
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "other", "-n", 2, "--out", out, "--force")
    assert r.code == 0, r.err
    assert load_manifest(out).run_id != run_id and read_samples(out).num_rows == 2


def test_mostly_failing_endpoint_exits_3_and_keeps_the_run(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS}, default="Q", faults={"rate": 0.8, "seed": 1, "kinds": ["500"], "prompts": ["hi"]}
    )
    out = tmp_path / "r"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 30, "--retries", 0, "--out", out)
    assert r.code == 3, r.err
    assert "requests failed" in r.err and load_manifest(out).status == "complete"
    assert read_samples(out).num_rows == 30


def test_endpoint_failing_every_sample_still_gets_a_summary(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(faults={"rate": 1.0, "kinds": ["503"], "prompts": ["hi"]})
    out = tmp_path / "r"
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "-p",
        "hi",
        "-n",
        5,
        "--retries",
        1,
        "--backoff",
        0.01,
        "--out",
        out,
    )
    assert r.code == 3 and "5 of 5 requests failed" in r.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"]["ok"] == 0 and summary["samples"]["errors"] == 5
    assert {row["error"] for row in read_samples(out).to_pylist()} == {"HTTP 503: Injected 503 (after 2 attempts)"}


def test_extra_body_overrides_capture_fields_not_explicit_options(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    out = tmp_path / "r"
    extra = '{"logprobs": false, "return_token_ids": false, "temperature": 1.0, "top_k": 1}'
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "-p",
        "hi",
        "-n",
        2,
        "--temperature",
        0,
        "--out",
        out,
        "--extra-body",
        extra,
    )
    assert r.code == 0, r.err
    body = list(server.log)[-1]["body"]
    assert body["logprobs"] is False and body["return_token_ids"] is False and body["top_k"] == 1
    assert body["temperature"] == 0  # --temperature wins over --extra-body
    manifest = load_manifest(out)
    assert manifest.capture == "text" and any("capture dropped" in n for n in manifest.notes)
