"""Fork causes (#18) end to end: runs recorded by `detaudit run` from scripted endpoints whose causes are known, the
labels and their evidence read from summary.json and checked against a hand computation from the Parquet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from runhelp import FEYNMAN, NYC, QUEENS, cli

from detaudit.rundir.io import load_manifest, read_samples
from detaudit.rundir.recorder import Recorder
from detaudit.rundir.schema import ArmSpec

FORK = 5  # QUEENS and NYC share 5 tokens


def record(capsys, server, out: Path, n: int, concurrency: str, *extra: str) -> dict:
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", FEYNMAN, "-n", n, "-c", concurrency, "--out", out,
            *extra)  # fmt: skip
    assert r.code == 0, r.err
    return json.loads((out / "summary.json").read_text())["background"]


def fork_at(bg: dict, position: int) -> dict:
    (fork,) = [f for f in bg["forks"] if f["position"] == position]
    return fork


def on_nyc(out: Path) -> list[dict]:
    """The run's rows in start order, each with whether it took the NYC branch."""
    rows = sorted(read_samples(out).to_pylist(), key=lambda r: r["started_at"])
    return [r | {"nyc": r["tokens"] == NYC} for r in rows]


def test_load_dependent(scripted_server, capsys, tmp_path):
    """Serial requests always get QUEENS; overlapping ones NYC every third time: `load` alone, its chance exact."""
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC},
        latency_s=0.02,
        schedules={FEYNMAN: {"serial": "Q", "loaded": ["Q", "Q", "N"]}},
    )
    bg = record(capsys, server, tmp_path / "r", 30, "1,6")
    rows = on_nyc(tmp_path / "r")
    loaded = [r["nyc"] for r in rows if r["arm"] == "c6"]
    assert not any(r["nyc"] for r in rows if r["arm"] == "c1") and sum(loaded) >= 5
    fork = fork_at(bg, FORK)
    assert fork["labels"] == ["load"] and fork["departures"] == sum(loaded) and fork["prefix_count"] == 60
    rate = sum(loaded) / 30
    assert fork["evidence"][0]["p_value"] == math.pow(1 - rate, 30) and fork["evidence"][0]["effect"] == rate
    assert bg["shares"] == {"near-tie": 0.0, "load": 1.0, "fingerprint": 0.0, "cache": 0.0, "time": 0.0,
                            "unexplained": 0.0}  # fmt: skip
    # the report: a cause chip on the fork, its evidence in the tooltip; T_bg per arm
    r = cli(capsys, "report", tmp_path / "r", "--html", tmp_path / "report.html")
    assert r.code == 0, r.err
    html = (tmp_path / "report.html").read_text()
    assert '<span class="cause cause-load" title="load: the serial arm&#39;s 30 samples all take branch 0' in html
    assert "background temperature T_bg: ≤ " in html


def test_fingerprint_switch_mid_run(scripted_server, capsys, tmp_path):
    """A deployment change half-way: fp_a answers QUEENS, then fp_b answers NYC. Fingerprint and time both split the
    branches (the schedule and the fingerprints both follow arrival order)."""
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC},
        schedules={FEYNMAN: ["Q"] * 20 + ["N"] * 20},
        system_fingerprint=["fp_a"] * 30 + ["fp_b"] * 30,  # the capability probe's few answers come first
    )
    bg = record(capsys, server, tmp_path / "r", 40, "1")
    rows = on_nyc(tmp_path / "r")
    assert [r["nyc"] for r in rows] == [False] * 20 + [True] * 20  # the switch happened in the middle
    fork = fork_at(bg, FORK)
    assert fork["labels"] == ["fingerprint", "time"] and fork["departures"] == 20
    fp, time = fork["evidence"]
    # Cramer's V of branch x fingerprint by hand, from the Parquet
    table = np.zeros((2, 2))
    names = sorted({r["system_fingerprint"] for r in rows})
    for r in rows:
        table[int(r["nyc"]), names.index(r["system_fingerprint"])] += 1
    expected = np.outer(table.sum(1), table.sum(0)) / 40
    assert fp["effect"] == np.sqrt(((table - expected) ** 2 / expected).sum() / 40)
    assert fp["p_value"] == 1 / 1000 and time["p_value"] == 1 / 1000 and time["effect"] == 1.0
    assert bg["prompts"][0]["shares"]["fingerprint"] == 1.0


def test_drift_over_time(scripted_server, capsys, tmp_path):
    """One deployment, but the answer changes after the first 15 requests of each arm: `time`, not load or
    fingerprint (both arms fork)."""
    server = scripted_server(completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: (["Q"] * 15 + ["N"] * 15) * 2})
    bg = record(capsys, server, tmp_path / "r", 30, "1,2")
    rows = on_nyc(tmp_path / "r")
    for arm in ("c1", "c2"):
        assert [r["nyc"] for r in rows if r["arm"] == arm] == [False] * 15 + [True] * 15
    fork = fork_at(bg, FORK)
    assert fork["labels"] == ["time"] and fork["departures"] == 30
    assert fork["evidence"][0]["effect"] == 1.0 and fork["evidence"][0]["p_value"] == 1 / 1000


def test_cache_dependent(scripted_server, capsys, tmp_path):
    """A cold prefix cache answers NYC, a warm one QUEENS; `run --cache cold,warm` records cold and warm arms (cached
    tokens 0 and 4 per answer): `cache` alone, the split exact."""
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: {"cold": "N", "warm": "Q"}}, cache={}
    )
    bg = record(capsys, server, tmp_path / "r", 20, "1", "--cache", "cold,warm")
    rows = read_samples(tmp_path / "r").to_pylist()
    assert {(r["arm"], r["cached_tokens"], r["tokens"] == NYC) for r in rows} == {
        ("c1-cold", 0, True),
        ("c1-warm", 4, False),
    }
    assert [(a["arm"], a["cache"]) for a in bg["arms"]] == [("c1-cold", "cold"), ("c1-warm", "warm")]
    fork = fork_at(bg, FORK)
    assert fork["labels"] == ["cache"] and fork["departures"] == 20
    (evidence,) = fork["evidence"]
    assert evidence["effect"] == 1.0 and evidence["p_value"] == 1 / 1000
    assert "cold: branch 1 x20" in evidence["detail"] and "warm: branch 0 x20" in evidence["detail"]
    assert fork["branches"] == [{"token": " Queens", "count": 20}, {"token": " New", "count": 20}]  # in id order


def test_cache_state_from_the_arms_when_cached_tokens_are_not_reported(scripted_server, capsys, tmp_path):
    """The same arms written through the recorder with no cached_tokens: the arms' `cache` (ArmSpec) decides."""
    parts = {}
    for state, name in (("cold", "N"), ("warm", "Q")):
        server = scripted_server(completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: name})
        record(capsys, server, tmp_path / state, 20, "1")
        parts[state] = tmp_path / state
    manifest = load_manifest(parts["cold"]).model_copy(
        update={"arms": [ArmSpec(name=s, concurrency=1, cache=s) for s in parts], "status": "started"}  # type: ignore[misc]
    )
    out = tmp_path / "cache"
    recorder = Recorder.create(out, manifest, force=False, flush_rows=1000)
    for arm_pos, (state, run) in enumerate(parts.items()):
        for row in read_samples(run).to_pylist():
            assert row["cached_tokens"] is None
            recorder.add(row | {"arm": state, "sample_index": manifest.sample_index(0, arm_pos, row["repeat"])})
    recorder.flush()
    recorder.end()
    r = cli(capsys, "analyze", out, "--json")
    assert r.code == 0, r.err
    fork = fork_at(json.loads(r.out)["background"], FORK)
    assert fork["labels"] == ["cache"] and fork["evidence"][0]["effect"] == 1.0


def test_gate_cannot_judge_the_background_temperature_without_logprobs(scripted_server, capsys, tmp_path):
    server = scripted_server(completions={"Q": QUEENS}, default="Q", capture="text")
    bg = record(capsys, server, tmp_path / "r", 4, "1")
    assert bg["temperature"]["kind"] == "needs-logprobs" and bg["temperature"]["upper"] is None
    r = cli(capsys, "gate", tmp_path / "r", "--max-background-temperature", "0.01")
    assert r.code == 3
    assert "CANNOT JUDGE max-background-temperature ≤ 0.01: c1 T_bg needs top-k logprobs" in r.out
    assert "the background temperature needs top-k logprobs" in r.err
