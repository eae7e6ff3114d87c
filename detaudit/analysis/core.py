"""Vectorised kernels of the analysis: group identical completions, order them, measure common prefixes, find forks.

The work is done on unique completions, never on every sample token by token: each row's token list is viewed
as one opaque byte string (zero copy) and Arrow's hash kernels group identical rows; only the distinct
completions are then sorted lexicographically, and the fork tree of the prefix trie is read off the longest
common prefixes of sorted neighbours (the lcp-interval tree). A Python loop runs once per distinct completion
at most, never per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detaudit.analysis.units import Source

# Pairs of sequences compared per numpy pass in lcp_pairs: bounds the transient memory (~40 bytes/element).
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


def _list_chunks(col: pa.ChunkedArray) -> list[pa.Array]:
    return [c for c in col.chunks if len(c)]


def _as_binary_view(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """Each list row's integer values as one large_binary value, without copying the values.

    Null lists need no validity here: they only occur on rows that are not ok, which are masked out anyway.
    """
    byte_offsets = offsets.astype(np.int64) * values.dtype.itemsize
    buffers = [None, pa.py_buffer(byte_offsets), pa.py_buffer(np.ascontiguousarray(values))]
    return pa.Array.from_buffers(pa.large_binary(), len(offsets) - 1, buffers)


def _int_views(col: pa.ChunkedArray, source: Source) -> tuple[list[pa.Array], np.dtype]:
    """Binary views of a list column, one per chunk, with token strings/bytes first mapped to sorted codes."""
    chunks = _list_chunks(col)
    views: list[pa.Array] = []
    if source == "token_ids":
        for c in chunks:
            vals = c.values.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            views.append(_as_binary_view(np.asarray(c.offsets), vals))
        return views, np.dtype(np.int32)
    # token strings / bytes: number the distinct tokens in sorted order, so codes order like the tokens do
    vocab = pc.unique(pa.chunked_array([c.values for c in chunks], type=col.type.value_type))
    vocab = vocab.take(pc.sort_indices(vocab))
    for c in chunks:
        codes = pc.index_in(c.values, value_set=vocab).fill_null(-1).to_numpy(zero_copy_only=False)
        views.append(_as_binary_view(np.asarray(c.offsets), codes.astype(np.int32)))
    return views, np.dtype(np.int32)


def _group(keys: pa.ChunkedArray, ok: np.ndarray) -> tuple[np.ndarray, pa.Array]:
    """Per row the index of its key among the distinct keys of ok rows (-1 elsewhere), and those keys."""
    ok_keys = keys.filter(pa.array(ok))
    uniq = pc.unique(ok_keys.combine_chunks() if ok_keys.num_chunks != 1 else ok_keys.chunk(0))
    idx = pc.index_in(keys, value_set=uniq).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    idx[~ok] = -1
    return idx, uniq


def _lex_rank(values: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Lexicographic rank of contiguous sequences: big-endian unsigned bytes sort bytewise as the integers do."""
    if len(lens) == 0:
        return np.zeros(0, dtype=np.int64)
    be = (values.astype(np.int64) + (1 << 31)).astype(">u4")  # shift so -1 (unknown) sorts first
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


def encode_sequences(table: pa.Table, source: Source) -> Sequences:
    """Group the ok rows of `table` by completion, compared as `source`."""
    ok = pc.equal(table.column("status"), "ok").fill_null(False).to_numpy(zero_copy_only=False)
    ok = np.asarray(ok, dtype=bool)
    if source == "text":
        text = pc.fill_null(table.column("text"), "")
        row_seq, uniq = _group(text, ok)
        texts = uniq.to_pylist()
        parts = [np.frombuffer(t.encode("utf-32-le"), dtype="<u4").astype(np.int32) for t in texts]
        lens = np.array([len(p) for p in parts], dtype=np.int64)
        values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    else:
        views, dtype = _int_views(table.column(source), source)
        row_seq, uniq = _group(pa.chunked_array(views, type=pa.large_binary()), ok)
        texts = []
        if len(uniq):
            byte_offsets = np.frombuffer(uniq.buffers()[1], dtype=np.int64)[uniq.offset : uniq.offset + len(uniq) + 1]
            data = np.frombuffer(uniq.buffers()[2], dtype=dtype)
            base = byte_offsets[0] // dtype.itemsize
            values = data[base : byte_offsets[-1] // dtype.itemsize]
            lens = np.diff(byte_offsets) // dtype.itemsize
        else:
            values, lens = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    lens = lens.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(lens) else lens
    rep_row = np.full(len(lens), -1, dtype=np.int64)
    ok_rows = np.flatnonzero(row_seq >= 0)
    first_u, first_at = np.unique(row_seq[ok_rows], return_index=True)
    rep_row[first_u] = ok_rows[first_at]
    return Sequences(source, row_seq, values, starts, lens, _lex_rank(values, lens), rep_row, texts)


def lcp_pairs(seqs: Sequences, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the longest common prefix of distinct completions a[i] and b[i], for every i."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    minlen = np.minimum(seqs.lens[a], seqs.lens[b])
    out = minlen.copy()
    i = 0
    n = len(a)
    while i < n:
        # take pairs until the chunk holds _LCP_CHUNK elements (always at least one pair)
        csum = np.cumsum(minlen[i:])
        j = i + max(1, int(np.searchsorted(csum, _LCP_CHUNK, side="right")))
        ml = minlen[i:j]
        if ml.sum():
            ai = _gather_index(seqs.starts[a[i:j]], ml)
            bi = _gather_index(seqs.starts[b[i:j]], ml)
            diff = np.flatnonzero(seqs.values[ai] != seqs.values[bi])
            if len(diff):
                seg_ends = np.cumsum(ml)
                seg = np.searchsorted(seg_ends, diff, side="right")
                first_seg, first_at = np.unique(seg, return_index=True)
                seg_starts = seg_ends - ml
                out[i + first_seg] = diff[first_at] - seg_starts[first_seg]
        i = j
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
