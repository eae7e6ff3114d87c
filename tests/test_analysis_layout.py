"""The analysis's data layout: exact grouping through hashes, the flat unit buffer, lcps, and the columnar reads."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
from test_analysis import ids_rows, make_run

from detaudit.analysis import core
from detaudit.analysis.core import encode_sequences, lcp_pairs, lcp_with
from detaudit.analysis.run_reader import TableReader
from detaudit.analysis.summary import Limits, analyze, summarize, summarize_run
from detaudit.errors import RunDirError
from detaudit.rundir.io import (
    ROW_GROUP_ROWS,
    load_manifest,
    read_sample_rows,
    read_samples,
    rows_to_table,
    sample_list_values,
)
from detaudit.rundir.recorder import ShardWriter


def _lcp(x: list, y: list) -> int:
    n = min(len(x), len(y))
    return next((i for i in range(n) if x[i] != y[i]), n)


def _ids_batches(seqs: list[list[int]], batch_rows: int) -> list[pa.RecordBatch]:
    table = rows_to_table([{"status": "ok", "token_ids": s} for s in seqs]).select(["status", "token_ids"])
    return table.to_batches(batch_rows)


def test_grouping_is_exact_when_every_completion_hashes_alike(tmp_path, monkeypatch):
    """Distinct completions are told apart by their units, not their hash: with one hash for all, same answers."""
    rng = random.Random(11)
    seqs = [[rng.randrange(3) for _ in range(rng.randrange(5))] for _ in range(200)]
    path = make_run(tmp_path, ids_rows(seqs))
    honest = summarize_run(path, Limits(10**4, 10**4))
    monkeypatch.setattr(core, "hash", lambda data: 7, raising=False)  # core looks `hash` up in its module first
    for batch_rows in (1, 16, 10**4):
        reader = TableReader(read_samples(path), batch_rows=batch_rows)
        assert analyze(load_manifest(path), reader, Limits(10**4, 10**4))[0] == honest
    assert honest.prompts[0].arms[0].unique == len({tuple(s) for s in seqs})


@pytest.mark.parametrize("capacity", [None, 1, 10**6])
def test_the_unit_buffer_holds_each_distinct_completion_once_in_order(capacity):
    """Whatever the buffer's first size (it grows when too small): each distinct completion once, rank = sort."""
    rng = random.Random(capacity or 0)
    base = [rng.randrange(-1, 2**31 - 1) for _ in range(300)]
    seqs = [base[: rng.randrange(301)] + [rng.randrange(-1, 5) for _ in range(rng.randrange(3))] for _ in range(400)]
    s = encode_sequences(_ids_batches(seqs, 37), "token_ids", capacity)
    distinct = list(dict.fromkeys(tuple(q) for q in seqs))  # order of first appearance
    assert [tuple(s.seq(u).tolist()) for u in range(s.n_unique)] == distinct
    assert s.rank.tolist() == [sorted(distinct).index(q) for q in distinct]
    assert [s.row_seq[i] for i in s.rep_row] == list(range(s.n_unique))
    assert int(s.starts[-1] + s.lens[-1]) == sum(len(q) for q in distinct)  # no completion stored twice


def test_lcps_of_long_sequences_match_brute_force():
    """Common prefixes past the widest compared block (256 units), of any length, at any offset in the buffer."""
    rng = random.Random(5)
    base = [rng.randrange(50_000) for _ in range(1500)]
    seqs = [base[: rng.randrange(1501)] + [rng.randrange(50_000) for _ in range(rng.randrange(40))] for _ in range(300)]
    s = encode_sequences(_ids_batches(seqs, 64), "token_ids", None)
    stored = [s.seq(u).tolist() for u in range(s.n_unique)]
    a = np.array([rng.randrange(s.n_unique) for _ in range(500)])
    b = np.array([rng.randrange(s.n_unique) for _ in range(500)])
    assert lcp_pairs(s, a, b).tolist() == [_lcp(stored[i], stored[j]) for i, j in zip(a, b, strict=True)]
    order = np.argsort(s.rank)
    neighbour = lcp_pairs(s, order[:-1], order[1:])
    at = int(s.rank[0])  # completion 0, wherever it sorts
    assert lcp_with(neighbour, at).tolist() == [
        -1 if k == at else _lcp(stored[0], stored[u]) for k, u in enumerate(order.tolist())
    ]


def test_display_rows_read_in_small_batches_equal_whole_row_groups(tmp_path):
    n = 2 * ROW_GROUP_ROWS + 50
    path = make_run(tmp_path, [{"token_ids": [i], "text": f"row {i}"} for i in range(n)])
    rows = np.array([n - 1, 3, ROW_GROUP_ROWS, 3, 17, ROW_GROUP_ROWS - 1, 2 * ROW_GROUP_ROWS])
    whole = read_sample_rows(path, rows, ["sample_index", "text"])
    assert read_sample_rows(path, rows, ["sample_index", "text"], batch_rows=5) == whole
    assert whole.column("sample_index").to_pylist() == rows.tolist()


def test_list_value_count_bounds_the_elements(tmp_path):
    """From the footers of a finished run and of a run still in shards: never below the truth, never far above."""
    seqs = [[1] * (i % 7) for i in range(3000)]
    finished = make_run(tmp_path / "done", ids_rows(seqs))
    assert sample_list_values(finished, "token_ids") >= sum(map(len, seqs))
    assert sample_list_values(finished, "token_ids") <= sum(map(len, seqs)) + len(seqs)  # + one level per empty list
    going = tmp_path / "going"
    make_run(going, ids_rows(seqs[:10]))
    ShardWriter(going).write([{"sample_index": 10, "prompt_id": "p0", "arm": "c1", "status": "ok", "token_ids": [4]}])
    assert sum(map(len, seqs[:10])) + 1 <= sample_list_values(going, "token_ids") <= sum(map(len, seqs[:10])) + 12


def test_the_default_arrow_pool_is_restored_even_when_analyses_overlap(tmp_path):
    """The analysis borrows jemalloc for Arrow (where built in) and gives the process its own default back."""
    from concurrent.futures import ThreadPoolExecutor

    path = make_run(tmp_path, ids_rows([[1, 2, 3]] * 30 + [[1, 2, 4]] * 3))
    before = pa.default_memory_pool().backend_name
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: summarize_run(path), range(8)))
    assert all(r == results[0] for r in results) and results[0].prompts[0].arms[0].unique == 2
    assert pa.default_memory_pool().backend_name == before


def test_prompts_and_arms_found_only_in_the_rows(tmp_path):
    """Rows of a prompt and an arm the manifest does not list: a run directory holding them is refused (#15), the
    in-memory analysis still groups them (a missing pair was an IndexError)."""
    run = make_run(tmp_path, ids_rows([[1, 2]] * 5))
    manifest = load_manifest(run)
    rows = [{"status": "ok", "prompt_id": "p0", "arm": "c1", "concurrency": 1, **r} for r in ids_rows([[1, 2]] * 5)]
    rows += [{"status": "ok", "prompt_id": "p0", **r} for r in ids_rows([[1, 3]] * 2, arm="c64", concurrency=64)]
    rows += [{"status": "ok", "arm": "c1", "concurrency": 1, **r} for r in ids_rows([[4]] * 3, prompt_id="px")]
    table = rows_to_table([{"sample_index": i, **r} for i, r in enumerate(rows)])
    s = summarize(manifest, table, Limits())
    shape = {(p.prompt_id, a.arm, a.concurrency, a.ok) for p in s.prompts for a in p.arms}
    assert shape == {("p0", "c1", 1, 5), ("p0", "c64", 64, 2), ("px", "c1", 1, 3)}
    ShardWriter(run).write([{**rows[5], "sample_index": 4}])
    with pytest.raises(RunDirError, match="sample 4 has arm 'c64', but the manifest's sample 4 is arm 'c1'"):
        summarize_run(run)
