"""`detaudit analyze`: bad input gets one line and exit 2; a scripted run end to end gives exactly the known forks."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runhelp import FEYNMAN, QUEENS, cli, cli_process
from test_analysis import ids_rows, make_run

from detaudit.rundir.io import load_manifest, write_manifest
from detaudit.rundir.recorder import ShardWriter
from detaudit.rundir.schema import SUMMARY_FILE

# A third completion that follows QUEENS for 8 tokens: a second fork, nested in the " Queens" branch.
NYC = QUEENS[:5] + [" New", " York", " City", "."]
JERSEY = QUEENS[:8] + [" Jersey", "."]


def _one_line_error(r, needle: str) -> None:
    assert r.code == 2, (r.code, r.out, r.err)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.err, r.err


def test_not_a_run_directory(tmp_path, capsys):
    _one_line_error(cli(capsys, "analyze", tmp_path), "not a detaudit run directory")
    _one_line_error(cli(capsys, "analyze", tmp_path / "missing"), "no such run directory")
    (tmp_path / "file.txt").write_text("x")
    _one_line_error(cli(capsys, "analyze", tmp_path / "file.txt"), "not a directory")


def test_corrupt_and_foreign_parquet(tmp_path, capsys):
    run = make_run(tmp_path / "run", ids_rows([[1, 2]] * 3))
    (run / "samples.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    _one_line_error(cli(capsys, "analyze", run), "corrupt")
    pq.write_table(pa.table({"x": [1, 2]}), run / "samples.parquet")
    _one_line_error(cli(capsys, "analyze", run), "foreign")


def test_damaged_data_pages(tmp_path, capsys):
    """The footer is intact, the column data is not: found while streaming, still one line and exit 2."""
    run = make_run(tmp_path / "run", ids_rows([[i, i + 1, i + 2] * 50 for i in range(400)]))
    data = bytearray((run / "samples.parquet").read_bytes())
    for k in range(len(data) // 3, len(data) // 3 + 2000):
        data[k] ^= 0x5A
    (run / "samples.parquet").write_bytes(bytes(data))
    _one_line_error(cli(capsys, "analyze", run), "corrupt or unreadable Parquet")


def test_a_pipe_or_directory_in_place_of_a_run_file(tmp_path):
    """A FIFO as manifest.json or samples.parquet hung the command forever (reading waits for a writer)."""
    for name in ("manifest.json", "samples.parquet", "rescore.parquet"):
        run = make_run(tmp_path / name, ids_rows([[1, 2]] * 3))
        (run / name).touch()
        (run / name).unlink()
        os.mkfifo(run / name)
        _one_line_error(cli_process("analyze", run, timeout=60), f"{name}: not a regular file")
    run = make_run(tmp_path / "dir", ids_rows([[1, 2]] * 3))
    (run / "samples.parquet").unlink()
    (run / "samples.parquet").mkdir()
    _one_line_error(cli_process("analyze", run, timeout=60), "samples.parquet: not a regular file")


def test_unknown_schema_versions(tmp_path, capsys):
    run = make_run(tmp_path / "run", ids_rows([[1, 2]] * 3))
    manifest = run / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"detaudit.run/1"', '"detaudit.run/7"'))
    _one_line_error(cli(capsys, "analyze", run), "newer than this detaudit supports")
    manifest.write_text(manifest.read_text().replace('"detaudit.run/7"', '"somebody.else/1"'))
    _one_line_error(cli(capsys, "analyze", run), "not a detaudit manifest")
    manifest.write_text(manifest.read_text().replace('"somebody.else/1"', '"detaudit.run/1"'))
    table = pq.read_table(run / "samples.parquet")
    newer = table.replace_schema_metadata({"detaudit.schema_version": "9"})
    pq.write_table(newer, run / "samples.parquet")
    _one_line_error(cli(capsys, "analyze", run), "samples schema version 9 is newer")


def test_bad_input_exit_code_of_the_real_process(tmp_path):
    r = cli_process("analyze", tmp_path)
    _one_line_error(r, "not a detaudit run directory")
    r = cli_process("compare", tmp_path, tmp_path)
    _one_line_error(r, "not a detaudit run directory")


def test_a_run_with_no_samples_yet(tmp_path, capsys):
    run = make_run(tmp_path / "run", ids_rows([[1]]))
    (run / "samples.parquet").unlink()
    write_manifest(run, load_manifest(run).model_copy(update={"status": "started"}))
    r = cli(capsys, "analyze", run, "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["samples"]["rows"] == 0 and summary["prompts"][0]["verdict"] == "inconclusive"


def test_a_complete_run_that_lost_its_samples_is_refused_not_read_as_empty(tmp_path, capsys):
    """It read as 0/0 inconclusive, and analyze replaced the run's summary.json with that."""
    run = make_run(tmp_path / "run", ids_rows([[1]]))
    other = make_run(tmp_path / "other", ids_rows([[1]]))
    (run / "samples.parquet").unlink()
    (run / SUMMARY_FILE).write_text("kept")
    for args in [("analyze", run), ("compare", other, run), ("report", run)]:
        r = cli(capsys, *args)
        assert (r.code, r.err.count("\n")) == (2, 1) and "samples.parquet is missing" in r.err, (args, r.err)
    assert (run / SUMMARY_FILE).read_text() == "kept"


def test_analyze_writes_summary_json_and_renders(tmp_path, capsys):
    run = make_run(tmp_path / "run", ids_rows([[1, 2, 3]] * 5 + [[1, 2, 4]]))
    r = cli(capsys, "analyze", run, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out) == json.loads((run / SUMMARY_FILE).read_text())
    r = cli(capsys, "analyze", run)
    assert r.code == 0 and "load-independent" in r.out and "@2" in r.out


def test_scripted_server_run_then_analyze_gives_the_known_forks(scripted_server, capsys, tmp_path):
    """End to end: a schedule of 45 Queens / 3 NYC / 2 Jersey per 50 answers, in two arms, beside a steady prompt."""
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC, "J": JERSEY},
        schedules={FEYNMAN: [("Q", 45), ("N", 3), ("J", 2)], "steady": "Q"},
    )
    out = tmp_path / "run"
    r = cli(
        capsys, "run", "--base-url", server.base_url, "-p", FEYNMAN, "-p", "steady", "-n", 50, "-c", "1,8", "--out", out
    )
    assert r.code == 0, r.err
    r = cli(capsys, "analyze", out, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["unit"] == "token" and s["unit_detail"]["compared_as"] == "token_ids"
    feynman, steady = s["prompts"]
    ids = {name: server.token_ids(name) for name in ("Q", "N", "J")}
    for arm in feynman["arms"]:
        assert (arm["n"], arm["ok"], arm["errors"], arm["unique"]) == (50, 50, 0, 3)
        assert [(c["count"], c["first_divergence"], c["text"]) for c in arm["completions"]] == [
            (45, None, "".join(QUEENS)),
            (3, 5, "".join(NYC)),
            (2, 8, "".join(JERSEY)),
        ]
        assert arm["first_divergence"] == {"min": 5, "median": 5, "histogram": {"5": 3, "8": 2}, "samples": 5}
        forks = [
            (
                f["position"],
                f["prefix_count"],
                f["prefix"],
                [(b["token"], b["token_id"], b["count"]) for b in f["branches"]],
                f["margin"],
            )
            for f in arm["forks"]
        ]
        assert forks == [
            (5, 50, "Richard Feynman was born in", [(" Queens", ids["Q"][5], 47), (" New", ids["N"][5], 3)], 2.0),
            (
                8,
                47,
                "Richard Feynman was born in Queens, New",
                [(" York", ids["Q"][8], 45), (" Jersey", ids["J"][8], 2)],
                2.0,
            ),
        ]
        assert arm["stats"]["modal_share"] == 0.9
    assert feynman["verdict"] == "load-independent"
    assert [(a["unique"], a["forks"]) for a in steady["arms"]] == [(1, []), (1, [])]
    assert steady["verdict"] == "deterministic"
    assert s["agreement"]["prompts"] == 2 and s["agreement"]["all_identical"] == 1
    assert (s["earliest_fork"]["prompt_id"], s["earliest_fork"]["position"]) == ("p0", 5)
    assert feynman["prompt"] == FEYNMAN
    assert json.loads((out / SUMMARY_FILE).read_text()) == s


@pytest.mark.parametrize("capture", ["openai", "text"])
def test_scripted_server_other_captures(scripted_server, capsys, tmp_path, capture):
    """Token strings + bytes (OpenAI-shaped) fork at the same token; text-only forks at the character offset."""
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 9), ("N", 1)]}, capture=capture
    )
    out = tmp_path / "run"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", FEYNMAN, "-n", 10, "--out", out)
    assert r.code == 0, r.err
    s = json.loads(cli(capsys, "analyze", out, "--json").out)
    (fork,) = s["prompts"][0]["arms"][0]["forks"]
    if capture == "openai":
        assert s["unit_detail"]["compared_as"] == "token_bytes"
        assert (fork["position"], [(b["token"], b["count"]) for b in fork["branches"]]) == (
            5,
            [(" Queens", 9), (" New", 1)],
        )
    else:
        offset = len("".join(QUEENS[:5])) + 1  # " Queens" vs " New" share the leading space
        assert s["unit"] == "text" and fork["margin"] is None
        assert (fork["position"], [(b["token"], b["count"]) for b in fork["branches"]]) == (
            offset,
            [("Q", 9), ("N", 1)],
        )


def test_model_text_that_looks_like_markup_is_printed_literally(tmp_path, capsys):
    rows = [{"tokens": ["x", "[/]"], "token_bytes": [b"x", b"[/]"], "text": "x[/]", "prompt_id": "[red]p"}] * 2
    rows += [{"tokens": ["x", "[bold]"], "token_bytes": [b"x", b"[bold]"], "text": "x[bold]", "prompt_id": "[red]p"}]
    a = make_run(tmp_path / "a", rows, prompts=("[red]p",), capture="tokens")
    r = cli(capsys, "analyze", a)
    assert r.code == 0, r.err
    assert "'[/]' ×2" in r.out and "'[bold]' ×1" in r.out and "[red]p" in r.out
    b = make_run(tmp_path / "b", rows[2:] * 2, prompts=("[red]p",), capture="tokens")
    r = cli(capsys, "compare", a, b)
    assert r.code == 0, r.err
    assert "'[/]'" in r.out and "'[bold]'" in r.out


def test_load_dependent_server_gets_the_load_dependent_verdict(scripted_server, capsys, tmp_path):
    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC}, latency_s=0.02, schedules={FEYNMAN: {"serial": "Q", "loaded": ["Q", "N"]}}
    )
    out = tmp_path / "run"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", FEYNMAN, "-n", 16, "-c", "1,8", "--out", out)
    assert r.code == 0, r.err
    s = json.loads(cli(capsys, "analyze", out, "--json").out)
    serial, loaded = s["prompts"][0]["arms"]
    assert (serial["unique"], serial["stats"]["divergence_rate_upper95"]) == (1, pytest.approx(1 - 0.05 ** (1 / 16)))
    assert loaded["unique"] == 2 and [f["position"] for f in loaded["forks"]] == [5]
    assert s["prompts"][0]["verdict"] == "load-dependent"
    r = cli(capsys, "analyze", out)
    assert "load-dependent" in r.out and "@5" in r.out


def test_a_run_still_in_shards_is_analysed(tmp_path, capsys):
    """A killed run (shards, no samples.parquet) reads like a finished one; a later shard replaces a row."""
    run = make_run(tmp_path / "run", ids_rows([[1, 2]] * 3))
    (run / "samples.parquet").unlink()
    writer = ShardWriter(run)
    writer.write([{"sample_index": 0, "status": "error", "error": "timeout", "prompt_id": "p0", "arm": "c1"}])
    writer.write([{"sample_index": 0, "status": "ok", "token_ids": [1, 3], "prompt_id": "p0", "arm": "c1"}])
    writer.write([{"sample_index": 1, "status": "ok", "token_ids": [1, 2], "prompt_id": "p0", "arm": "c1"}])
    s = json.loads(cli(capsys, "analyze", run, "--json").out)
    arm = s["prompts"][0]["arms"][0]
    assert (arm["n"], arm["ok"], arm["unique"]) == (2, 2, 2) and arm["forks"][0]["position"] == 1
