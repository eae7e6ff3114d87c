"""Write a run directory: the one way every target (an endpoint, a managed server, the built-in engine) opens one,
fills it with sample rows, marks how the run ended and folds it.

- Opening: check_out_dir() is the one `--out` check (callers run it early, before a network, a server or a model
  is reached; Recorder.create runs it again before clearing); load_resumable() trusts a run to finish.
- Filling: sample_row() builds the columns every target fills alike; a Recorder buffers rows and flushes them as
  numbered shards under RUN/shards/, on the caller's thread or in a worker thread while an event loop keeps
  sending. A flush never loses a row: a value Parquet refuses becomes that row's `unwritable` error row, a shard
  that cannot be written is tried once more, and either way the run then stops and ends `failed`.
- Ending: end_run() decides complete, interrupted or failed from the rows on disk and folds the shards.

A run killed at any moment leaves a readable directory (io.py reads it): the manifest says `started`, the shards
hold what finished, and `--resume` runs only the sample indices that are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from detaudit.errors import RecordingFailed, RunDirError, UsageError
from detaudit.rundir.io import (
    TEMP_NAME,
    atomic_write_table,
    check_samples,
    describe,
    load_manifest,
    read_json,
    read_samples,
    rows_to_table,
    write_manifest,
)
from detaudit.rundir.schema import (
    MANIFEST_FILE,
    RUN_DIR_FILES,
    SAMPLES_FILE,
    SHARD_NAME,
    SHARDS_DIR,
    RunManifest,
    Status,
)

# ---------------------------------------------------------------- opening


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an --out that may not receive a new run, touching nothing: runs call it before the network (or a
    server, or a model) is reached, and prepare_out_dir() again before clearing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    # A run nested in another would be folded into, or deleted with, its parent (and `analyze` lists neither).
    parent = next((p for p in out.absolute().parents if _is_run_dir(p)), None)
    if parent is not None:
        raise UsageError(f"--out {out} is inside the run directory {parent}; choose a path outside it")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise UsageError(f"--out {out} already exists; pass --resume to finish it or --force to replace it")
    if out.is_symlink():  # clearing it would delete files in whatever it points to
        raise UsageError(
            f"--force refuses to clear {out}: it is a symlink (to {os.readlink(out)}); name the run directory itself"
        )
    if not _is_run_dir(out):
        raise UsageError(f"--force refuses to clear {out}: it is not a detaudit run directory")
    _run_entries(out)


def prepare_out_dir(out: Path, *, force: bool) -> None:
    """Check that `out` may receive a new run. With --force, removes the files of the run directory there, and
    only those (the directory itself stays); anything else in it is refused, never deleted."""
    check_out_dir(out, force)
    if out.is_dir() and any(out.iterdir()):
        for path in _run_entries(out):
            path.rmdir() if path.is_dir() else path.unlink()


def _run_entries(out: Path) -> list[Path]:
    """The files of run directory `out` that detaudit wrote, deepest first; raises if anything else is there, so
    that --force never deletes a file detaudit did not write."""
    found: list[Path] = []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name == SHARDS_DIR and entry.is_dir() and not entry.is_symlink():
            for part in sorted(entry.iterdir()):
                if not (SHARD_NAME.fullmatch(part.name) or TEMP_NAME.fullmatch(part.name)) or not _plain_file(part):
                    raise UsageError(f"--force refuses to clear {out}: {part} was not written by detaudit")
                found.append(part)
            found.append(entry)
        elif (name in RUN_DIR_FILES or TEMP_NAME.fullmatch(name)) and _plain_file(entry):
            found.append(entry)
        else:
            raise UsageError(f"--force refuses to clear {out}: {entry} was not written by detaudit")
    return found


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _is_run_dir(path: Path) -> bool:
    """Whether `path` holds a detaudit manifest (any version, valid or not): what --force may clear."""
    try:
        data = read_json(path / MANIFEST_FILE)
    except (OSError, ValueError, RunDirError):
        return False
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("detaudit.run/")


def load_resumable(run_dir: Path) -> RunManifest:
    """The manifest of a run to finish, once everything --resume will trust has been checked, before it writes a
    byte: the manifest, the sample files (names, footers, data) and their rows."""
    manifest = load_manifest(run_dir)
    read_samples(run_dir)  # refuse corrupt or foreign Parquet
    check_samples(run_dir, manifest)
    return manifest


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Half-written temporaries of a killed run (atomic writes never renamed): never read, safe to drop on resume."""
    for pattern in (".*.tmp", f"{SHARDS_DIR}/.*.tmp"):
        for path in run_dir.glob(pattern):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------- sample rows


@dataclass(frozen=True)
class Timing:
    """When a sample was asked and answered, and in how many attempts."""

    started_at: datetime
    finished_at: datetime
    latency_s: float
    attempts: int = 1


# What identifies a row and its request: built by sample_row, kept when the rest of an unwritable row is dropped.
_IDENTITY_COLUMNS = (
    *("run_id", "sample_index", "prompt_id", "arm", "concurrency", "repeat"),
    *("attempts", "latency_s", "started_at", "finished_at"),
)


def sample_row(
    manifest: RunManifest, prompt_pos: int, arm_pos: int, repeat: int, status: Status, timing: Timing, **answer: Any
) -> dict[str, Any]:
    """One sample row: the columns every target fills alike (which sample it is, by the manifest's index formula;
    its status; its timing), then the target's `answer` columns (ok: the completion; error: why)."""
    arm = manifest.arms[arm_pos]
    return {
        "run_id": manifest.run_id,
        "sample_index": manifest.sample_index(prompt_pos, arm_pos, repeat),
        "prompt_id": manifest.prompts[prompt_pos].prompt_id,
        "arm": arm.name,
        "concurrency": arm.concurrency,
        "repeat": repeat,
        "status": status,
        "attempts": timing.attempts,
        "latency_s": timing.latency_s,
        "started_at": timing.started_at,
        "finished_at": timing.finished_at,
        **answer,
    }


UNWRITABLE = "unwritable"  # error_reason of a row whose values Parquet refused
# What pyarrow raises for a value it cannot store in the column's type.
_VALUE_ERRORS = (pa.ArrowException, UnicodeError, TypeError, ValueError, OverflowError)


def unwritable_row(row: Mapping[str, Any], why: str) -> dict[str, Any]:
    """The error row recorded in place of a row Parquet refused: its identity, status error, reason unwritable."""
    return {
        **{c: row.get(c) for c in _IDENTITY_COLUMNS},
        "status": "error",
        "error_reason": UNWRITABLE,
        "error": f"the answer could not be recorded: {why}",
    }


def salvage_table(rows: Sequence[Mapping[str, Any]]) -> tuple[pa.Table, list[str]]:
    """The rows as one table; a row whose values pyarrow refuses becomes its unwritable error row, so it cannot
    take its neighbours with it. Returns the table and one message per row replaced."""
    try:
        return rows_to_table(rows), []
    except _VALUE_ERRORS:
        pass
    tables, problems = [], []
    for row in rows:  # rare path: find the rows at fault one by one
        try:
            tables.append(rows_to_table([row]))
        except _VALUE_ERRORS as e:
            why = describe(e)
            problems.append(f"sample {row.get('sample_index')}: {why}")
            tables.append(rows_to_table([unwritable_row(row, why)]))  # our own values: a raise here is a bug
    return pa.concat_tables(tables), problems


# ---------------------------------------------------------------- filling

WRITE_RETRY_S = 0.2  # pause before the one retry of a shard write (a transient OS error)


class ShardWriter:
    """Appends finished rows as numbered Parquet shards under RUN/shards/, and never loses one silently.

    write() keeps every row it can: a row whose values Parquet refuses is recorded as its unwritable error row
    (so its sample index still has exactly one row), and a shard file that cannot be written is tried once more.
    Either way it then raises RecordingFailed, and the caller stops the run and marks it failed.
    """

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / SHARDS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = [int(m.group(1)) for p in self.dir.iterdir() if (m := SHARD_NAME.fullmatch(p.name))]
        self._next = max(existing, default=-1) + 1

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        table, problems = salvage_table(rows)
        path = self.dir / f"part-{self._next:05d}.parquet"
        try:
            atomic_write_table(path, table)
        except (OSError, pa.ArrowException):
            time.sleep(WRITE_RETRY_S)
            try:
                atomic_write_table(path, table)
            except (OSError, pa.ArrowException) as e:
                raise RecordingFailed(f"cannot write {len(rows)} rows to {path}: {describe(e)}") from None
        self._next += 1
        if problems:
            more = f" (and {len(problems) - 1} more rows)" if len(problems) > 1 else ""
            raise RecordingFailed(
                f"Parquet refused a value, recorded as an {UNWRITABLE} error row: {problems[0]}{more}"
            )


class Recorder:
    """One run directory being written: its manifest, the rows not yet flushed, and why recording failed.

    Rows are buffered (add) and written as a shard when the buffer is full or the caller says so: flush() on the
    caller's thread, raising RecordingFailed; flush_async() in a worker thread, so an event loop keeps sending,
    calling `on_failure` (the runner's halt) the moment a write fails. Either way the first reason is kept in
    `failure`, and end() or abort() then marks the run failed.
    """

    def __init__(self, run_dir: Path, manifest: RunManifest, *, flush_rows: int) -> None:
        write_manifest(run_dir, manifest)
        self.run_dir, self.manifest, self.flush_rows = run_dir, manifest, flush_rows
        self.failure: str | None = None
        self.on_failure: Callable[[], None] = lambda: None
        self._shards = ShardWriter(run_dir)
        # A flush awaited by a cancelled task keeps running in its thread: the lock keeps shard numbers apart.
        self._lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []
        self._pending: set[asyncio.Future[str | None]] = set()

    @classmethod
    def create(cls, out: Path, manifest: RunManifest, *, force: bool, flush_rows: int) -> Recorder:
        """A new run in `out`: the --out check once more (time has passed since the early one), --force's clear,
        then the manifest, status started."""
        prepare_out_dir(out, force=force)
        return cls(out, manifest, flush_rows=flush_rows)

    @classmethod
    def resume(cls, run_dir: Path, manifest: RunManifest, *, flush_rows: int) -> Recorder:
        """The unfinished run in `run_dir` (load_resumable trusted it), started again: the rows on disk stay."""
        _remove_stale_temp_files(run_dir)
        started = manifest.model_copy(update={"status": "started", "finished_at": None})
        return cls(run_dir, started, flush_rows=flush_rows)

    def add(self, row: dict[str, Any]) -> bool:
        """Buffer a finished row; returns whether the buffer is full (the caller flushes it now)."""
        self._rows.append(row)
        return len(self._rows) >= self.flush_rows

    def flush(self) -> None:
        """Write the buffered rows as a shard on this thread; raises RecordingFailed when that failed."""
        why = self._write(self._take())
        if why is not None:
            self.failure = self.failure or why
            raise RecordingFailed(why)

    async def flush_async(self) -> None:
        """Write the buffered rows as a shard in a worker thread. The write runs on even if this awaiter is
        cancelled (a worker or the periodic flusher being stopped): drain() waits for it before the run ends, and
        its outcome is read by _written, whoever awaits it (the flusher task's own exceptions were lost: #15)."""
        rows = self._take()
        if not rows:
            return
        write = asyncio.ensure_future(asyncio.to_thread(self._write, rows))
        self._pending.add(write)
        write.add_done_callback(self._written)
        await asyncio.shield(write)

    async def flush_every(self, interval_s: float) -> None:
        """Flush about every `interval_s` until cancelled: a kill loses at most that much of the answers."""
        while True:
            await asyncio.sleep(interval_s)
            await self.flush_async()

    async def drain(self) -> None:
        """Flush the buffer and wait for every shard write still in flight."""
        await self.flush_async()
        while self._pending:
            await asyncio.gather(*list(self._pending))

    def end(self, *, interrupted: bool = False) -> RunEnd:
        """Mark how the run ended (end_run): failed when a flush failed, else interrupted or complete."""
        return end_run(self.run_dir, self.manifest, interrupted=interrupted, failure=self.failure)

    def abort(self, e: BaseException) -> RunEnd:
        """End a run that `e` stopped: Ctrl-C (KeyboardInterrupt) leaves it interrupted; anything else failed, for
        the reason a flush gave, or else as the internal error it is (the traceback follows)."""
        if not isinstance(e, Exception):
            return self.end(interrupted=True)
        self.failure = self.failure or f"internal error: {describe(e)}"
        return self.end()

    def _take(self) -> list[dict[str, Any]]:
        rows, self._rows = self._rows, []
        return rows

    def _write(self, rows: list[dict[str, Any]]) -> str | None:
        """Write one shard (on any thread); returns why recording failed instead of raising."""
        if not rows:
            return None
        with self._lock:
            try:
                self._shards.write(rows)
            except RecordingFailed as e:
                return str(e)
            except Exception as e:  # noqa: BLE001 - whatever stops a shard stops the run, and says why
                return f"cannot write {len(rows)} rows: {describe(e)}"
        return None

    def _written(self, write: asyncio.Future[str | None]) -> None:
        """A shard write ended (on the event loop, before its awaiters resume): a failure stops the run at once."""
        self._pending.discard(write)
        why = "a shard write was cancelled" if write.cancelled() else write.result()
        if why is not None:
            self.failure = self.failure or why
            self.on_failure()


# ---------------------------------------------------------------- ending and folding


def finalize_samples(run_dir: Path) -> pa.Table:
    """Fold samples.parquet and all shards into one sorted samples.parquet, then drop the shards.

    The new samples.parquet is in place (atomically) before any shard is removed, so a kill in between
    leaves rows present twice on disk; read_samples() keeps one of each sample_index, so nothing is
    lost or duplicated for the reader.
    """
    table = read_samples(run_dir)
    atomic_write_table(run_dir / SAMPLES_FILE, table)
    shards = run_dir / SHARDS_DIR
    if shards.is_dir():
        shutil.rmtree(shards)
    return table


@dataclass
class RunEnd:
    """How a run ended, as written to its manifest."""

    manifest: RunManifest
    failure: str | None  # why the run is `failed`; None for complete and interrupted runs
    rows: int | None  # sample rows on disk (one per index), None when they could not be counted


def end_run(run_dir: Path, manifest: RunManifest, *, interrupted: bool, failure: str | None) -> RunEnd:
    """Decide and write a run's final status. Every writer of run directories ends here (endpoint runs, managed
    servers, the built-in engine), so the status always agrees with the rows on disk:

    - complete: the shards are folded, and samples.parquet holds exactly the sample indices 0..expected-1, once
      each (counted on disk before the manifest says so);
    - failed: recording failed (`failure`: a shard that could not be written, an unwritable row, a crash), or
      the rows on disk do not add up; the shards stay, `--resume` finishes the run;
    - interrupted: the user stopped the run (Ctrl-C, SIGTERM) and every finished row is on disk.
    """
    rows = None
    if failure is None and not interrupted:
        try:
            idx = finalize_samples(run_dir).column("sample_index").to_numpy()
            rows = len(idx)
            failure = _count_problem(idx, manifest.expected_samples)
        except (OSError, RunDirError) as e:
            failure = f"cannot fold the shards into {SAMPLES_FILE}: {describe(e)}"
    if rows is None:
        with contextlib.suppress(OSError, RunDirError):
            rows = read_samples(run_dir, ["sample_index"]).num_rows
    status = "failed" if failure else "interrupted" if interrupted else "complete"
    manifest = manifest.model_copy(update={"status": status, "finished_at": datetime.now(timezone.utc)})
    try:
        write_manifest(run_dir, manifest)
    except OSError as e:
        if failure is None:
            raise
        failure += f"; the manifest could not be marked failed either ({describe(e)})"
    return RunEnd(manifest, failure, rows)


def _count_problem(idx: np.ndarray, expected: int) -> str | None:
    """None when `idx` (sorted, unique: read_samples order) is exactly 0..expected-1, else what is wrong."""
    if len(idx) == expected and (not expected or (idx[0] == 0 and idx[-1] == expected - 1)):
        return None
    outside = int(((idx < 0) | (idx >= expected)).sum())
    missing = expected - (len(idx) - outside)
    return f"{len(idx)} rows on disk for {expected} samples ({missing} missing, {outside} outside 0..{expected - 1})"
