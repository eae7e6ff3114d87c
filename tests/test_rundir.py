"""The run directory's reader refuses what is not a run and keeps one row per sample index."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runhelp import tree_snapshot

from detaudit.errors import RecordingFailed, RunDirError, UsageError
from detaudit.rundir.io import check_samples, load_manifest, read_samples, rows_to_table, write_manifest
from detaudit.rundir.recorder import ShardWriter, end_run, finalize_samples, load_resumable, prepare_out_dir
from detaudit.rundir.schema import ArmSpec, PromptSpec, RequestParams, RunManifest, TargetSpec


def _manifest() -> RunManifest:
    return RunManifest(
        run_id="r1",
        tool_version="test",
        created_at=datetime.now(timezone.utc),
        target=TargetSpec(kind="endpoint", base_url="http://127.0.0.1:1/v1", model="m"),
        params=RequestParams(max_tokens=8),
        prompts=[PromptSpec(prompt_id="p0", prompt="hi")],
        arms=[ArmSpec(name="c1", concurrency=1)],
        repeats=3,
    )


def test_shards_fold_into_one_samples_file_without_duplicates(tmp_path):
    write_manifest(tmp_path, _manifest())
    w = ShardWriter(tmp_path)
    w.write([{"sample_index": 0, "status": "ok", "text": "a"}, {"sample_index": 2, "status": "error"}])
    w.write([{"sample_index": 1, "status": "ok", "text": "b"}, {"sample_index": 2, "status": "ok", "text": "c"}])
    table = finalize_samples(tmp_path)
    assert table.column("sample_index").to_pylist() == [0, 1, 2]
    assert table.column("text").to_pylist() == ["a", "b", "c"]
    assert not (tmp_path / "shards").exists()
    assert read_samples(tmp_path).equals(table)


def test_manifest_round_trips(tmp_path):
    write_manifest(tmp_path, _manifest())
    m = load_manifest(tmp_path)
    assert m.repeats == 3 and m.expected_samples == 3 and m.sample_index(0, 0, 2) == 2


def test_newer_schema_version_is_refused(tmp_path):
    write_manifest(tmp_path, _manifest())
    text = (tmp_path / "manifest.json").read_text().replace("detaudit.run/1", "detaudit.run/99")
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(RunDirError, match="newer"):
        load_manifest(tmp_path)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(RunDirError, match="not a detaudit run directory"):
        load_manifest(tmp_path)
    with pytest.raises(RunDirError, match="no such"):
        load_manifest(tmp_path / "missing")


def test_foreign_and_corrupt_parquet_are_refused(tmp_path):
    write_manifest(tmp_path, _manifest())
    pq.write_table(pa.table({"x": [1]}), tmp_path / "samples.parquet")
    with pytest.raises(RunDirError, match="foreign"):
        read_samples(tmp_path)
    (tmp_path / "samples.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(RunDirError, match="corrupt"):
        read_samples(tmp_path)


def test_existing_out_needs_resume_or_force(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        prepare_out_dir(tmp_path, force=False)
    with pytest.raises(UsageError, match="not a detaudit run directory"):
        prepare_out_dir(tmp_path, force=True)
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_out_inside_another_run_is_refused(tmp_path):
    """RUN/sub would be deleted by `--force` on RUN and mixed into RUN's files; nothing is created."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text('{"schema": "detaudit.run/1"}')
    for out in (tmp_path / "run" / "sub", tmp_path / "run" / "a" / "b"):
        with pytest.raises(UsageError, match="inside the run directory"):
            prepare_out_dir(out, force=True)
        assert not out.exists()
    prepare_out_dir(tmp_path / "next-to-it", force=False)  # a sibling is fine


def test_force_never_clears_a_directory_with_someone_elses_manifest(tmp_path):
    """A browser extension or web app has a manifest.json too; only a detaudit manifest lets --force delete."""
    (tmp_path / "manifest.json").write_text('{"manifest_version": 3}')
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="not a detaudit run directory"):
        prepare_out_dir(tmp_path, force=True)
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_a_samples_file_from_before_the_later_columns_reads_back_with_nulls(tmp_path):
    """error_reason and raw_answer were appended after the first release: older files lack them."""
    import numpy as np

    from detaudit.rundir.io import iter_samples, read_sample_rows
    from detaudit.rundir.schema import LATER_SAMPLE_COLUMNS, SAMPLES_SCHEMA

    old = pa.schema([f for f in SAMPLES_SCHEMA if f.name not in LATER_SAMPLE_COLUMNS], metadata=SAMPLES_SCHEMA.metadata)
    rows = [{"sample_index": i, "status": "error", "error": "HTTP 503: busy", "text": None} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows, schema=old), tmp_path / "samples.parquet")
    whole = read_samples(tmp_path)
    assert whole.schema.names == SAMPLES_SCHEMA.names
    assert whole.column("error_reason").null_count == 4 and whole.column("error").to_pylist()[0] == "HTTP 503: busy"
    streamed = list(iter_samples(tmp_path, ["sample_index", "raw_answer"]))
    assert sum(b.num_rows for b in streamed) == 4 and streamed[0].column(1).null_count == streamed[0].num_rows
    for batch_rows in (None, 2):
        picked = read_sample_rows(tmp_path, np.array([3, 1]), ["sample_index", "error_reason"], batch_rows=batch_rows)
        assert picked.to_pylist() == [{"sample_index": i, "error_reason": None} for i in (3, 1)]


# ---------------------------------------------------------------- the writer never loses a row (#15)

GOOD = {"run_id": "r1", "prompt_id": "p0", "arm": "c1", "concurrency": 1, "status": "ok", "text": "fine"}


def test_a_row_parquet_refuses_becomes_its_error_row_and_spares_its_neighbours(tmp_path):
    """A lone surrogate (what a server's JSON "\\ud800" decodes to) cannot be stored as UTF-8: that row alone becomes
    an `unwritable` error row, the shard holds every index once, and the writer raises so the run stops."""
    write_manifest(tmp_path, _manifest())
    rows = [
        {**GOOD, "sample_index": 0},
        {**GOOD, "sample_index": 1, "text": "bad \ud800", "tokens": ["\ud800"]},
        {**GOOD, "sample_index": 2, "token_ids": [2**40]},
    ]
    with pytest.raises(RecordingFailed, match=r"sample 1: UnicodeEncodeError.*\\ud800.*\(and 1 more rows\)"):
        ShardWriter(tmp_path).write(rows)
    table = read_samples(tmp_path)
    assert table.column("sample_index").to_pylist() == [0, 1, 2]
    by_index = {r["sample_index"]: r for r in table.to_pylist()}
    assert by_index[0]["status"] == "ok" and by_index[0]["text"] == "fine"
    for i in (1, 2):
        assert by_index[i]["status"] == "error" and by_index[i]["error_reason"] == "unwritable"
        assert by_index[i]["text"] is None and by_index[i]["prompt_id"] == "p0" and by_index[i]["arm"] == "c1"
        assert by_index[i]["error"].startswith("the answer could not be recorded: ")
    assert "\ud800" not in by_index[1]["error"] and "\\ud800" in by_index[1]["error"]  # escaped, storable


def test_a_shard_that_cannot_be_written_is_retried_once_then_stops_the_run(tmp_path, monkeypatch):
    from detaudit.rundir import recorder

    write_manifest(tmp_path, _manifest())
    writer = ShardWriter(tmp_path)
    monkeypatch.setattr(recorder, "WRITE_RETRY_S", 0.0)
    real, calls = recorder.atomic_write_table, []

    def full_once(path, table):  # a transient ENOSPC: the retry succeeds and nothing is lost
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device", str(path))
        real(path, table)

    monkeypatch.setattr(recorder, "atomic_write_table", full_once)
    writer.write([{**GOOD, "sample_index": 0}])
    assert len(calls) == 2 and read_samples(tmp_path).num_rows == 1
    monkeypatch.setattr(recorder, "atomic_write_table", real)
    # The shard directory replaced by a file (root ignores permission bits, so a chmod would not stop it).
    for p in (tmp_path / "shards").iterdir():
        p.unlink()
    (tmp_path / "shards").rmdir()
    (tmp_path / "shards").write_text("not a directory")
    with pytest.raises(RecordingFailed, match=r"cannot write 1 rows to .*shards/part-00001\.parquet: NotADirectory"):
        writer.write([{**GOOD, "sample_index": 1}])


def test_end_run_says_complete_only_when_every_index_is_on_disk(tmp_path):
    write_manifest(tmp_path, _manifest())
    ShardWriter(tmp_path).write([{**GOOD, "sample_index": i} for i in (0, 2)])
    end = end_run(tmp_path, _manifest(), interrupted=False, failure=None)
    assert end.manifest.status == "failed" and load_manifest(tmp_path).status == "failed"
    assert end.failure == "2 rows on disk for 3 samples (1 missing, 0 outside 0..2)" and end.rows == 2
    ShardWriter(tmp_path).write([{**GOOD, "sample_index": 1}])
    end = end_run(tmp_path, _manifest(), interrupted=True, failure=None)  # Ctrl-C: no fold, no count needed
    assert (end.manifest.status, end.failure, end.rows) == ("interrupted", None, 3)
    end = end_run(tmp_path, _manifest(), interrupted=True, failure="cannot write")  # a failure outranks Ctrl-C
    assert end.manifest.status == "failed" and end.failure == "cannot write"
    end = end_run(tmp_path, _manifest(), interrupted=False, failure=None)
    assert (end.manifest.status, end.failure, end.rows) == ("complete", None, 3)
    assert load_manifest(tmp_path).status == "complete" and not (tmp_path / "shards").exists()


# ---------------------------------------------------------------- --force and --resume on what detaudit did not write


def _finished_run(path):
    write_manifest(path, _manifest())
    ShardWriter(path).write([{**GOOD, "sample_index": i} for i in range(3)])
    end_run(path, _manifest(), interrupted=False, failure=None)
    (path / "summary.json").write_text("{}")
    return path


def test_force_removes_only_the_files_of_the_run(tmp_path):
    run = _finished_run(tmp_path / "run")
    (run / "shards").mkdir()
    (run / "shards" / "part-00007.parquet").write_bytes(b"x")
    (run / ".samples.parquet.abc.tmp").write_bytes(b"x")
    prepare_out_dir(run, force=True)
    assert run.is_dir() and not any(run.iterdir())


@pytest.mark.parametrize(
    ("stray", "named"),
    [
        ("notes.txt", "notes.txt"),
        ("shards/part-x.parquet", "part-x.parquet"),
        ("shards/keep.csv", "keep.csv"),
        ("data/x", "data"),
    ],
)
def test_force_refuses_a_run_directory_holding_anything_else(tmp_path, stray, named):
    run = _finished_run(tmp_path / "run")
    (run / stray).parent.mkdir(exist_ok=True)
    (run / stray).write_text("mine")
    before = tree_snapshot(run)
    with pytest.raises(UsageError, match=f"--force refuses to clear .*/{named} was not written by detaudit"):
        prepare_out_dir(run, force=True)
    assert tree_snapshot(run) == before


def test_force_never_clears_through_a_symlink(tmp_path):
    run = _finished_run(tmp_path / "run")
    link = tmp_path / "link"
    link.symlink_to(run)
    before = tree_snapshot(run)
    with pytest.raises(UsageError, match="is a symlink"):
        prepare_out_dir(link, force=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "part-00000.parquet").write_text("theirs")
    (run / "shards").symlink_to(tmp_path / "elsewhere")  # a shards/ that points elsewhere is not detaudit's either
    with pytest.raises(UsageError, match="/shards was not written by detaudit"):
        prepare_out_dir(run, force=True)
    assert (tmp_path / "elsewhere" / "part-00000.parquet").read_text() == "theirs"
    assert before.items() <= tree_snapshot(run).items()


def test_a_manifest_nested_too_deeply_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"schema": "detaudit.run/1", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RunDirError, match="nested too deeply"):
        load_manifest(tmp_path)
    with pytest.raises(UsageError, match="not a detaudit run directory"):  # so --force will not clear it either
        prepare_out_dir(tmp_path, force=True)


def test_a_stray_file_among_the_shards_is_refused_by_every_reader(tmp_path):
    run = _finished_run(tmp_path / "run")
    (run / "shards").mkdir()
    (run / "shards" / ".part-00001.parquet.xyz.tmp").write_bytes(b"half")  # a killed write's temporary: ignored
    assert read_samples(run).num_rows == 3
    (run / "samples.parquet").rename(run / "shards" / "part-x.parquet")
    with pytest.raises(RunDirError, match=r"part-x\.parquet: not a shard detaudit wrote"):
        read_samples(run)
    with pytest.raises(RunDirError, match="not a shard"):
        load_resumable(run)


# ---------------------------------------------------------------- readers check rows against the manifest


def _edited(tmp_path, manifest: RunManifest, rows: list[dict]):
    write_manifest(tmp_path, manifest)
    pq.write_table(rows_to_table([{**GOOD, **r} for r in rows]), tmp_path / "samples.parquet")
    return tmp_path


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"sample_index": 0}, {"sample_index": -5}], "sample_index -5 is outside 0..2"),
        ([{"sample_index": 0}, {"sample_index": 10**12}], "sample_index 1000000000000 is outside 0..2"),
        ([{"sample_index": 0, "status": "maybe"}], r"sample 0 has status 'maybe' \(only 'ok' and 'error'"),
        ([{"sample_index": 0, "status": None}], "sample 0 has status None"),
        (
            [{"sample_index": 1, "prompt_id": "p9"}],
            "sample 1 has prompt_id 'p9', but the manifest's sample 1 is prompt_id 'p0'",
        ),
        ([{"sample_index": 2, "arm": "\x1b]0;pwned\x07"}], r"sample 2 has arm '\\x1b\]0;pwned\\x07', but"),
        ([{"sample_index": None}], "a sample row has no sample_index"),
    ],
)
def test_rows_that_disagree_with_the_manifest_are_refused_by_name(tmp_path, rows, message):
    with pytest.raises(RunDirError, match=message):
        check_samples(_edited(tmp_path, _manifest(), rows), _manifest())


def test_rows_in_shards_are_checked_after_the_readers_dedupe(tmp_path):
    """Shards may hold an index twice (a retried error row, a kill during the fold): the reader keeps the last."""
    run = _edited(tmp_path, _manifest(), [{"sample_index": i, "status": "error"} for i in range(3)])
    ShardWriter(run).write([{**GOOD, "sample_index": 1}])
    check_samples(run, _manifest())
    assert read_samples(run).column("status").to_pylist() == ["error", "ok", "error"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("arms", [], "at arms: List should have at least 1 item"),
        ("prompts", [], "at prompts: List should have at least 1 item"),
        ("repeats", 0, "at repeats: Input should be greater than or equal to 1"),
        ("arms", [{"name": "c1", "concurrency": 1}] * 2, "arm 'c1' appears twice"),
    ],
)
def test_a_manifest_without_arms_or_prompts_is_refused(tmp_path, field, value, message):
    write_manifest(tmp_path, _manifest())
    data = json.loads((tmp_path / "manifest.json").read_text())
    data[field] = value
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(RunDirError, match=message):
        load_manifest(tmp_path)
