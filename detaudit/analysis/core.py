"""Vectorised kernels of the analysis: group identical completions, order them, measure common prefixes, find forks.

Data layout: the distinct completions live in one flat buffer of 4-byte units (token ids, codes of token
strings/bytes, or code points), each completion a contiguous slice, stored big-endian with the sign bit
flipped so that comparing the bytes compares the integers. Rows are read a small batch at a time; Arrow's hash
kernel groups a batch's rows (each row's units viewed as one binary value, zero copy), and only the batch's
distinct completions are looked up in the run-wide table (by hash, then compared exactly) and appended to the
buffer when new. So memory is the distinct completions plus one batch, whatever the number of samples.

The distinct completions are then sorted as byte strings (Arrow, over a zero-copy view of the buffer), and the
fork tree of the prefix trie is read off the longest common prefixes of sorted neighbours (the lcp-interval
tree); the lcp of any two completions is the minimum of the neighbour lcps between them. A Python loop runs
once per distinct completion of a batch at most, never per token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.lib.stride_tricks import sliding_window_view

from detaudit.analysis.units import Source

# Widest block of units compared per step in lcp_pairs; the buffer keeps this many spare units at its end so a
# block that starts inside the last completion never reads past it.
_LCP_MAX_WIDTH = 256
# Units compared per numpy pass in lcp_pairs: bounds its transient arrays (~10 bytes per unit).
_LCP_CHUNK = 1 << 20
_SIGN = np.uint32(1 << 31)
_UNIT = 4  # bytes per unit


@dataclass
class Sequences:
    """Every ok row mapped to one distinct completion, and the distinct completions as integer sequences.

    `values[starts[u] : starts[u] + lens[u]]` is distinct completion u, as big-endian unsigned integers with the
    sign bit flipped (bytewise order = integer order): token ids, codes of distinct token strings/bytes
    (numbered in their sorted order), or Unicode code points for text. `rank[u]` is u's place in lexicographic
    order (a shorter prefix first), which breaks ties between equally frequent completions.
    """

    source: Source
    row_seq: np.ndarray  # per table row: distinct-completion index, -1 for rows that are not ok
    values: np.ndarray  # dtype >u4, with _LCP_MAX_WIDTH spare units at the end
    starts: np.ndarray
    lens: np.ndarray
    rank: np.ndarray
    rep_row: np.ndarray  # per distinct completion: the first table row holding it
    texts: list[str] = field(default_factory=list)  # text source only: the distinct texts

    @property
    def n_unique(self) -> int:
        return len(self.lens)

    def seq(self, u: int) -> np.ndarray:
        """Completion u as the integers it was compared as (int32)."""
        raw = self.values[self.starts[u] : self.starts[u] + self.lens[u]]
        return (raw ^ _SIGN).astype(np.uint32).view(np.int32)


class SourceMissing(Exception):
    """An ok row lacks the column being compared: the caller retries with the next source in units.SOURCES."""


def _to_sortable(buf: np.ndarray, step: int = 1 << 22) -> None:
    """Native int32 units to big-endian with the sign bit flipped, in place (a chunk at a time: no copy)."""
    for lo in range(0, len(buf), step):
        part = buf[lo : lo + step]
        part ^= _SIGN
        part.byteswap(inplace=True)


def _binary_view(values: np.ndarray, offsets: np.ndarray, validity: pa.Buffer | None = None) -> pa.Array:
    """Each slice values[offsets[i]:offsets[i+1]] as one large_binary value, without copying the values."""
    byte_offsets = offsets.astype(np.int64) * values.dtype.itemsize
    data = pa.py_buffer(values)
    return pa.Array.from_buffers(pa.large_binary(), len(offsets) - 1, [validity, pa.py_buffer(byte_offsets), data])


def _ok_mask(batch: pa.RecordBatch) -> pa.Array:
    """Whether each row is ok, as a boolean array without nulls."""
    ok = pc.equal(batch.column("status"), "ok")
    return ok.fill_null(False) if ok.null_count else ok


def _child_slice(col: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Offsets rebased to 0 and exactly the child values this (possibly sliced) list array covers."""
    offsets = np.asarray(col.offsets, dtype=np.int64)
    values = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    return offsets - offsets[0], values


class _Encoder:
    """Accumulates distinct completions batch by batch into one flat buffer (see the module docstring).

    `capacity`, an upper bound on the units of all rows, sizes the buffer once: its pages are only touched as
    completions are written, so an over-estimate costs address space, not memory. Without it the buffer grows.
    """

    def __init__(self, source: Source, capacity: int | None = None) -> None:
        self.source = source
        self.buf = np.empty((capacity or 1 << 16) + _LCP_MAX_WIDTH, dtype=np.int32)
        self.used = 0  # units written
        self.starts: list[int] = []
        self.lens: list[int] = []
        self.by_hash: dict[int, int | list[int]] = {}  # hash of a completion's bytes -> its index (list: collision)
        self.by_text: dict[str, int] = {}  # text source: the distinct texts
        self.texts: list[str] = []
        self.row_seq: list[np.ndarray] = []
        self.vocab: pa.Array | None = None  # token strings/bytes sources: distinct tokens, first appearance

    def _codes(self, values: pa.Array) -> np.ndarray:
        """Token strings/bytes as integer codes, stable across batches (order of first appearance)."""
        distinct = pc.unique(values.drop_null())
        if self.vocab is None:
            self.vocab = distinct
        else:
            fresh = distinct.filter(pc.invert(pc.is_in(distinct, value_set=self.vocab)))
            if len(fresh):
                self.vocab = pa.concat_arrays([self.vocab, fresh])
        return pc.index_in(values, value_set=self.vocab).fill_null(-1).to_numpy(zero_copy_only=False)

    def _units(self, batch: pa.RecordBatch, ok: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Offsets and native int32 units of the batch's compared column; raises SourceMissing for a gap."""
        col = batch.column(self.source)
        if col.null_count and pc.any(pc.and_(pc.is_null(col), ok)).as_py():
            raise SourceMissing(self.source)
        offsets, values = _child_slice(col)
        if self.source == "token_ids":
            values = values.fill_null(-1) if values.null_count else values
            return offsets, values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        if self.source == "token_bytes" and values.null_count and pc.list_flatten(col.filter(ok)).null_count:
            raise SourceMissing(self.source)
        return offsets, self._codes(values).astype(np.int32)

    def _append(self, units: np.ndarray, lens: np.ndarray) -> None:
        """Store new distinct completions: `units` holds them one after another, `lens` their lengths."""
        n = len(units)
        if self.used + n + _LCP_MAX_WIDTH > len(self.buf):  # no (or a too small) capacity given: grow
            grown = np.empty(max(2 * len(self.buf), self.used + n + _LCP_MAX_WIDTH), dtype=np.int32)
            grown[: self.used] = self.buf[: self.used]
            self.buf = grown
        self.buf[self.used : self.used + n] = units
        self.starts.extend((self.used + np.cumsum(lens) - lens).tolist())
        self.lens.extend(lens.tolist())
        self.used += n

    def _global(self, d: pa.Array) -> np.ndarray:
        """Run-wide indices of a batch's distinct completions (a large_binary array of their native units),
        appending the new ones. Exact: a hash match is confirmed by comparing the units."""
        if not len(d):
            return np.zeros(0, dtype=np.int64)
        offsets = np.frombuffer(d.buffers()[1], dtype=np.int64)[d.offset : d.offset + len(d) + 1]
        bounds = offsets.tolist()
        view = memoryview(d.buffers()[2] or b"").cast("B")
        known = len(self.lens)
        fresh: list[int] = []  # entries of d that are new, in order: they become known, known + 1, ...
        out = []
        by_hash = self.by_hash
        for j in range(len(d)):
            data = bytes(view[bounds[j] : bounds[j + 1]])
            h = hash(data)
            hit = by_hash.get(h)
            if hit is not None:  # most likely the same completion: confirm, else it is a collision
                candidates = [hit] if isinstance(hit, int) else hit
                u = next((c for c in candidates if self._units_of(c, known, fresh, bounds, view) == data), None)
                if u is not None:
                    out.append(u)
                    continue
            u = known + len(fresh)
            fresh.append(j)
            by_hash[h] = u if hit is None else [*candidates, u]
            out.append(u)
        if fresh:
            taken = d.take(pa.array(fresh, pa.int64())) if len(fresh) < len(d) else d
            offs = np.frombuffer(taken.buffers()[1], dtype=np.int64)[taken.offset : taken.offset + len(taken) + 1]
            units = np.frombuffer(taken.buffers()[2] or b"", dtype=np.int32)[offs[0] // _UNIT : offs[-1] // _UNIT]
            self._append(units, np.diff(offs) // _UNIT)
        return np.array(out, dtype=np.int64)

    def _units_of(self, u: int, known: int, fresh: list[int], bounds: list[int], view: memoryview) -> bytes:
        """The native units of distinct completion u as bytes: stored, or new in the batch being added."""
        if u < known:
            s = self.starts[u]
            return self.buf[s : s + self.lens[u]].tobytes()
        j = fresh[u - known]
        return bytes(view[bounds[j] : bounds[j + 1]])

    def add(self, batch: pa.RecordBatch) -> None:
        ok = _ok_mask(batch)
        if self.source == "text":
            keys = pc.fill_null(batch.column("text"), "")
            enc = pc.dictionary_encode(pc.if_else(ok, keys, pa.scalar(None, pa.string())))
            to_global = np.array([self._text(t) for t in enc.dictionary.to_pylist()], dtype=np.int64)
        else:
            offsets, ints = self._units(batch, ok)
            validity = ok.buffers()[1]  # a boolean array without nulls: its data is a validity bitmap
            enc = pc.dictionary_encode(_binary_view(ints, offsets, validity))  # rows not ok are null: no index
            to_global = self._global(enc.dictionary)
        local = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        self.row_seq.append(np.where(local >= 0, to_global[np.maximum(local, 0)] if len(to_global) else -1, -1))

    def _text(self, text: str) -> int:
        u = self.by_text.get(text)
        if u is None:
            u = self.by_text[text] = len(self.texts)
            self.texts.append(text)
        return u

    def finish(self) -> Sequences:
        row_seq = np.concatenate(self.row_seq) if self.row_seq else np.zeros(0, dtype=np.int64)
        self.by_hash, self.by_text, self.row_seq = {}, {}, []  # not needed past the last batch
        if self.source == "text":
            for t in self.texts:  # code points, appended in order of first appearance (= text index)
                cps = np.frombuffer(t.encode("utf-32-le"), dtype=np.int32)
                self._append(cps, np.array([len(cps)]))
        elif self.source != "token_ids" and self.vocab is not None and len(self.vocab):
            # renumber token codes in the tokens' own sorted order, so ties break by text, not by arrival
            rank = np.empty(len(self.vocab), dtype=np.int32)
            rank[pc.sort_indices(self.vocab).to_numpy()] = np.arange(len(self.vocab), dtype=np.int32)
            for lo in range(0, self.used, 1 << 22):
                part = self.buf[lo : min(self.used, lo + (1 << 22))]
                part[:] = np.where(part >= 0, rank[np.maximum(part, 0)], -1)
        buf = self.buf
        buf[self.used : self.used + _LCP_MAX_WIDTH] = 0  # spare units: read by lcp blocks, never counted
        _to_sortable(buf[: self.used])
        values = buf[: self.used + _LCP_MAX_WIDTH].view(">u4")
        starts = np.array(self.starts, dtype=np.int64)
        lens = np.array(self.lens, dtype=np.int64)
        rep_row = np.full(len(lens), -1, dtype=np.int64)
        ok_rows = np.flatnonzero(row_seq >= 0)
        first_u, first_at = np.unique(row_seq[ok_rows], return_index=True)
        rep_row[first_u] = ok_rows[first_at]
        rank = np.zeros(len(lens), dtype=np.int64)
        if len(lens):
            order = pc.sort_indices(_binary_view(values, np.append(starts, self.used))).to_numpy()
            rank[order] = np.arange(len(lens))
        return Sequences(self.source, row_seq, values, starts, lens, rank, rep_row, self.texts)


def encode_sequences(batches: Iterable[pa.RecordBatch], source: Source, capacity: int | None = None) -> Sequences:
    """Group the ok rows of `batches` (status + the source column) by completion, compared as `source`.

    `capacity`: an upper bound on the units of all rows, if known (sizes the buffer once). Raises SourceMissing
    when an ok row lacks that source.
    """
    enc = _Encoder(source, capacity)
    for batch in batches:
        enc.add(batch)
    return enc.finish()


def lcp_pairs(seqs: Sequences, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the longest common prefix of distinct completions a[i] and b[i], for every i.

    Compares blocks that double in width (up to _LCP_MAX_WIDTH) from the start of the sequences, dropping each
    pair at its first difference, so the work is about twice the common prefixes, not the whole lengths. A
    block is one row of a sliding-window view of the buffer, so gathering it is one contiguous copy.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    minlen = np.minimum(seqs.lens[a], seqs.lens[b])
    out = minlen.copy()
    active = np.flatnonzero(minlen > 0)
    sa, sb = seqs.starts[a], seqs.starts[b]
    offset, width = 0, 16
    while len(active):
        windows = sliding_window_view(seqs.values, width)
        first = np.empty(len(active), dtype=np.int64)
        step = max(1, _LCP_CHUNK // width)
        for lo in range(0, len(active), step):
            part = active[lo : lo + step]
            differ = windows[sa[part] + offset] != windows[sb[part] + offset]
            first[lo : lo + step] = np.where(differ.any(axis=1), differ.argmax(axis=1), width)
        left = minlen[active] - offset
        ended = first < np.minimum(left, width)
        out[active[ended]] = offset + first[ended]
        offset += width
        active = active[~ended & (left > width)]
        width = min(2 * width, _LCP_MAX_WIDTH)
    return out


def lcp_with(neighbour_lcp: np.ndarray, at: int) -> np.ndarray:
    """Per sorted sequence, its lcp with the one at sorted position `at` (-1 there): the minimum of the neighbour
    lcps between the two."""
    out = np.full(len(neighbour_lcp) + 1, -1, dtype=np.int64)
    out[at + 1 :] = np.minimum.accumulate(neighbour_lcp[at:])
    out[:at] = np.minimum.accumulate(neighbour_lcp[:at][::-1])[::-1]
    return out


@dataclass
class Fork:
    """A trie node with two or more children; children are (first, last) index ranges into the sorted uniques."""

    position: int
    first: int
    last: int
    children: list[tuple[int, int]]


def find_forks(neighbour_lcp: np.ndarray) -> list[Fork]:
    """Branching nodes of the trie of k sorted distinct sequences, from the k-1 neighbour lcps (lcp-interval tree).

    An interval [first, last] of sorted sequences sharing exactly `position` leading units branches wherever a
    neighbour lcp inside it equals `position`; "ended here" is the child whose first sequence has that length.
    """
    k = len(neighbour_lcp) + 1
    forks: list[Fork] = []
    stack: list[list] = [[0, 0, []]]  # [lcp, first, split points]
    h = neighbour_lcp.tolist()
    for i in range(1, k + 1):
        hi = h[i - 1] if i < k else -1
        first = i - 1
        while hi < stack[-1][0]:
            lcp, first, splits = stack.pop()
            if splits:
                bounds = [first, *splits, i]
                forks.append(Fork(lcp, first, i - 1, [(bounds[j], bounds[j + 1] - 1) for j in range(len(splits) + 1)]))
            if not stack:
                break
        if not stack:
            break
        if hi > stack[-1][0]:
            stack.append([hi, first, [i]])
        elif hi == stack[-1][0]:
            stack[-1][2].append(i)
    return forks
