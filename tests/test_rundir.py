"""The run directory's reader refuses what is not a run and keeps one row per sample index."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detaudit.errors import RunDirError, UsageError
from detaudit.rundir.io import (
    ShardWriter,
    finalize_samples,
    load_manifest,
    prepare_out_dir,
    read_samples,
    write_manifest,
)
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
        prepare_out_dir(tmp_path, resume=False, force=False)
    with pytest.raises(UsageError, match="not a detaudit run directory"):
        prepare_out_dir(tmp_path, resume=False, force=True)
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_out_inside_another_run_is_refused(tmp_path):
    """RUN/sub would be deleted by `--force` on RUN and mixed into RUN's files; nothing is created."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text('{"schema": "detaudit.run/1"}')
    for out in (tmp_path / "run" / "sub", tmp_path / "run" / "a" / "b"):
        with pytest.raises(UsageError, match="inside the run directory"):
            prepare_out_dir(out, resume=False, force=True)
        assert not out.exists()
    prepare_out_dir(tmp_path / "next-to-it", resume=False, force=False)  # a sibling is fine


def test_force_never_clears_a_directory_with_someone_elses_manifest(tmp_path):
    """A browser extension or web app has a manifest.json too; only a detaudit manifest lets --force delete."""
    (tmp_path / "manifest.json").write_text('{"manifest_version": 3}')
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="not a detaudit run directory"):
        prepare_out_dir(tmp_path, resume=False, force=True)
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
