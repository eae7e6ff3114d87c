"""`detaudit run --cache cold,warm` against the scripted server's prefix cache: arms, cold salts and nonces,
warm-ups, strict cached_tokens, the cache evidence and verdicts, the report and `gate --require-cache-invariant`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from runhelp import FEYNMAN, NYC, QUEENS, cli

from detaudit.audit.cache_arms import nonce
from detaudit.rundir.io import load_manifest, read_samples

SAME_TOKENS_OTHER_LOGPROBS = [{"token": t, "logprob": -0.5} for t in QUEENS]


def _run(capsys, server, out: Path, *extra: object, n: int = 4, cache: str = "cold,warm"):
    return cli(
        capsys, "run", "--base-url", server.base_url, "-p", FEYNMAN, "-n", n, "--cache", cache, "--out", out, *extra
    )


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _prompt_bodies(server) -> list[dict]:
    """The bodies of the run's own requests (probe requests left out)."""
    return [e["body"] for e in server.log if FEYNMAN in e["body"]["messages"][-1]["content"]]


def test_cache_dependent_endpoint_with_proof(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: {"cold": "Q", "warm": "N"}}, cache={}
    )
    out = tmp_path / "run"
    r = _run(capsys, server, out, "-c", "1,2")
    assert r.code == 0, r.err
    manifest = load_manifest(out)
    assert [(a.name, a.concurrency, a.cache) for a in manifest.arms] == [
        ("c1-cold", 1, "cold"),
        ("c1-warm", 1, "warm"),
        ("c2-cold", 2, "cold"),
        ("c2-warm", 2, "warm"),
    ]
    probe = manifest.probe["cache"]
    assert probe["reports_cached_tokens"] and probe["cache_salt"] == "honoured" and probe["cold"] == "cache_salt"
    assert manifest.prompts[0].prompt == FEYNMAN  # the recorded prompt never holds a salt or nonce
    bodies = _prompt_bodies(server)
    # 16 recorded requests and one warm-up per warm arm (max_tokens 1), in arm order
    assert len(bodies) == 18 and [b.get("max_tokens") for b in bodies].count(1) == 2
    cold_salts = [b["cache_salt"] for b in bodies if b["cache_salt"].startswith("detaudit-cold-")]
    assert len(set(cold_salts)) == 8  # one salt per cold request
    assert {b["cache_salt"] for b in bodies} - set(cold_salts) == {f"detaudit-warm-{manifest.run_id}"}
    table = read_samples(out).to_pylist()
    cached = {arm: sorted(r["cached_tokens"] for r in table if r["arm"] == arm) for arm in ("c1-cold", "c1-warm")}
    assert cached == {"c1-cold": [0, 0, 0, 0], "c1-warm": [4, 4, 4, 4]}
    prompt = _summary(out)["prompts"][0]
    assert prompt["verdict"] == "cache-dependent"
    assert prompt["cache"] == {
        "cold_arms": ["c1-cold", "c2-cold"],
        "warm_arms": ["c1-warm", "c2-warm"],
        "evidence": "verified",
        "cold_method": "cache_salt",
        "same_completion": False,
        "cold_vectors": None,
        "warm_vectors": None,
        "shared_vectors": None,
    }
    assert [a["cache"] for a in prompt["arms"]][:2] == [
        {"asked": "cold", "evidence": "cold", "rows": 4, "reporting": 4, "hits": 0} | _tokens(0, 0),
        {"asked": "warm", "evidence": "warm", "rows": 4, "reporting": 4, "hits": 4} | _tokens(4, 4),
    ]
    g = cli(capsys, "gate", out, "--require-cache-invariant", "--md", tmp_path / "gate.md")
    assert g.code == 1, g.out + g.err
    assert "FAIL require-cache-invariant cold = warm: p0 cache-dependent" in g.out
    md = (tmp_path / "gate.md").read_text()
    assert "**Prefix cache**" in md
    assert "gave **1 distinct completion** of 4 ok (one request at a time, cold cache), **1** of 4 ok (one " in md
    assert "warm cache asked; 4 of 4 answers hit the cache (4 reported cached\\_tokens, 4 tokens): warm, as asked" in md
    rep = cli(capsys, "report", out, "--html", tmp_path / "report.html")
    assert rep.code == 0, rep.err
    html = (tmp_path / "report.html").read_text()
    assert "cache-dependent" in html and "cold cache asked; 0 of 4 answers hit the cache" in html


def _tokens(lo: int, hi: int) -> dict:
    return {"cached_tokens_min": lo, "cached_tokens_max": hi}


def test_invariant_endpoint_passes_the_gate(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", cache={})
    out = tmp_path / "run"
    r = _run(capsys, server, out, "--gate", "require-cache-invariant")
    assert r.code == 0 and "PASS require-cache-invariant" in r.err
    prompt = _summary(out)["prompts"][0]
    assert prompt["verdict"] == "deterministic", prompt["verdict_reason"]
    assert prompt["cache"]["same_completion"] and prompt["cache"]["shared_vectors"] == 1
    g = cli(capsys, "gate", out, "--require-cache-invariant")
    assert g.code == 0 and "PASS require-cache-invariant cold = warm (1 check)" in g.out


def test_same_tokens_other_logprobs_warm(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "Q2": SAME_TOKENS_OTHER_LOGPROBS},
        schedules={FEYNMAN: {"cold": "Q", "warm": "Q2"}},
        cache={},
    )
    out = tmp_path / "run"
    assert _run(capsys, server, out).code == 0
    prompt = _summary(out)["prompts"][0]
    assert prompt["verdict"] == "numerically-cache-dependent"
    assert (prompt["cache"]["cold_vectors"], prompt["cache"]["warm_vectors"], prompt["cache"]["shared_vectors"]) == (
        1,
        1,
        0,
    )
    assert cli(capsys, "gate", out, "--require-cache-invariant").code == 1


def test_silent_cache_is_unverified_and_cold_uses_a_nonce(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC},
        schedules={FEYNMAN: {"cold": "Q", "warm": "N"}},
        cache={"report": False},
    )
    out = tmp_path / "run"
    r = _run(capsys, server, out, "--api", "completions")
    assert r.code == 0, r.err
    manifest = load_manifest(out)
    assert manifest.probe["cache"]["reports_cached_tokens"] is False and manifest.probe["cache"]["cold"] == "nonce"
    cold = [e["body"]["prompt"] for e in server.log if e["body"]["prompt"].endswith(FEYNMAN)][:4]
    assert cold == [f"[detaudit nonce {nonce(manifest.run_id, i)}]\n{FEYNMAN}" for i in range(4)]
    assert any("nonce line" in n for n in manifest.notes)
    table = read_samples(out)
    assert table.column("cached_tokens").null_count == 8
    prompt = _summary(out)["prompts"][0]
    assert prompt["verdict"] == "cache-dependent"  # the warm answers differ, though nothing proves the state
    assert "unverified" in prompt["verdict_reason"] and "nonce" in prompt["verdict_reason"]
    assert prompt["cache"]["evidence"] == "unverified" and prompt["cache"]["cold_method"] == "nonce"
    assert [a["cache"]["evidence"] for a in prompt["arms"]] == ["unverified", "unverified"]
    g = cli(capsys, "gate", out, "--require-cache-invariant")
    assert g.code == 3 and "CANNOT JUDGE require-cache-invariant" in g.out and "unverified" in g.out
    assert "cache state is not proven" in g.err


def test_gate_cannot_judge_a_run_without_cache_arms(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    out = tmp_path / "run"
    assert cli(capsys, "run", "--base-url", server.base_url, "-p", FEYNMAN, "-n", 2, "--out", out).code == 0
    assert "cache" not in _summary(out)["prompts"][0]  # absent, not null, for a run without cache arms
    g = cli(capsys, "gate", out, "--require-cache-invariant")
    assert g.code == 3 and "has no cache arms" in g.out


def test_ignored_salt_falls_back_to_nonces(scripted_server, capsys, tmp_path) -> None:
    # A server that takes cache_salt but ignores it: salts would not keep cold requests cold.
    server = scripted_server(completions={"Q": QUEENS}, default="Q", cache={"salt": False})
    out = tmp_path / "run"
    assert _run(capsys, server, out).code == 0
    manifest = load_manifest(out)
    assert manifest.probe["cache"]["cache_salt"] == "ignored" and manifest.probe["cache"]["cold"] == "nonce"
    prompt = _summary(out)["prompts"][0]
    # nonces keep the cold arm cold even so
    assert [a["cache"]["evidence"] for a in prompt["arms"]] == ["cold", "warm"]


def test_reset_route_makes_cold_arms_cold(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC},
        schedules={FEYNMAN: {"cold": "Q", "warm": "N"}},
        cache={"salt": False, "reset": True},
    )
    out = tmp_path / "run"
    assert _run(capsys, server, out).code == 0
    manifest = load_manifest(out)
    assert (manifest.probe["cache"]["cache_salt"], manifest.probe["cache"]["cold"]) == ("ignored", "reset")
    assert all(b["messages"][-1]["content"] == FEYNMAN and "cache_salt" not in b for b in _prompt_bodies(server))
    prompt = _summary(out)["prompts"][0]
    assert [a["cache"]["evidence"] for a in prompt["arms"]] == ["cold", "warm"]
    assert prompt["verdict"] == "cache-dependent" and prompt["cache"]["cold_method"] == "reset"


def test_evidence_states() -> None:
    from detaudit.analysis.cache_evidence import arm_evidence

    def state(asked: str, cached: list[int]) -> str:
        return arm_evidence(asked, np.array(cached, dtype=np.int64)).evidence  # type: ignore[arg-type]

    assert state("cold", [0, 0, 0]) == "cold" and state("warm", [5, 1, 9]) == "warm"
    assert state("warm", [5, 0, 9]) == "mixed"  # one miss: no "most rows" threshold
    assert state("warm", [5, -1, 9]) == "mixed" and state("cold", [0, -1]) == "mixed"  # -1: not reported
    assert state("warm", [-1, -1]) == "unverified" and state("cold", []) == "unverified"
    e = arm_evidence("warm", np.array([5, 0, 9, -1]))
    assert (e.rows, e.reporting, e.hits, e.cached_tokens_min, e.cached_tokens_max) == (4, 3, 2, 0, 9)


def test_warm_arm_that_misses_contradicts(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", cache={"hit_tokens": 0})  # never a hit
    out = tmp_path / "run"
    assert _run(capsys, server, out).code == 0
    prompt = _summary(out)["prompts"][0]
    assert [a["cache"]["evidence"] for a in prompt["arms"]] == ["cold", "cold"]
    assert prompt["cache"]["evidence"] == "contradicted" and prompt["verdict"] == "deterministic"
    g = cli(capsys, "gate", out, "--require-cache-invariant")
    assert g.code == 3 and "p0 cache state contradicted by cached_tokens" in g.out


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (-1, "greater than or equal to 0"),
        (8, "8 cached of 7 prompt tokens"),
        ("4", "valid integer"),
        (2.5, "valid integer"),
        (True, "valid integer"),
    ],
)
def test_hostile_cached_tokens_are_error_rows(scripted_server, capsys, tmp_path, value, why) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", cache={"value": value, "prompts": [FEYNMAN]})
    out = tmp_path / "run"
    r = cli(
        capsys,
        "run",
        "--base-url",
        server.base_url,
        "-p",
        FEYNMAN,
        "-n",
        2,
        "--retries",
        0,
        "--out",
        out,
    )
    assert r.code == 3, r.out + r.err  # every request failed: the run cannot be judged
    rows = read_samples(out).to_pylist()
    assert {r["status"] for r in rows} == {"error"}
    assert {r["error_reason"] for r in rows} == {"malformed:usage.prompt_tokens_details.cached_tokens"}
    assert why in rows[0]["error"]


def test_dry_run_shows_the_cache_arms(capsys) -> None:
    r = cli(
        capsys, "run", "--base-url", "http://127.0.0.1:9/v1", "-p", "hi", "-n", 3, "-c", "1,8", "--cache", "cold,warm",
        "--dry-run",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "arms: c1-cold (concurrency 1, cold cache), c1-warm (concurrency 1, warm cache), c8-cold" in r.out
    assert "up to 12 requests (1 prompt × -n 3 × 4 arms)" in r.out
    assert "plus 2 unrecorded 1-token warm-up requests" in r.out
    assert "nonce line before the prompt" in r.out


@pytest.mark.parametrize("bad", ["hot", "cold,cold", ""])
def test_bad_cache_states_are_refused(capsys, bad) -> None:
    r = cli(capsys, "run", "--base-url", "http://127.0.0.1:9/v1", "-p", "hi", "--cache", bad, "--dry-run")
    assert r.code == 2 and "--cache" in r.err


def test_resume_resends_failed_cache_samples_in_their_arms(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC},
        schedules={FEYNMAN: {"cold": "Q", "warm": "N"}},
        cache={},
        faults={"first": ["500", "500"], "prompts": [FEYNMAN]},
    )
    out = tmp_path / "run"
    assert _run(capsys, server, out, "--retries", 0).code == 0
    assert [r["arm"] for r in read_samples(out).to_pylist() if r["status"] == "error"] == ["c1-cold", "c1-cold"]
    r = cli(capsys, "run", "--resume", "--base-url", server.base_url, "--out", out)
    assert r.code == 0, r.err
    manifest = load_manifest(out)
    assert [(a.name, a.cache) for a in manifest.arms] == [("c1-cold", "cold"), ("c1-warm", "warm")]
    rows = read_samples(out).to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    assert sorted((r["arm"], r["cached_tokens"]) for r in rows) == [("c1-cold", 0)] * 4 + [("c1-warm", 4)] * 4
    assert _summary(out)["prompts"][0]["verdict"] == "cache-dependent"


def test_probe_endpoint_reports_the_cache(scripted_server, capsys) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", cache={"salt": False, "reset": True})
    r = cli(capsys, "probe", "endpoint", "--base-url", server.base_url, "--api", "chat", "--cache", "--json")
    assert r.code == 0, r.err
    cache = json.loads(r.out)["apis"]["chat"]["cache"]
    assert cache["cached_tokens"] == [0, 4] and cache["cache_salt"] == "ignored"
    assert (cache["reset"], cache["cold"]) == (True, "reset")
    r = cli(capsys, "probe", "endpoint", "--base-url", server.base_url, "--api", "chat", "--cache")
    assert "cold arms made by" in r.out and "reset" in r.out


def test_streamed_answers_carry_cached_tokens(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q", cache={})
    out = tmp_path / "run"
    assert _run(capsys, server, out, "--stream", n=2).code == 0
    rows = read_samples(out).to_pylist()
    assert sorted((r["arm"], r["cached_tokens"]) for r in rows) == [("c1-cold", 0)] * 2 + [("c1-warm", 4)] * 2
    warmups = [b for b in _prompt_bodies(server) if b.get("max_tokens") == 1]
    assert len(warmups) == 1 and "stream" not in warmups[0] and "stream_options" not in warmups[0]
