"""Checks on every row, made in the analysis's one pass over the compared column (docs/summary.md, "Which answers
are compared").

- **Truncated answers.** An answer is compared only when it ended for a stated reason: a natural stop, or `length`
  at the requested max_tokens. One without a finish_reason (a stream cut short, then closed with a normal
  `[DONE]`), `length` short of max_tokens, or any other reason (`abort`, `content_filter`) is `truncated`: counted
  per arm, never compared. A run in which no row states a finish_reason at all cannot tell them apart; then every
  ok answer is compared and a note says so.
- **Faithful units.** The compared record must agree with the text (joined token strings or bytes == text) and
  with `usage.completion_tokens` (one entry per token) on every compared row; a record that disagrees anywhere is
  abandoned for the next one (units.SOURCES), and the rows that disagreed are counted.
- **Logprob vectors.** Each row's logprobs are hashed (64 bits over their float32 bytes), so identical completions
  carrying different numbers are seen without keeping the numbers. Only when completions are compared token by
  token: two equal texts may be different token sequences, whose logprobs do not line up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detaudit.analysis.units import Source
from detaudit.rundir.schema import RunManifest

# finish_reason values that say the model ended the answer itself (OpenAI's "stop"; TGI's "eos_token" and
# "stop_sequence"; "eos" from some llama.cpp builds). "length" counts only at the requested max_tokens.
STATED_ENDS = ("stop", "eos", "eos_token", "stop_sequence")
LENGTH = "length"
TRUNCATED_STATUS = "truncated"  # what the encoder sees instead of "ok" for a truncated row: it is not compared
_NO_HASH = np.int64(0)
_STATED = pa.array(STATED_ENDS, pa.string())


@dataclass
class RowFlags:
    """Per row of the run (reader order): truncated, and the logprob vector's hash where logprobs were recorded."""

    truncated: np.ndarray  # bool
    lp_hash: np.ndarray  # int64
    has_lp: np.ndarray  # bool
    disagree: int  # compared rows whose compared record disagrees with the text or the token count


def _prompt_max_tokens(manifest: RunManifest) -> dict[str, int]:
    """prompt_id -> the max_tokens its requests asked for (the prompt's own, else the run's), where known."""
    out = {}
    for p in manifest.prompts:
        limit = p.max_tokens if p.max_tokens is not None else manifest.params.max_tokens
        if limit is not None:
            out[p.prompt_id] = limit
    return out


def ints(col: pa.Array) -> np.ndarray:
    """An integer column as int64 with -1 for null (unknown)."""
    return col.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)


def bools(col: pa.Array) -> np.ndarray:
    """A boolean column as numpy, null as False."""
    return col.fill_null(False).to_numpy(zero_copy_only=False)


def _row_hashes(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a list<float32> column: a 64-bit hash of its values' bytes, and whether the row has a list."""
    valid = bools(col.is_valid())
    if not valid.any():
        return np.zeros(len(valid), dtype=np.int64), valid
    offsets = np.asarray(col.offsets, dtype=np.int64)
    values = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    if values.null_count:
        values = values.fill_null(float("nan"))
    data = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).tobytes()
    bounds = ((offsets - offsets[0]) * 4).tolist()
    hashes = np.fromiter((hash(data[bounds[i] : bounds[i + 1]]) for i in range(len(valid))), np.int64, len(valid))
    return np.where(valid, hashes, _NO_HASH), valid


class RowChecker:
    """Checks the batches of one attempt at encoding the run as `source`; `columns` are those it needs read."""

    def __init__(self, manifest: RunManifest, source: Source, finish_recorded: bool, logprobs: bool) -> None:
        self.source = source
        self.finish_recorded = finish_recorded
        self.logprobs = logprobs and source != "text"  # text positions are characters: no per-token alignment
        limits = _prompt_max_tokens(manifest)
        self.limit_ids = pa.array(list(limits), pa.string())
        self.limit_values = np.array(list(limits.values()), dtype=np.int64)
        self.columns = ["prompt_id", "status", "finish_reason", "completion_tokens"]
        if source in ("tokens", "token_bytes", "text"):
            self.columns.append("text")
        if logprobs:
            self.columns.append("logprobs")
        self.truncated: list[np.ndarray] = []
        self.hashes: list[np.ndarray] = []
        self.has_lp: list[np.ndarray] = []
        self.disagree = 0

    def _max_tokens(self, prompt_ids: pa.Array) -> np.ndarray:
        """Per row the requested max_tokens, -1 where unknown."""
        if not len(self.limit_values):
            return np.full(len(prompt_ids), -1, dtype=np.int64)
        at = ints(pc.index_in(prompt_ids, value_set=self.limit_ids))
        return np.where(at >= 0, self.limit_values[np.maximum(at, 0)], -1)

    def check(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Record the batch's flags; the batch as the encoder must see it (truncated rows not "ok")."""
        status = batch.column("status")
        ok = bools(pc.equal(status, "ok"))
        usage = count = ints(batch.column("completion_tokens"))
        units = None if self.source == "text" else batch.column(self.source)
        if units is not None and self.source == "token_ids" and count.min(initial=0) < 0:
            count = np.where(count >= 0, count, ints(pc.list_value_length(units)))  # no usage: count the ids
        truncated = np.zeros(len(ok), dtype=bool)
        if self.finish_recorded:
            finish = batch.column("finish_reason")
            stated = bools(pc.is_in(finish, value_set=_STATED))
            limit = self._max_tokens(batch.column("prompt_id"))
            at_limit = bools(pc.equal(finish, LENGTH)) & ((limit < 0) | (count < 0) | (count >= limit))
            truncated = ok & ~(stated | at_limit)
        self.truncated.append(truncated)
        compared = ok & ~truncated
        if units is not None:
            self.disagree += int((compared & self._unfaithful(batch, units, usage)).sum())
        if self.logprobs:
            hashes, has = _row_hashes(batch.column("logprobs"))
            self.hashes.append(hashes)
            self.has_lp.append(has)
        if not truncated.any():
            return batch
        marked = pc.if_else(pa.array(truncated), TRUNCATED_STATUS, status)
        return batch.set_column(batch.schema.get_field_index("status"), "status", marked)

    def _unfaithful(self, batch: pa.RecordBatch, units: pa.Array, usage: np.ndarray) -> np.ndarray:
        """Rows whose record disagrees with usage.completion_tokens, or (strings, bytes) with the text."""
        length = ints(pc.list_value_length(units))
        bad = (usage >= 0) & (length >= 0) & (length != usage)
        if self.source in ("tokens", "token_bytes"):
            text = batch.column("text")
            joined = pc.binary_join(units, b"" if self.source == "token_bytes" else "")
            if self.source == "token_bytes":
                text = text.cast(pa.binary())
            bad |= bools(pc.not_equal(joined, text))  # null (no text, or a missing piece) is not a disagreement
        return bad

    def finish(self, rows: int) -> RowFlags:
        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(rows, dtype=dtype)

        has = cat(self.has_lp, bool)
        return RowFlags(cat(self.truncated, bool), cat(self.hashes, np.int64), has, self.disagree)
