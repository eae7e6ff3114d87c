"""Reading a run for the analysis: sample rows from memory or a run directory, encoded into distinct completions.

One pass over the compared column (units.SOURCES) and the small per-row columns builds the Sequences and each
row's prompt, arm and system_fingerprint as codes; the display columns are read afterwards for a few rows only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detaudit.analysis.core import Sequences, SourceMissing, encode_sequences
from detaudit.analysis.row_checks import RowChecker, RowFlags
from detaudit.analysis.units import SOURCES, Source
from detaudit.rundir.io import iter_samples, read_sample_rows, sample_list_values, sample_row_groups
from detaudit.rundir.schema import SAMPLES_SCHEMA, RunManifest

# Read for every row, beside the one column completions are compared on (units.SOURCES) and the status.
META_COLUMNS = ["prompt_id", "arm", "concurrency", "system_fingerprint"]
_CODED = ("prompt_id", "arm", "system_fingerprint")  # kept as int32 codes per row, the few names once
META_FLUSH_BATCHES = 32
# Read only for the rows that represent a distinct completion someone will see (completions, fork branches).
# Token ids are not among them: when compared, they are in Sequences already; else nothing shows them.
DISPLAY_COLUMNS = ["text", "tokens", "token_bytes", "top_logprobs"]
# Units (token ids, ...) per record batch read from disk, and the bounds on its rows: memory holds one batch
# (1 MiB of ids) and the distinct completions, whatever the number of samples.
BATCH_UNITS = 1 << 18
BATCH_ROWS = (64, 16384)
DISPLAY_BATCH_ROWS = 64  # display columns (token strings, top-k logprobs) are heavier per row
_CAPTURE_SOURCE: dict[str, Source] = {"token_ids": "token_ids", "tokens": "tokens", "text": "text"}


class RowMeta:
    """Prompt, arm and system_fingerprint of every row as int32 codes (-1 = null), gathered batch by batch, with
    their names in order of first appearance; and the concurrency column. 12 bytes a row, not the strings.
    Batches are coded META_FLUSH_BATCHES at a time (one Arrow call per column, not per small batch)."""

    def __init__(self) -> None:
        self.names: dict[str, dict[Any, int]] = {c: {} for c in _CODED}
        self.parts: dict[str, list[np.ndarray]] = {c: [] for c in _CODED}
        self.concurrency: list[pa.Array] = []
        self.pending: list[pa.RecordBatch] = []
        self.num_rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch.select(META_COLUMNS))
        self.num_rows += batch.num_rows
        if len(self.pending) >= META_FLUSH_BATCHES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        table = pa.Table.from_batches(self.pending)
        self.pending = []
        for c in _CODED:
            enc = pc.dictionary_encode(table.column(c).combine_chunks())
            known = self.names[c]
            to_global = np.array([known.setdefault(v, len(known)) for v in enc.dictionary.to_pylist()], np.int32)
            local = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)
            self.parts[c].append(np.where(local >= 0, to_global[np.maximum(local, 0)] if len(to_global) else -1, -1))
        self.concurrency.append(table.column("concurrency").combine_chunks())

    def codes(self, column: str) -> tuple[np.ndarray, list[Any]]:
        """Per row the code of its value (-1 for null), and the values in code order."""
        self._flush()
        parts = self.parts[column]
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32), list(self.names[column])

    def concurrency_at(self, row: int) -> Any:
        self._flush()
        for part in self.concurrency:
            if row < len(part):
                return part[row].as_py()
            row -= len(part)
        raise IndexError(row)


class SampleReader(Protocol):
    """Where the rows come from: a table in memory, or a run directory read batch by batch."""

    def batches(self, columns: list[str]) -> Iterable[pa.RecordBatch]: ...

    def rows(self, rows: np.ndarray, columns: list[str]) -> pa.Table: ...

    def units(self) -> np.ndarray: ...

    def list_values(self, column: str) -> int: ...


class TableReader:
    """Rows already in memory (summarize())."""

    def __init__(self, table: pa.Table, batch_rows: int = 16384) -> None:
        self.table = table
        self.batch_rows = batch_rows

    def batches(self, columns: list[str]) -> Iterable[pa.RecordBatch]:
        return self.table.select(columns).to_batches(self.batch_rows)

    def rows(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        return self.table.select(columns).take(pa.array(rows, pa.int64()))

    def units(self) -> np.ndarray:
        return np.array([0, self.table.num_rows], dtype=np.int64)  # in memory: any row is as cheap as another

    def list_values(self, column: str) -> int:
        """An upper bound on the elements of list column `column` (a sliced chunk counts its whole child)."""
        return sum(len(chunk.values) for chunk in self.table.column(column).chunks)


class RunDirReader:
    """Rows of a run directory, streamed: only the compared column for all rows, display columns for a few."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._list_values: dict[str, int] = {}
        self._units: np.ndarray | None = None

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """Batches of about BATCH_UNITS list elements, decoded on one thread (see io.iter_samples)."""
        units = sum(self.list_values(c) for c in columns if pa.types.is_list(SAMPLES_SCHEMA.field(c).type))
        rows = int(self.units()[-1])
        batch_rows = int(np.clip(BATCH_UNITS * rows // max(units, 1), *BATCH_ROWS))
        return iter_samples(self.run_dir, columns, batch_rows, use_threads=False)

    def rows(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """One column at a time: the decoder then holds one column's pages, not those of all display columns."""
        parts = [read_sample_rows(self.run_dir, rows, [c], batch_rows=DISPLAY_BATCH_ROWS).column(0) for c in columns]
        return pa.Table.from_arrays(parts, names=columns)

    def units(self) -> np.ndarray:
        if self._units is None:
            self._units = sample_row_groups(self.run_dir)
        return self._units

    def list_values(self, column: str) -> int:
        if column not in self._list_values:
            self._list_values[column] = sample_list_values(self.run_dir, column)
        return self._list_values[column]


def sample_rows(seqs: Sequences, uniques: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """One sample row for each of `uniques`, taken from as few read units (row groups) as possible.

    Greedy set cover: repeatedly take the unit holding the most completions still without a row. In a run
    shaped like the Feynman result a handful of row groups hold every variant, so only those are decoded.
    """
    if len(bounds) <= 2 or not len(uniques):
        return seqs.rep_row[uniques]
    pos = np.flatnonzero(np.isin(seqs.row_seq, uniques))
    which = np.searchsorted(uniques, seqs.row_seq[pos])
    unit = np.searchsorted(bounds, pos, side="right") - 1
    pairs, first = np.unique(unit * len(uniques) + which, return_index=True)
    p_unit, p_which, p_row = pairs // len(uniques), pairs % len(uniques), pos[first]
    chosen = np.full(len(uniques), -1, dtype=np.int64)
    while (chosen < 0).any():
        live = chosen[p_which] < 0
        best = np.bincount(p_unit[live], minlength=len(bounds)).argmax()
        take = live & (p_unit == best)
        chosen[p_which[take]] = p_row[take]
    return chosen


@dataclass
class Encoded:
    """The run as the analysis compares it: distinct completions, row meta, per-row flags, and the records
    abandoned because they disagreed with the text or the token count (source -> rows that disagreed)."""

    seqs: Sequences
    meta: RowMeta
    source: Source
    flags: RowFlags
    finish_recorded: bool
    abandoned: dict[Source, int]


def _states_finish(reader: SampleReader) -> bool:
    """Whether any row of the run says why its answer ended (a finish_reason): else truncation cannot be seen."""
    return any(b.column(0).null_count < b.num_rows for b in reader.batches(["finish_reason"]))


def encode(reader: SampleReader, manifest: RunManifest) -> Encoded:
    """One pass over the rows: distinct completions in the richest faithful source every compared row carries,
    plus row meta and per-row flags (row_checks).

    A source that some compared row lacks is abandoned at the first batch showing it, one that disagrees with the
    text or the token count on some row after the pass (so the disagreeing rows are counted); the next is tried.
    """
    recorded = _states_finish(reader)
    logprobs = reader.list_values("logprobs") > 0
    abandoned: dict[Source, int] = {}

    def attempt(source: Source) -> tuple[Sequences, RowMeta, RowFlags]:
        meta = RowMeta()
        checker = RowChecker(manifest, source, recorded, logprobs)

        def tee(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                meta.add(b)
                yield checker.check(b)

        capacity = None if source == "text" else reader.list_values(source)
        columns = list(dict.fromkeys([*META_COLUMNS, "status", source, *checker.columns]))
        seqs = encode_sequences(tee(reader.batches(columns)), source, capacity)
        return seqs, meta, checker.finish(meta.num_rows)

    for source in SOURCES[:-1]:
        try:
            seqs, meta, flags = attempt(source)
        except SourceMissing:
            continue
        if flags.disagree:
            abandoned[source] = flags.disagree
            continue
        if not (seqs.row_seq >= 0).any():  # no compared row: nothing says what was captured but the manifest
            source = _CAPTURE_SOURCE.get(manifest.capture, "text")
        return Encoded(seqs, meta, source, flags, recorded, abandoned)
    seqs, meta, flags = attempt("text")
    return Encoded(seqs, meta, "text", flags, recorded, abandoned)


_POOL_LOCK = threading.Lock()
_pool_users: list[pa.MemoryPool] = []  # the default pool to restore, once per analysis running now


@contextmanager
def frugal_arrow_pool() -> Iterator[None]:
    """Arrow memory from jemalloc while the analysis runs, where this pyarrow build has it.

    The analysis decodes many small batches one after another; pyarrow's default allocator on Linux (mimalloc)
    keeps much of each batch's freed memory resident, jemalloc gives it back: on 100k x 1k token ids the peak
    RSS above a warm process is ~35 MiB instead of ~59 (benchmarks/RESULTS.md). Buffers remember their pool, so
    switching back is safe; analyses running at once in several threads restore the default when the last ends.
    """
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a build without jemalloc (e.g. Windows): keep the default
        yield
        return
    with _POOL_LOCK:
        _pool_users.append(pa.default_memory_pool() if not _pool_users else _pool_users[0])
        pa.set_memory_pool(pool)
    try:
        yield
    finally:
        with _POOL_LOCK:
            before = _pool_users.pop()
            if not _pool_users:
                pa.set_memory_pool(before)
