"""Issue #23, items 4 and 6, on scripted servers shaped like the real ones: capture offered in a shape detaudit did
not read (llama-server's chat-shaped logprobs with ids on /v1/completions), streamed answers without usage, and a
server that accepts any field, so that accepting `seed` proves nothing."""

from __future__ import annotations

import json

from runhelp import FEYNMAN, NYC, QUEENS, cli

from detaudit.rundir.io import load_manifest, read_samples

NO_DATA = "The endpoint returned no per-token data"


def test_llama_server_completions_capture_token_ids(scripted_server, capsys, tmp_path) -> None:
    """/v1/completions answered with `logprobs.content[]` entries carrying ids: the run records ids, strings, bytes
    and both top-k columns, and never writes that the endpoint returned no per-token data."""
    server = scripted_server(
        capture="llama-server", completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 5), ("N", 1)]}
    )
    out = tmp_path / "llama"
    r = cli(capsys, "run", "--base-url", server.base_url, "--api", "completions", "-p", FEYNMAN, "-n", 6, "--out", out)
    assert r.code == 0, r.err
    manifest = load_manifest(out)
    assert manifest.capture == "token_ids" and manifest.probe["token_ids"] == "logprobs"
    assert manifest.probe["request_fields"] == {}  # ids come with the logprobs: no switch is sent
    assert not any(NO_DATA in n for n in manifest.notes) and manifest.notes == []
    rows = read_samples(out).to_pylist()
    by_ids = {tuple(row["token_ids"]): row for row in rows}
    assert set(by_ids) == {tuple(server.token_ids("Q")), tuple(server.token_ids("N"))}
    q = by_ids[tuple(server.token_ids("Q"))]
    assert q["tokens"] == QUEENS and q["token_bytes"] == [t.encode() for t in QUEENS]
    # DEFAULT_TOP_LOGPROBS alternatives per position, the chosen token first with its own id, then "<alt1>" (id 1)
    assert q["top_token_ids"] == [[i, 1] for i in server.token_ids("Q")]
    assert q["top_tokens"] == [[t, "<alt1>"] for t in QUEENS]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unit_detail"]["compared_as"] == "token_ids"
    (fork,) = summary["prompts"][0]["arms"][0]["forks"]
    assert fork["position"] == 5 and [(b["token"], b["count"]) for b in fork["branches"]] == [
        (" Queens", 5),
        (" New", 1),
    ]


def test_streamed_answers_without_usage_are_noted(scripted_server, capsys, tmp_path) -> None:
    """A streamed completions run gets no usage from this server (stream_options goes to chat only): the manifest
    says so, with the count; the same run on chat, where usage comes, has no such note."""
    server = scripted_server(capture="llama-server", completions={"Q": QUEENS}, default="Q")
    notes = {}
    for api in ("completions", "chat"):
        out = tmp_path / api
        args = ["--api", api, "--stream", "-p", "hi", "-n", 4, "--concurrency", "1,2", "--out", out]
        r = cli(capsys, "run", "--base-url", server.base_url, *args)
        assert r.code == 0, r.err
        manifest = load_manifest(out)
        assert manifest.capture == "token_ids"
        notes[api] = manifest.notes
        assert all(row["token_ids"] == server.token_ids("Q") for row in read_samples(out).to_pylist())
    expected = "8 of 8 streamed answers this session reported no usage (usage.completion_tokens)"
    assert [n for n in notes["completions"] if "usage" in n] == [
        f"{expected}: their token counts cannot be checked against the server's"
    ]
    assert notes["chat"] == []


def test_text_only_server_is_still_noted_as_text(scripted_server, capsys, tmp_path) -> None:
    """The absence note stays, where every shape was looked for and none came (transformers serve's null)."""
    server = scripted_server(capture="text", completions={"Q": QUEENS}, default="Q")
    out = tmp_path / "text"
    r = cli(capsys, "run", "--base-url", server.base_url, "--api", "completions", "-p", "hi", "-n", 2, "--out", out)
    assert r.code == 0, r.err
    manifest = load_manifest(out)
    assert manifest.capture == "text" and any(NO_DATA in n for n in manifest.notes)


def test_a_run_records_seed_evidence_from_the_bogus_field(scripted_server, capsys, tmp_path) -> None:
    """The run's manifest keeps the probe's seed verdict: ignored-or-unknown on a server that takes any field,
    accepted on one that refuses unknown fields (OpenAI)."""
    seeds = {}
    for capture in ("llama-server", "openai"):
        server = scripted_server(capture=capture, completions={"Q": QUEENS}, default="Q")
        out = tmp_path / capture
        r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 2, "--seed", 1, "--out", out)
        assert r.code == 0, r.err
        seeds[capture] = load_manifest(out).probe["seed"]
        # the audited requests carry the seed, never the made-up field
        audited = [e["body"] for e in server.log if e["body"].get("messages", [{}])[-1].get("content") == "hi"]
        assert all(b["seed"] == 1 and "detaudit_probe_bogus_field" not in b for b in audited[-2:])
    assert seeds == {"llama-server": "ignored-or-unknown", "openai": "accepted"}
