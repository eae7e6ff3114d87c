"""Read run directories, and write files atomically (temp name, fsync, rename): a reader sees the old file or the
new one, never half of one. Writing a run (opening, shards, ending) is recorder.py's, on top of these writes.

Over 400 lines, for a reason: the readers of sample files (read_samples, iter_samples, read_sample_rows,
sample_row_groups, sample_list_values, check_samples) share one listing of the parts, one footer check and one
rule for a sample index written twice; split over two modules, that contract would have two homes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from detaudit.errors import RunDirError, UsageError
from detaudit.rundir.schema import (
    LATER_SAMPLE_COLUMNS,
    MANIFEST_FILE,
    RESCORE_FILE,
    RESCORE_SCHEMA,
    SAMPLES_FILE,
    SAMPLES_SCHEMA,
    SCHEMA_VERSION,
    SHARD_NAME,
    SHARDS_DIR,
    SUMMARY_FILE,
    RunManifest,
)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TEMP_NAME = re.compile(r"\..+\.tmp")  # an atomic write's temporary: .NAME.RANDOM.tmp


def _umask_at_import() -> int:
    """The umask by setting and restoring it: done once, at import, before any writer thread exists."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def file_mode() -> int:
    """The mode a plain open() gives a new file: 0666 less the umask (read from /proc where Linux has it, so a
    change after import counts; else the one at import). mkstemp's temporaries are owner-only (0600), and the
    rename keeps that mode, but run directories and reports are for sharing."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o666 & ~_UMASK_AT_IMPORT


def _new_temp(path: Path) -> tuple[int, str]:
    """A temporary next to `path` (same file system, so the rename is atomic) with the mode of file_mode()."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
    except OSError:  # a file system without modes (e.g. some FUSE mounts) keeps what it has
        pass
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half of one."""
    try:
        fd, tmp = _new_temp(path)
    except OSError as e:  # name the file asked for, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# The files of a run directory, which no report or verdict file may replace.
_RUN_FILES = (MANIFEST_FILE, SAMPLES_FILE, SUMMARY_FILE, RESCORE_FILE, SHARDS_DIR)


def check_output_file(path: Path, option: str = "") -> Path:
    """Refuse a file the user named (--html, --md, --junit) that could not be written: a directory, a missing or
    unwritable parent, a run directory's own file. Commands call it up front, so a typo fails before any output.

    Writability is tried with a temporary file that is removed at once (permission bits say nothing for root,
    a read-only file system or a special one like /proc). What write_output_file writes in place (a symlink, or a
    special file such as /dev/null, /dev/stdout or a FIFO) is judged by its permission to write.
    """
    path = Path(path)
    name = f"{option} {path}" if option else str(path)
    if path.is_dir():
        raise UsageError(f"{name} is a directory; give a file name")
    if _written_in_place(path):
        if not path.exists():
            raise UsageError(f"{name} is a symlink to {os.readlink(path)}, which does not exist")
        real = Path(os.path.realpath(path))
        if real.is_file() and (real.parent / MANIFEST_FILE).exists():
            raise UsageError(f"{name} points into the run directory {real.parent}; write the file elsewhere")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{name} is not writable")
        return path
    if not path.parent.is_dir():
        why = "is not a directory" if path.parent.exists() else "does not exist"
        raise UsageError(f"{name}: directory {path.parent} {why}")
    in_run = path.parent if path.parent.name != SHARDS_DIR else path.parent.parent
    if (in_run / MANIFEST_FILE).exists() and (path.name in _RUN_FILES or in_run != path.parent):
        raise UsageError(f"{name} belongs to the run directory {in_run}; write the file elsewhere")
    try:
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UsageError(f"{name}: directory {path.parent} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _written_in_place(path: Path) -> bool:
    """A symlink or a special file (/dev/null, /dev/stdout, a FIFO): an atomic rename would replace the link, the
    device or the pipe itself with a regular file (as root, /dev/null too), so these are opened and written."""
    return path.is_symlink() or (path.exists() and not path.is_file())


def write_output_file(path: Path, data: bytes) -> Path:
    """Write a file the user named (--html, --md, --junit) after check_output_file's checks: a regular file
    atomically, a symlink or special file in place."""
    path = check_output_file(path)
    if not _written_in_place(path):
        atomic_write_bytes(path, data)
        return path
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:  # e.g. /dev/full: name the file, which write() does not
        raise OSError(e.errno, e.strerror, str(path)) from None
    return path


def same_output_file(a: Path, b: Path) -> bool:
    """Whether two output options name one file, so the second write would replace the first; a special file
    such as /dev/null may take both."""
    special = any(p.exists() and not p.is_file() for p in (a, b))
    return not special and Path(a).resolve() == Path(b).resolve()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode())


# Rows per Parquet row group: small enough that reading a few chosen rows (read_sample_rows) decodes little.
ROW_GROUP_ROWS = 1024


def atomic_write_table(path: Path, table: pa.Table) -> None:
    fd, tmp = _new_temp(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Sample rows (dicts keyed by column name; missing keys are null) as a table in SAMPLES_SCHEMA."""
    return pa.Table.from_pylist([dict(r) for r in rows], schema=SAMPLES_SCHEMA)


def describe(e: BaseException, limit: int = 300) -> str:
    """An exception as one bounded, printable line: its text may quote a value a server sent (a lone surrogate,
    an escape sequence), and it goes to a Parquet string column and a terminal."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- the manifest


def read_json(path: Path) -> Any:
    """A JSON file that may be hostile: a regular file, UTF-8, nested no deeper than the parser can go."""
    if not path.is_file():  # a FIFO would block the read forever
        raise RunDirError(f"{path}: not a regular file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise RunDirError(f"{path}: unreadable manifest (JSON nested too deeply)") from None


def write_manifest(run_dir: Path, manifest: RunManifest) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / MANIFEST_FILE, manifest.model_dump(mode="json", by_alias=True))


def load_manifest(run_dir: Path) -> RunManifest:
    """Read manifest.json, refusing what is not a run directory or comes from a newer detaudit."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory")
    path = run_dir / MANIFEST_FILE
    if not path.exists():
        raise RunDirError(f"{run_dir}: not a detaudit run directory (no {MANIFEST_FILE})")
    try:
        data = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: unreadable manifest ({describe(e)})") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("detaudit.run/"):
        raise RunDirError(f"{path}: not a detaudit manifest")
    try:
        version = int(str(data["schema"]).split("/", 1)[1])
    except ValueError:
        raise RunDirError(f"{path}: bad schema tag {data['schema']!r}") from None
    if version > SCHEMA_VERSION:
        raise RunDirError(
            f"{path}: run directory schema version {version} is newer than this detaudit supports "
            f"({SCHEMA_VERSION}); upgrade detaudit"
        )
    try:
        return RunManifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RunDirError(f"{path}: invalid manifest at {where}: {first['msg']}") from None


# ---------------------------------------------------------------- reading samples


def _check_samples_file(path: Path) -> None:
    """Refuse a corrupt, foreign or newer samples file from its footer alone (no data pages are read)."""
    if not path.is_file():  # a FIFO would block the read forever
        raise RunDirError(f"{path}: not a regular file")
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise RunDirError(f"{path}: corrupt or unreadable Parquet ({str(e).splitlines()[0]})") from None
    meta = schema.metadata or {}
    version = meta.get(b"detaudit.schema_version")
    if version is None:
        raise RunDirError(f"{path}: not a detaudit samples file (foreign Parquet)")
    if int(version) > SCHEMA_VERSION:
        raise RunDirError(f"{path}: samples schema version {int(version)} is newer than this detaudit supports")
    missing = [f.name for f in SAMPLES_SCHEMA if f.name not in schema.names and f.name not in LATER_SAMPLE_COLUMNS]
    if missing:
        raise RunDirError(f"{path}: samples file lacks columns {', '.join(missing)}")


def _projected_schema(columns: list[str]) -> pa.Schema:
    return pa.schema([SAMPLES_SCHEMA.field(c) for c in columns], metadata=SAMPLES_SCHEMA.metadata)


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One samples file, only `columns` decoded (all by default), cast to SAMPLES_SCHEMA."""
    _check_samples_file(path)
    names = list(columns) if columns is not None else SAMPLES_SCHEMA.names
    present = set(pq.read_schema(path).names)
    try:
        table = pq.read_table(path, columns=[n for n in names if n in present])
    except (OSError, pa.ArrowException) as e:
        raise RunDirError(f"{path}: corrupt or unreadable Parquet ({str(e).splitlines()[0]})") from None
    return _with_later_columns(table, names).cast(_projected_schema(names))


def _with_later_columns(data: pa.Table | pa.RecordBatch, names: list[str]) -> pa.Table | pa.RecordBatch:
    """`data` with its columns in `names` order, columns added after an older file was written filled with null."""
    cols = [
        data.column(n) if n in data.schema.names else pa.nulls(data.num_rows, SAMPLES_SCHEMA.field(n).type)
        for n in names
    ]
    return type(data).from_arrays(cols, names=names)


def _sample_parts(run_dir: Path) -> list[Path]:
    """samples.parquet and the shards, in write order; refuses a stray file among the shards, which a reader
    would otherwise fold in (or a writer trip over) as if detaudit had written it."""
    parts: list[Path] = []
    if (run_dir / SAMPLES_FILE).exists():
        parts.append(run_dir / SAMPLES_FILE)
    shard_dir = run_dir / SHARDS_DIR
    if shard_dir.is_dir():
        shards = []
        for path in shard_dir.iterdir():
            m = SHARD_NAME.fullmatch(path.name)
            if m:
                shards.append((int(m.group(1)), path))
            elif not TEMP_NAME.fullmatch(path.name):  # a killed write's temporary: never read, removed on resume
                raise RunDirError(f"{path}: not a shard detaudit wrote (shards are named part-NNNNN.parquet)")
        parts.extend(path for _, path in sorted(shards))
    return parts


def has_samples(run_dir: Path) -> bool:
    """Whether any sample file (samples.parquet or a shard) is on disk."""
    return bool(_sample_parts(Path(run_dir)))


def read_samples(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """All sample rows of a run (samples.parquet plus any shards), one per sample_index, sorted by it.

    Only `columns` are decoded from disk (the analysis of a large run needs a few of them).
    """
    run_dir = Path(run_dir)
    parts = _sample_parts(run_dir)
    read = None if columns is None else list(dict.fromkeys(["sample_index", *columns]))
    if not parts:
        table = SAMPLES_SCHEMA.empty_table() if read is None else _projected_schema(read).empty_table()
    else:
        table = pa.concat_tables([_read_parquet(p, read) for p in parts])
    if table.num_rows:
        # Keep the last written row of each sample_index (a retried error row is replaced by its rerun).
        idx = table.column("sample_index").to_numpy()
        if not (idx[1:] > idx[:-1]).all():  # a finalized samples.parquet is already sorted and unique: no copy
            order = idx.argsort(kind="stable")
            sorted_idx = idx[order]
            keep = order[(sorted_idx[1:] != sorted_idx[:-1]).tolist() + [True]]
            table = table.take(pa.array(keep))
    if columns is not None:
        table = table.select(columns)
    return table


def _streamable(run_dir: Path) -> Path | None:
    """samples.parquet when it alone holds the run, sorted and unique by sample_index (a finalized run)."""
    parts = _sample_parts(run_dir)
    if len(parts) != 1 or parts[0].name != SAMPLES_FILE:
        return None
    return parts[0] if _index_rises(parts[0]) else None


def _index_rises(path: Path) -> bool:
    """Whether sample_index rises strictly through a samples file. Streamed on one thread: this check runs before
    every streamed read, and a threaded whole-column read left ~10 MiB of allocator arenas behind each time."""
    _check_samples_file(path)
    last = None
    try:
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(
            65536, columns=["sample_index"], use_threads=False
        ):
            idx = batch.column(0).to_numpy(zero_copy_only=False)
            if not len(idx):
                continue
            if (last is not None and idx[0] <= last) or not (idx[1:] > idx[:-1]).all():
                return False
            last = idx[-1]
    except (OSError, pa.ArrowException) as e:
        raise _corrupt(path, e) from None
    return True


def _corrupt(path: Path, e: Exception) -> RunDirError:
    return RunDirError(f"{path}: corrupt or unreadable Parquet ({str(e).splitlines()[0]})")


def iter_samples(
    run_dir: Path, columns: list[str], batch_rows: int = 16384, use_threads: bool = True
) -> Iterator[pa.RecordBatch]:
    """The rows read_samples() returns, as record batches, without holding the whole run in memory.

    A finalized run (samples.parquet alone, sorted and unique by sample_index) streams from disk; a run with
    shards left (killed, or still going) is read whole, since a later shard may replace an earlier row.
    use_threads=False decodes one column at a time: slower on many cores, but the decoder's working set (and
    the allocator's per-thread caches) stays at one small batch of one column.
    """
    run_dir = Path(run_dir)
    path = _streamable(run_dir)
    if path is None:
        yield from read_samples(run_dir, list(columns)).to_batches(batch_rows)
        return
    schema = _projected_schema(list(columns))
    try:
        # pre_buffer off: buffering whole column chunks ahead would cost memory and buys no speed here
        reader = pq.ParquetFile(path, pre_buffer=False)
        present = [c for c in columns if c in reader.schema_arrow.names]
        for batch in reader.iter_batches(batch_size=batch_rows, columns=present, use_threads=use_threads):
            yield _with_later_columns(batch, list(columns)).cast(schema)
    except (OSError, pa.ArrowException) as e:
        raise _corrupt(path, e) from None


def sample_row_groups(run_dir: Path) -> np.ndarray:
    """Boundaries of the units read_sample_rows() decodes: row-group starts of a finalized samples.parquet, then
    the row count ([0, n] for a run with shards, which is read whole). Lets a caller pick rows that share units."""
    run_dir = Path(run_dir)
    path = _streamable(run_dir)
    if path is None:
        return np.array([0, read_samples(run_dir, ["sample_index"]).num_rows], dtype=np.int64)
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def sample_list_values(run_dir: Path, column: str) -> int:
    """An upper bound on the number of elements in list column `column` over all sample rows, from the Parquet
    footers alone (leaf level counts; a row that a later shard rewrites counts twice). Lets a reader size a buffer
    for them once instead of growing it."""
    total = 0
    for path in _sample_parts(Path(run_dir)):
        _check_samples_file(path)
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowException) as e:
            raise _corrupt(path, e) from None
        leaves = [j for j in range(meta.num_columns) if meta.schema.column(j).path.split(".")[0] == column]
        total += sum(meta.row_group(i).column(j).num_values for i in range(meta.num_row_groups) for j in leaves)
    return total


def read_sample_rows(run_dir: Path, rows: np.ndarray, columns: list[str], batch_rows: int | None = None) -> pa.Table:
    """The rows at these positions (of read_samples() order), in the given order, decoding only the row groups
    that hold them, one at a time: a few rows of heavy columns (token strings, top-k logprobs) cost a few row
    groups of time and one row group of memory. With batch_rows, a row group is decoded that many rows at a
    time, on one thread, keeping only the rows asked for: memory of one small batch instead of a row group."""
    run_dir = Path(run_dir)
    rows = np.asarray(rows, dtype=np.int64)
    path = _streamable(run_dir)
    if path is None:
        return read_samples(run_dir, list(columns)).take(pa.array(rows))
    schema = _projected_schema(list(columns))
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    group = np.searchsorted(bounds, rows, side="right") - 1
    order = np.lexsort((rows, group))  # by row group, then in file order (as batches decode them)
    parts = []
    try:
        f = pq.ParquetFile(path, pre_buffer=False)
        names = list(columns)
        present = [c for c in names if c in f.schema_arrow.names]
        for g in np.unique(group):
            mine = rows[order][group[order] == g] - bounds[g]
            if batch_rows is None:
                parts.append(_with_later_columns(f.read_row_group(int(g), columns=present), names).take(pa.array(mine)))
                continue
            at = 0
            for batch in f.iter_batches(batch_rows, row_groups=[int(g)], columns=present, use_threads=False):
                here = mine[(mine >= at) & (mine < at + batch.num_rows)] - at
                if len(here):
                    parts.append(pa.Table.from_batches([_with_later_columns(batch, names).take(pa.array(here))]))
                at += batch.num_rows
                if at > mine[-1]:
                    break
    except (OSError, pa.ArrowException) as e:
        raise _corrupt(path, e) from None
    if not parts:
        return schema.empty_table()
    back = np.empty(len(rows), dtype=np.int64)
    back[order] = np.arange(len(rows))
    return pa.concat_tables(parts).cast(schema).take(pa.array(back))


def open_run(run_dir: Path) -> tuple[RunManifest, pa.Table]:
    """Validated manifest and sample rows of a run directory."""
    manifest = load_manifest(Path(run_dir))
    return manifest, read_samples(Path(run_dir))


def write_summary(run_dir: Path, summary: BaseModel) -> None:
    """summary.json from the analysis' typed summary (analysis.summary_schema.RunSummary), its keys by their names."""
    atomic_write_json(Path(run_dir) / SUMMARY_FILE, summary.model_dump(by_alias=True))


RESCORE_INFO_KEY = b"detaudit.rescore_info"


def write_rescore(run_dir: Path, rows: Iterable[Mapping[str, Any]], info: Mapping[str, Any]) -> None:
    """rescore.parquet (RESCORE_SCHEMA), replacing any earlier rescore of the run.

    `info` (model, kernels, dtype, device of the rescoring engine) rides in the file's metadata, so the
    summary's rescore section can be rebuilt from the run directory alone by every `detaudit analyze`.
    """
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=RESCORE_SCHEMA)
    meta = {**(table.schema.metadata or {}), RESCORE_INFO_KEY: json.dumps(dict(info), default=str).encode()}
    atomic_write_table(Path(run_dir) / RESCORE_FILE, table.replace_schema_metadata(meta))


def rescore_info(table: pa.Table) -> dict[str, Any]:
    """Who rescored: the `info` given to write_rescore ({} for files written without it)."""
    raw = (table.schema.metadata or {}).get(RESCORE_INFO_KEY)
    return json.loads(raw) if raw else {}


def read_rescore(run_dir: Path) -> pa.Table | None:
    """The run's rescore table, or None when it was never rescored."""
    path = Path(run_dir) / RESCORE_FILE
    if not path.exists():
        return None
    if not path.is_file():  # a FIFO would block the read forever
        raise RunDirError(f"{path}: not a regular file")
    try:
        table = pq.read_table(path)
        meta = table.schema.metadata
        return table.select(RESCORE_SCHEMA.names).cast(RESCORE_SCHEMA).replace_schema_metadata(meta)
    except (OSError, KeyError, pa.ArrowException) as e:
        raise _corrupt(path, e) from None


# ---------------------------------------------------------------- trusting a run directory

STATUSES = ("ok", "error")
_CHECK_COLUMNS = ["sample_index", "status", "prompt_id", "arm"]


def _shown(value: Any) -> str:
    """A value from a file as a short, printable repr (it may hold anything, escape sequences included)."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in repr(value))
    return text if len(text) <= 80 else text[:79] + "…"


def check_samples(run_dir: Path, manifest: RunManifest) -> None:
    """Refuse rows that an edited or foreign run directory could hold, naming the first thing wrong: a sample index
    outside [0, expected), a status other than ok/error, a prompt_id or arm that is not the one the manifest's index
    formula gives that index. (Each index is read once: the reader keeps the last row written for it.)

    Streams four narrow columns, a batch at a time, vectorised: ~0.1 s for 100k rows.
    """
    run_dir = Path(run_dir)
    expected, repeats, n_arms = manifest.expected_samples, manifest.repeats, len(manifest.arms)
    names = {"prompt_id": [p.prompt_id for p in manifest.prompts], "arm": [a.name for a in manifest.arms]}
    positions = {column: {name: i for i, name in enumerate(values)} for column, values in names.items()}
    for batch in iter_samples(run_dir, _CHECK_COLUMNS, batch_rows=65536, use_threads=False):
        col = batch.column("sample_index")
        if col.null_count:
            raise RunDirError(f"{run_dir}: a sample row has no sample_index")
        idx = col.to_numpy()
        outside = (idx < 0) | (idx >= expected)
        if outside.any():
            raise RunDirError(
                f"{run_dir}: sample_index {int(idx[outside][0])} is outside 0..{expected - 1} "
                f"(the manifest expects {expected} samples)"
            )
        known = pc.is_in(batch.column("status"), value_set=pa.array(STATUSES)).fill_null(False)
        if not pc.all(known).as_py():
            i = int(np.flatnonzero(~known.to_numpy(zero_copy_only=False))[0])
            status = _shown(batch.column("status")[i].as_py())
            why = f"has status {status} (only 'ok' and 'error' are recorded)"
            raise RunDirError(f"{run_dir}: sample {int(idx[i])} {why}")
        want = {"prompt_id": idx // (n_arms * repeats), "arm": (idx // repeats) % n_arms}
        for column, pos in want.items():
            enc = pc.dictionary_encode(batch.column(column))
            lookup = np.array([positions[column].get(v, -1) for v in enc.dictionary.to_pylist()] + [-1])
            got = lookup[enc.indices.fill_null(len(enc.dictionary)).to_numpy(zero_copy_only=False)]
            wrong = np.flatnonzero(got != pos)
            if len(wrong):
                i = int(wrong[0])
                raise RunDirError(
                    f"{run_dir}: sample {int(idx[i])} has {column} {_shown(batch.column(column)[i].as_py())}, but the "
                    f"manifest's sample {int(idx[i])} is {column} {_shown(names[column][int(pos[i])])}"
                )
