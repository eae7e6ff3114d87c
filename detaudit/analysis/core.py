"""Vectorised kernels of the analysis: group identical completions, order them, measure common prefixes, find forks.

The work is done on unique completions, never on every sample token by token: each row's token list is viewed
as one opaque byte string (zero copy) and Arrow's hash kernels group identical rows; only the distinct
completions are then sorted lexicographically, and the fork tree of the prefix trie is read off the longest
common prefixes of sorted neighbours (the lcp-interval tree). A Python loop runs once per distinct completion
at most, never per token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detaudit.analysis.units import Source

# Elements compared per numpy pass in lcp_pairs: bounds its transient arrays (~30 bytes per element).
_LCP_CHUNK = 1 << 21


@dataclass
class Sequences:
    """Every ok row mapped to one distinct completion, and the distinct completions as integer sequences.

    `values[starts[u] : starts[u] + lens[u]]` is distinct completion u: token ids, codes of distinct token
    strings/bytes (numbered in their sorted order), or Unicode code points for text. `rank[u]` is u's place in
    lexicographic order (a shorter prefix first), which breaks ties between equally frequent completions.
    """

    source: Source
    row_seq: np.ndarray  # per table row: distinct-completion index, -1 for rows that are not ok
    values: np.ndarray
    starts: np.ndarray
    lens: np.ndarray
    rank: np.ndarray
    rep_row: np.ndarray  # per distinct completion: the first table row holding it
    texts: list[str] = field(default_factory=list)  # text source only: the distinct texts

    @property
    def n_unique(self) -> int:
        return len(self.lens)

    def seq(self, u: int) -> np.ndarray:
        return self.values[self.starts[u] : self.starts[u] + self.lens[u]]


class SourceMissing(Exception):
    """An ok row lacks the column being compared: the caller retries with the next source in units.SOURCES."""


def _as_binary_view(offsets: np.ndarray, values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """Each list row's integer values as one large_binary value, without copying the values; null where not ok."""
    byte_offsets = offsets.astype(np.int64) * values.dtype.itemsize
    validity = pa.array(ok, pa.bool_()).buffers()[1]  # a boolean array's data is a validity bitmap
    buffers = [validity, pa.py_buffer(byte_offsets), pa.py_buffer(np.ascontiguousarray(values))]
    return pa.Array.from_buffers(pa.large_binary(), len(offsets) - 1, buffers)


def _lex_rank(values: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Lexicographic rank of contiguous sequences: big-endian unsigned bytes sort bytewise as the integers do."""
    if len(lens) == 0:
        return np.zeros(0, dtype=np.int64)
    # flip the sign bit (signed order becomes unsigned order, so -1 "unknown" sorts first), then big-endian
    be = (values.astype(np.int32, copy=False).view(np.uint32) ^ np.uint32(1 << 31)).astype(">u4")
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64) * 4
    binary = pa.Array.from_buffers(pa.large_binary(), len(lens), [None, pa.py_buffer(offsets), pa.py_buffer(be)])
    order = pc.sort_indices(binary).to_numpy()
    rank = np.empty(len(lens), dtype=np.int64)
    rank[order] = np.arange(len(lens))
    return rank


def _gather_index(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Positions of sequence 0's elements, then sequence 1's, ...: a vectorised concatenation of ranges."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg = np.repeat(np.arange(len(lens)), lens)
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.repeat(starts, lens) + (np.arange(total) - first[seg])


def _ok_mask(batch: pa.RecordBatch) -> np.ndarray:
    ok = pc.equal(batch.column("status"), "ok").fill_null(False)
    return np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)


def _child_slice(col: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Offsets rebased to 0 and exactly the child values this (possibly sliced) list array covers."""
    offsets = np.asarray(col.offsets, dtype=np.int64)
    values = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    return offsets - offsets[0], values


class _Encoder:
    """Accumulates distinct completions batch by batch, so a run never has to be in memory at once.

    Each row's completion becomes one opaque key (its text, or its integer sequence viewed as bytes); Arrow's
    hash kernels find the distinct keys of each batch, which are kept; one more hash pass over those (not over
    the rows) merges them when the run has been read.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.distinct: list[pa.Array] = []  # per batch: its distinct keys
        self.local: list[np.ndarray] = []  # per batch: each row's index into its batch's distinct keys, -1 if not ok
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

    def _keys(self, batch: pa.RecordBatch, ok: np.ndarray) -> pa.Array:
        col = batch.column(self.source)
        if self.source == "text":
            return pc.if_else(pa.array(ok), pc.fill_null(col, ""), pa.scalar(None, pa.string()))
        if pc.any(pc.and_(pc.is_null(col), pa.array(ok))).as_py():
            raise SourceMissing(self.source)
        offsets, values = _child_slice(col)
        if self.source == "token_ids":
            ints = values.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        else:
            if (
                self.source == "token_bytes"
                and values.null_count
                and pc.list_flatten(col.filter(pa.array(ok))).null_count
            ):
                raise SourceMissing(self.source)
            ints = self._codes(values).astype(np.int32)
        return _as_binary_view(offsets, ints, ok)

    def add(self, batch: pa.RecordBatch) -> None:
        ok = _ok_mask(batch)
        enc = pc.dictionary_encode(self._keys(batch, ok))  # rows that are not ok are null: no index
        self.distinct.append(enc.dictionary)
        self.local.append(enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64))

    def _merge(self) -> tuple[pa.Array, np.ndarray]:
        """All distinct keys of the run, and each row's index among them (-1 for rows that are not ok)."""
        key_type = pa.string() if self.source == "text" else pa.large_binary()
        rows = sum(len(loc) for loc in self.local)
        if not any(len(d) for d in self.distinct):  # no ok row at all
            return pa.array([], key_type), np.full(rows, -1, dtype=np.int64)
        merged = pc.dictionary_encode(pa.chunked_array(self.distinct, type=key_type))
        known = merged.chunk(merged.num_chunks - 1).dictionary  # one dictionary, shared by every chunk
        to_global = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in merged.chunks]).astype(np.int64)
        sizes = np.array([len(d) for d in self.distinct], dtype=np.int64)
        base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        row_seq = np.full(rows, -1, dtype=np.int64)
        at = 0
        for loc, off in zip(self.local, base, strict=True):
            ok = loc >= 0  # a batch of failed requests only has no keys at all
            row_seq[at : at + len(loc)][ok] = to_global[loc[ok] + off]
            at += len(loc)
        return known, row_seq

    def finish(self) -> Sequences:
        known, row_seq = self._merge()
        self.distinct, self.local = [], []
        rep_row = np.full(len(known), -1, dtype=np.int64)
        ok_rows = np.flatnonzero(row_seq >= 0)
        first_u, first_at = np.unique(row_seq[ok_rows], return_index=True)
        rep_row[first_u] = ok_rows[first_at]
        texts: list[str] = []
        if self.source == "text":
            texts = known.to_pylist()
            parts = [np.frombuffer(t.encode("utf-32-le"), dtype="<u4").astype(np.int32) for t in texts]
            lens = np.array([len(p) for p in parts], dtype=np.int64)
            values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        elif len(known):
            byte_offsets = np.frombuffer(known.buffers()[1], dtype=np.int64)[
                known.offset : known.offset + len(known) + 1
            ]
            data = np.frombuffer(known.buffers()[2], dtype=np.int32)
            values = data[byte_offsets[0] // 4 : byte_offsets[-1] // 4]
            lens = np.diff(byte_offsets) // 4
            if self.source != "token_ids" and self.vocab is not None and len(self.vocab):
                # renumber token codes in the tokens' own sorted order, so ties break by text, not by arrival
                rank = np.empty(len(self.vocab), dtype=np.int32)
                rank[pc.sort_indices(self.vocab).to_numpy()] = np.arange(len(self.vocab), dtype=np.int32)
                values = np.where(values >= 0, rank[np.maximum(values, 0)], -1).astype(np.int32)
        else:
            values, lens = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        lens = lens.astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(lens) else lens
        return Sequences(self.source, row_seq, values, starts, lens, _lex_rank(values, lens), rep_row, texts)


def encode_sequences(batches: Iterable[pa.RecordBatch], source: Source) -> Sequences:
    """Group the ok rows of `batches` (status + the source column) by completion, compared as `source`.

    Raises SourceMissing when an ok row lacks that source.
    """
    enc = _Encoder(source)
    for batch in batches:
        enc.add(batch)
    return enc.finish()


def _first_mismatch(seqs: Sequences, a: np.ndarray, b: np.ndarray, offset: int, width: np.ndarray) -> np.ndarray:
    """Per pair, the first i < width[k] where a and b differ at offset + i, else width[k] (all widths > 0)."""
    cols = np.arange(int(width.max()))
    inside = cols[None, :] < width[:, None]
    last = len(seqs.values) - 1  # cells past a pair's width are masked; clip them to stay in bounds
    ia = np.minimum(seqs.starts[a][:, None] + offset + cols, last)
    ib = np.minimum(seqs.starts[b][:, None] + offset + cols, last)
    differ = (seqs.values[ia] != seqs.values[ib]) & inside
    return np.where(differ.any(axis=1), differ.argmax(axis=1), width)


def lcp_pairs(seqs: Sequences, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the longest common prefix of distinct completions a[i] and b[i], for every i.

    Compares in blocks that double in width from the start of the sequences, dropping each pair at its first
    difference, so the work is about twice the common prefixes (not the whole lengths) and memory stays bounded.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    minlen = np.minimum(seqs.lens[a], seqs.lens[b])
    out = minlen.copy()
    active = np.flatnonzero(minlen > 0)
    offset, width = 0, 32
    while len(active):
        w = np.minimum(minlen[active] - offset, width)
        first = np.empty(len(active), dtype=np.int64)
        # bound the transient arrays: about _LCP_CHUNK compared elements per numpy pass
        step = max(1, _LCP_CHUNK // width)
        for lo in range(0, len(active), step):
            hi = lo + step
            first[lo:hi] = _first_mismatch(seqs, a[active[lo:hi]], b[active[lo:hi]], offset, w[lo:hi])
        ended = first < w
        out[active[ended]] = offset + first[ended]
        offset += width
        keep = ~ended & (minlen[active] > offset)
        active = active[keep]
        width *= 2
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
