"""The run summary (detaudit.summary/1): unique completions, first divergence, forks, statistics and verdicts.

`summarize(manifest, table)` is a pure function of a run's manifest and sample rows in memory;
`summarize_run(run_dir)` streams them from a run directory instead. Both run `analyze()`: one pass that groups
the completions, the numbers per prompt and arm, then the text of what is shown, read for a few rows only.
docs/summary.md documents every key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detaudit.analysis.core import Sequences, SourceMissing, encode_sequences, find_forks, lcp_pairs, lcp_with
from detaudit.analysis.decode import Decoder, clip_text
from detaudit.analysis.rescore_summary import summarize_rescore
from detaudit.analysis.stats import arm_stats
from detaudit.analysis.units import SOURCES, Source, unit_of
from detaudit.errors import RunDirError
from detaudit.rundir.io import (
    check_samples,
    has_samples,
    iter_samples,
    load_manifest,
    read_rescore,
    read_sample_rows,
    sample_list_values,
    sample_row_groups,
    write_summary,
)
from detaudit.rundir.schema import SAMPLES_FILE, SAMPLES_SCHEMA, PromptSpec, RunManifest

SUMMARY_SCHEMA = "detaudit.summary/1"
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
MIN_SAMPLES = 2  # fewer ok samples than this cannot show a divergence: the arm is inconclusive
CONTEXT_UNITS = 6  # units each side of a completion's first divergence kept for the report's aligned view


@dataclass(frozen=True)
class Limits:
    """How much of a long tail the summary lists; the totals are always given beside the lists."""

    completions: int = 20
    forks: int = 50
    branches: int = 10


@dataclass
class GroupResult:
    """One set of samples analysed together (a prompt's arm, or a prompt's arms pooled), kept for compare."""

    n_ok: int
    uniq: np.ndarray  # distinct completions, most frequent first (ties: lexicographic order)
    counts: np.ndarray
    first_fork: int | None


class _RowMeta:
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


def _order_uniques(seqs: Sequences, row_seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, counts = np.unique(row_seq, return_counts=True)
    order = np.lexsort((seqs.rank[uniq], -counts))
    return uniq[order], counts[order]


def _sorted(seqs: Sequences, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """These completions in lexicographic order: the order (indices into uniq), its inverse, neighbour lcps."""
    srt = np.argsort(seqs.rank[uniq], kind="stable")
    inv = np.empty_like(srt)
    inv[srt] = np.arange(len(srt))
    su = uniq[srt]
    return srt, inv, lcp_pairs(seqs, su[:-1], su[1:])


def _fork_plan(seqs: Sequences, su: np.ndarray, sc: np.ndarray, neighbour_lcp: np.ndarray, limits: Limits):
    """Branching nodes of the prefix trie of these completions (sorted, with their counts): the numbers only.

    Returns (forks shown, total forks, completions the text of the forks needs).
    """
    if len(su) < 2:
        return [], 0, set()
    cum = np.concatenate([[0], np.cumsum(sc)])
    raw = find_forks(neighbour_lcp)
    # keep the forks most samples pass through, then list them by depth
    raw.sort(key=lambda f: (-(cum[f.last + 1] - cum[f.first]), f.position))
    shown = sorted(raw[: limits.forks], key=lambda f: (f.position, -(cum[f.last + 1] - cum[f.first])))
    plans, needed = [], set()
    for f in shown:
        children = []
        for a, b in f.children:
            best = a + int(np.argmax(sc[a : b + 1]))  # the most frequent completion on this branch
            children.append((int(cum[b + 1] - cum[a]), int(su[a]), int(su[best]), seqs.lens[su[a]] > f.position))
        children.sort(key=lambda c: (-c[0], int(seqs.rank[c[1]])))  # by count, ties in token order ("ended" first)
        on_modal = next((rep for _, _, rep, has_token in children if has_token), None)
        plans.append((f, int(cum[f.last + 1] - cum[f.first]), children, on_modal, int(su[f.first])))
        needed.update(c[1] for c in children[: limits.branches])
        needed.add(int(su[f.first]))
        if on_modal is not None:
            needed.add(on_modal)
    return plans, len(raw), needed


def _fork_json(plans: list, sorted_counts: np.ndarray, dec: Decoder, limits: Limits) -> list[dict]:
    out = []
    for f, prefix_count, children, on_modal, prefix_u in plans:
        out.append(
            {
                "position": f.position,
                "prefix_count": prefix_count,
                "prefix": dec.prefix(prefix_u, f.position),
                "branches": [
                    {"token": dec.token(u, f.position), "token_id": dec.token_id(u, f.position), "count": n}
                    for n, u, _, _ in children[: limits.branches]
                ],
                "branches_total": len(children),
                "margin": dec.margin(on_modal, f.position) if on_modal is not None else None,
                "parent": None,
            }
        )
    _link_parents([p[0] for p in plans], out, sorted_counts, limits)
    return out


def _link_parents(shown: list, out: list[dict], sorted_counts: np.ndarray, limits: Limits) -> None:
    """Set each listed fork's `parent` to {fork, branch}: the deepest listed fork above it and the branch it is on.

    Forks are lcp intervals of the sorted completions, so an ancestor's interval contains its descendants'.
    A fork whose ancestors are not listed (limits), or that sits on an unlisted branch, stays a root (None).
    """
    for gi, g in enumerate(shown):
        above = [
            fi for fi, f in enumerate(shown) if f.position < g.position and f.first <= g.first and g.last <= f.last
        ]
        if not above:
            continue
        fi = max(above, key=lambda i: shown[i].position)
        f = shown[fi]
        ranked = sorted(
            range(len(f.children)),
            key=lambda c: (-int(sorted_counts[f.children[c][0] : f.children[c][1] + 1].sum()), f.children[c][0]),
        )
        child = next(c for c, (a, b) in enumerate(f.children) if a <= g.first <= b)
        branch = ranked.index(child)
        if branch < limits.branches:
            out[gi]["parent"] = {"fork": fi, "branch": branch}


def _context(dec: Decoder, seqs: Sequences, modal: int, u: int, fork: int) -> dict[str, Any]:
    """Units of completion u and of the modal one around u's first divergence (CONTEXT_UNITS each side)."""
    start = max(0, fork - CONTEXT_UNITS)
    stop = fork + CONTEXT_UNITS
    return {
        "start": start,
        "tokens": [dec.token(u, p) for p in range(start, min(int(seqs.lens[u]), stop))],
        "modal": [dec.token(modal, p) for p in range(start, min(int(seqs.lens[modal]), stop))],
    }


def _histogram(fd: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """min / median / histogram of first-divergence positions over the samples that differ from the modal one."""
    if len(fd) < 2:
        return {"min": None, "median": None, "histogram": {}, "samples": 0}
    pos, w = fd[1:], counts[1:]
    per_sample = np.repeat(pos, w)
    values, tally = np.unique(per_sample, return_counts=True)
    median = float(np.median(per_sample))
    return {
        "min": int(values[0]),
        "median": int(median) if median.is_integer() else median,
        "histogram": {str(int(v)): int(t) for v, t in zip(values, tally, strict=True)},
        "samples": int(w.sum()),
    }


def _arm(
    seqs: Sequences, rows: np.ndarray, fp_codes: np.ndarray, fp_names: list, limits: Limits
) -> tuple[Callable[[Decoder], dict], GroupResult, set[int]]:
    """The arm block for the rows `rows`: computed now, turned into text later by the returned builder.

    Also returns the distinct completions whose text the block shows, so only their rows are read from disk.
    """
    row_seq = seqs.row_seq[rows]
    ok_rows = rows[row_seq >= 0]
    row_seq = row_seq[row_seq >= 0]
    n_ok = len(row_seq)
    head: dict[str, Any] = {"n": len(rows), "ok": n_ok, "errors": len(rows) - n_ok}
    if n_ok == 0:
        head.update(unique=0, completions=[], first_divergence=_histogram(np.zeros(0), np.zeros(0)), forks=[])
        head.update(forks_total=0, earliest_fork=None, stats=arm_stats(0, 0, 0), system_fingerprints=None)
        return lambda dec: head, GroupResult(0, np.zeros(0, np.int64), np.zeros(0, np.int64), None), set()
    uniq, counts = _order_uniques(seqs, row_seq)
    srt, inv, neighbour_lcp = _sorted(seqs, uniq)
    sorted_counts = counts[srt]
    # first divergence: lcp with the modal completion (uniq[0]); -1 for the modal one itself, never shown
    fd = lcp_with(neighbour_lcp, int(inv[0]))[inv]
    plans, forks_total, needed = _fork_plan(seqs, uniq[srt], sorted_counts, neighbour_lcp, limits)
    shown = [int(u) for u in uniq[: limits.completions]]
    needed.update(shown)
    earliest = plans[0][0].position if plans else None

    def build(dec: Decoder) -> dict:
        block = dict(head)
        block["unique"] = len(uniq)
        block["completions"] = []
        for i, u in enumerate(shown):
            text = dec.completion_text(u)
            block["completions"].append(
                {
                    "count": int(counts[i]),
                    "share": int(counts[i]) / n_ok,
                    "first_divergence": None if i == 0 else int(fd[i]),
                    "length": int(seqs.lens[u]),
                    "text": clip_text(text),
                    "text_chars": len(text),
                }
            )
        for i, comp in enumerate(block["completions"][1:], start=1):
            comp["context"] = _context(dec, seqs, shown[0], shown[i], int(fd[i]))
        block["first_divergence"] = _histogram(fd, counts)
        block["forks"] = _fork_json(plans, sorted_counts, dec, limits)
        block["forks_total"] = forks_total
        block["earliest_fork"] = earliest
        block["stats"] = arm_stats(n_ok, int(counts[0]), len(uniq))
        block["system_fingerprints"] = _by_fingerprint(seqs, ok_rows, fp_codes, fp_names)
        return block

    return build, GroupResult(n_ok, uniq, counts, earliest), needed


def _by_fingerprint(seqs: Sequences, ok_rows: np.ndarray, fp_codes: np.ndarray, fp_names: list) -> list | None:
    """Per system_fingerprint value: samples, distinct completions, modal share. None unless it varies."""
    codes = fp_codes[ok_rows]
    present = np.unique(codes)
    if len(present) < 2:
        return None
    out = []
    for code in present:
        row_seq = seqs.row_seq[ok_rows[codes == code]]
        uniq, counts = _order_uniques(seqs, row_seq)
        out.append(
            {
                "system_fingerprint": fp_names[code] if code >= 0 else None,
                "n": len(row_seq),
                "unique": len(uniq),
                "modal_share": int(counts[0]) / len(row_seq),
            }
        )
    return out


def _prompt_text(spec: PromptSpec) -> str | None:
    """The prompt as a person reads it: the plain prompt, else the last chat message's text."""
    if spec.prompt is not None:
        return spec.prompt
    content = (spec.messages or [{}])[-1].get("content")
    return content if isinstance(content, str) else None


def verdict(arms: list[dict], pooled_unique: int) -> tuple[str, str]:
    """Load verdict of one prompt from its arms (docs/summary.md, "verdict"), with the reason in words."""
    if not arms:
        return "inconclusive", "no samples"
    thin = [a["arm"] for a in arms if a["ok"] < MIN_SAMPLES]
    if thin:
        return "inconclusive", f"fewer than {MIN_SAMPLES} ok samples in arm {', '.join(thin)}"
    serial = [a for a in arms if a["concurrency"] == 1]
    loaded = [a for a in arms if a["concurrency"] != 1]
    with_errors = [a["arm"] for a in arms if a["errors"]]
    if any(a["unique"] > 1 for a in serial):
        return "load-independent", "the serial arm (concurrency 1) already diverges"
    diverging = [a["arm"] for a in loaded if a["unique"] > 1]
    if not diverging and pooled_unique == 1:
        if with_errors:
            return "inconclusive", f"no divergence seen, but errors in arm {', '.join(with_errors)} may hide one"
        return "deterministic", "every arm returned one completion, the same in all arms"
    if not serial:
        return "inconclusive", "completions differ, but there is no serial arm (concurrency 1) to compare with"
    serial_errors = [a["arm"] for a in serial if a["errors"]]
    if serial_errors:
        return "inconclusive", f"errors in the serial arm {', '.join(serial_errors)} may hide a divergence there"
    if diverging:
        return "load-dependent", f"the serial arm returns one completion; arm {', '.join(diverging)} diverges"
    return "load-dependent", "each arm returns one completion, but the loaded arm's differs from the serial one"


def _agreement(
    prompt_groups: list[tuple[str, list[tuple[str, int, np.ndarray]]]], seqs: Sequences, fp_codes, fp_names
) -> dict:
    """TARr-style agreement: the share of prompts whose completions are all identical, overall, per arm, per
    system_fingerprint (when it varies). A prompt with fewer than MIN_SAMPLES ok samples is not counted."""

    def share(groups: list[np.ndarray]) -> dict:
        judged = [g for g in groups if (seqs.row_seq[g] >= 0).sum() >= MIN_SAMPLES]
        same = sum(1 for g in judged if len(np.unique(seqs.row_seq[g][seqs.row_seq[g] >= 0])) == 1)
        return {"prompts": len(judged), "all_identical": same, "share": same / len(judged) if judged else None}

    pooled = [np.concatenate([r for _, _, r in arms]) if arms else np.zeros(0, np.int64) for _, arms in prompt_groups]
    out = share(pooled)
    arm_names: dict[str, int] = {}
    for _, arms in prompt_groups:
        for name, conc, _ in arms:
            arm_names.setdefault(name, conc)
    out["by_arm"] = [
        {"arm": name, "concurrency": conc, **share([r for _, arms in prompt_groups for n, _, r in arms if n == name])}
        for name, conc in arm_names.items()
    ]
    ok_codes = fp_codes[seqs.row_seq >= 0]
    values = np.unique(ok_codes)
    out["by_system_fingerprint"] = (
        [
            {"system_fingerprint": fp_names[v] if v >= 0 else None, **share([g[fp_codes[g] == v] for g in pooled])}
            for v in values
        ]
        if len(values) > 1
        else None
    )
    return out


_CAPTURE_SOURCE: dict[str, Source] = {"token_ids": "token_ids", "tokens": "tokens", "text": "text"}


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


def _sample_rows(seqs: Sequences, uniques: np.ndarray, bounds: np.ndarray) -> np.ndarray:
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


def _encode(reader: SampleReader, manifest: RunManifest) -> tuple[Sequences, _RowMeta, Source]:
    """One pass over the rows: distinct completions in the richest source every ok row carries, plus row meta.

    A source that some ok row lacks is abandoned at the first batch showing it, and the next one is tried.
    """

    def attempt(source: Source) -> tuple[Sequences, _RowMeta]:
        meta = _RowMeta()

        def tee(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                meta.add(b)
                yield b

        capacity = None if source == "text" else reader.list_values(source)
        seqs = encode_sequences(tee(reader.batches([*META_COLUMNS, "status", source])), source, capacity)
        return seqs, meta

    for source in SOURCES[:-1]:
        try:
            seqs, meta = attempt(source)
        except SourceMissing:
            continue
        if not (seqs.row_seq >= 0).any():  # no ok row: nothing says what was captured but the manifest
            source = _CAPTURE_SOURCE.get(manifest.capture, "text")
        return seqs, meta, source
    seqs, meta = attempt("text")
    return seqs, meta, "text"


def summarize(manifest: RunManifest, table: pa.Table, limits: Limits = Limits()) -> dict[str, Any]:
    """The detaudit.summary/1 document of a run, from its manifest and sample rows (in SAMPLES_SCHEMA)."""
    return analyze(manifest, TableReader(table), limits)[0]


def load_run_manifest(run_dir: Path) -> RunManifest:
    """The manifest of a run to analyse, once its rows have been checked against it (io.check_samples): an edited
    run directory is refused with what is wrong, never counted. So is a finished run whose samples file is gone
    (it would read as 0/0)."""
    manifest = load_manifest(run_dir)
    # A finished run always has some: samples.parquet is written before the manifest says complete.
    if manifest.status == "complete" and not has_samples(run_dir):
        raise RunDirError(f"{run_dir}: {SAMPLES_FILE} is missing, though the manifest says the run is complete")
    check_samples(run_dir, manifest)
    return manifest


def summarize_run(run_dir: Path | str, limits: Limits = Limits()) -> dict[str, Any]:
    """Read a run directory (manifest + samples) and summarize it; raises RunDirError for what is not a run.

    The samples are streamed: all rows of the compared column, and the display columns of a few rows only.
    """
    manifest = load_run_manifest(Path(run_dir))
    summary = analyze(manifest, RunDirReader(Path(run_dir)), limits)[0]
    rescored = read_rescore(Path(run_dir))
    if rescored is not None:
        summary["rescore"] = summarize_rescore(rescored)
    return summary


def store_summary(run_dir: Path | str, on_unwritable: Callable[[OSError], None] | None = None) -> dict[str, Any]:
    """The last step of every pipeline: summarize a run and write it to RUN/summary.json. With `on_unwritable`, a
    summary.json that cannot be written (a read-only copy of a run) is reported to it instead of raised."""
    summary = summarize_run(run_dir)
    try:
        write_summary(Path(run_dir), summary)
    except OSError as e:
        if on_unwritable is None:
            raise
        on_unwritable(e)
    return summary


_POOL_LOCK = threading.Lock()
_pool_users: list[pa.MemoryPool] = []  # the default pool to restore, once per analysis running now


@contextmanager
def _frugal_arrow_pool() -> Iterator[None]:
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


def analyze(
    manifest: RunManifest, reader: SampleReader, limits: Limits = Limits()
) -> tuple[dict[str, Any], Sequences, Decoder, dict[str, GroupResult]]:
    """summarize(), plus the internals compare needs: sequences, decoder and each prompt's pooled result."""
    with _frugal_arrow_pool():
        return _analyze(manifest, reader, limits)


def _analyze(
    manifest: RunManifest, reader: SampleReader, limits: Limits
) -> tuple[dict[str, Any], Sequences, Decoder, dict[str, GroupResult]]:
    seqs, meta, source = _encode(reader, manifest)
    p_codes, p_names = meta.codes("prompt_id")
    a_codes, a_names = meta.codes("arm")
    fp_codes, fp_names = meta.codes("system_fingerprint")

    # prompts and arms in manifest order, then any found only in the rows
    known_prompts = {q.prompt_id for q in manifest.prompts}
    prompt_order = [p.prompt_id for p in manifest.prompts] + [p for p in p_names if p not in known_prompts]
    arm_conc = {a.name: a.concurrency for a in manifest.arms}
    arm_order = list(arm_conc) + [a for a in a_names if a not in arm_conc]
    p_index = {name: i for i, name in enumerate(p_names)}
    a_index = {name: i for i, name in enumerate(a_names)}
    key = p_codes.astype(np.int64) * (len(a_names) + 1) + a_codes
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], np.arange(len(p_names) * (len(a_names) + 1) + 1))  # every (p, a) key

    def rows_of(p: str, a: str) -> np.ndarray:
        if p not in p_index or a not in a_index:
            return np.zeros(0, dtype=np.int64)
        k = p_index[p] * (len(a_names) + 1) + a_index[a]
        return order[bounds[k] : bounds[k + 1]]

    # numbers first, for every prompt and arm; the text of what will be shown is read afterwards, in one pass
    needed: set[int] = set()
    plan = []
    groups, pooled_results = [], {}
    for p in prompt_order:
        arms, arm_rows = [], []
        for a in arm_order:
            rows = rows_of(p, a)
            if not len(rows) and a not in arm_conc:
                continue
            build, _, wanted = _arm(seqs, rows, fp_codes, fp_names, limits)
            needed |= wanted
            c = arm_conc[a] if a in arm_conc else meta.concurrency_at(int(rows[0]))
            arms.append((a, c, build))
            arm_rows.append((a, c, rows))
        all_rows = np.concatenate([r for _, _, r in arm_rows]) if arm_rows else np.zeros(0, np.int64)
        pooled_seq = seqs.row_seq[all_rows]
        pooled_seq = pooled_seq[pooled_seq >= 0]
        plan.append((p, arms, len(np.unique(pooled_seq))))
        if len(pooled_seq):
            uniq, counts = _order_uniques(seqs, pooled_seq)
            pooled_results[p] = GroupResult(len(pooled_seq), uniq, counts, None)
            needed.add(int(uniq[0]))
        groups.append((p, arm_rows))

    shown = np.array(sorted(needed), dtype=np.int64)
    dec = Decoder(reader.rows(_sample_rows(seqs, shown, reader.units()), DISPLAY_COLUMNS), shown, seqs)
    prompt_text = {q.prompt_id: _prompt_text(q) for q in manifest.prompts}
    prompts = []
    for p, arms, pooled_unique in plan:
        blocks = [
            {"arm": a, "concurrency": c, "expected": manifest.repeats if a in arm_conc else None, **build(dec)}
            for a, c, build in arms
        ]
        if p in pooled_results:
            forks = [b["earliest_fork"] for b in blocks if b["earliest_fork"] is not None]
            pooled_results[p].first_fork = min(forks, default=None)
        v, why = verdict(blocks, pooled_unique)
        prompts.append(
            {"prompt_id": p, "prompt": prompt_text.get(p), "unique_all_arms": pooled_unique, "arms": blocks,
             "verdict": v, "verdict_reason": why}
        )  # fmt: skip

    earliest = None
    for pr in prompts:
        for a in pr["arms"]:
            if a["forks"] and (earliest is None or a["forks"][0]["position"] < earliest["position"]):
                f = a["forks"][0]
                earliest = {
                    "prompt_id": pr["prompt_id"],
                    "arm": a["arm"],
                    "position": f["position"],
                    "prefix": f["prefix"],
                    "branches": f["branches"],
                }
    n_ok = int((seqs.row_seq >= 0).sum())
    summary = {
        "schema": SUMMARY_SCHEMA,
        "run_id": manifest.run_id,
        "run_status": manifest.status,
        "model": manifest.target.model,
        "system_fingerprints": sorted(str(n) for n in fp_names if n is not None),  # every value the run saw
        "unit": unit_of(source),
        "unit_detail": {
            "compared_as": source,
            "capture": manifest.capture,
            "positions": "characters (Unicode code points)" if source == "text" else "tokens",
        },
        "samples": {
            "expected": manifest.expected_samples,
            "rows": meta.num_rows,
            "ok": n_ok,
            "errors": meta.num_rows - n_ok,
        },
        "unique_per_prompt": [
            {
                "prompt_id": pr["prompt_id"],
                "unique": pr["unique_all_arms"],
                "by_arm": {a["arm"]: a["unique"] for a in pr["arms"]},
            }
            for pr in prompts
        ],
        "agreement": _agreement(groups, seqs, fp_codes, fp_names),
        "earliest_fork": earliest,
        "limits": {"completions": limits.completions, "forks": limits.forks, "branches": limits.branches},
        "prompts": prompts,
    }
    return summary, seqs, dec, pooled_results
