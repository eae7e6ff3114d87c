"""One arm of one prompt: its distinct completions, first divergences, forks and statistics.

`plan_arm` does the numbers for the arm's rows and names the completions whose text the block will show;
`ArmPlan.build` writes the block once the decoder has read those completions (one pass over the display columns
for the whole run, not one per arm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from detaudit.analysis.core import Sequences, lcp_pairs, lcp_with
from detaudit.analysis.decode import Decoder, clip_text
from detaudit.analysis.forks import PlannedFork, fork_list, plan_forks
from detaudit.analysis.logprob_checks import NumericPlan, plan_numeric
from detaudit.analysis.row_checks import RowFlags
from detaudit.analysis.stats import arm_stats
from detaudit.analysis.summary_schema import ArmSummary, Completion, Context, FingerprintSplit, FirstDivergence, Limits

CONTEXT_UNITS = 6  # units each side of a completion's first divergence kept for the report's aligned view


@dataclass
class GroupResult:
    """One set of samples analysed together (a prompt's arms pooled), kept for compare."""

    n_ok: int
    uniq: np.ndarray  # distinct completions, most frequent first (ties: lexicographic order)
    counts: np.ndarray
    first_fork: int | None


def order_uniques(seqs: Sequences, row_seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct completions of these rows and their counts, most frequent first, ties in lexicographic order."""
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


def _context(dec: Decoder, seqs: Sequences, modal: int, u: int, fork: int) -> Context:
    """Units of completion u and of the modal one around u's first divergence (CONTEXT_UNITS each side)."""
    start = max(0, fork - CONTEXT_UNITS)
    stop = fork + CONTEXT_UNITS
    return Context(
        start=start,
        tokens=[dec.token(u, p) for p in range(start, min(int(seqs.lens[u]), stop))],
        modal=[dec.token(modal, p) for p in range(start, min(int(seqs.lens[modal]), stop))],
    )


def _first_divergence(fd: np.ndarray, counts: np.ndarray) -> FirstDivergence:
    """min / median / histogram of first-divergence positions over the samples that differ from the modal one."""
    if len(fd) < 2:
        return FirstDivergence(min=None, median=None, histogram={}, samples=0)
    pos, w = fd[1:], counts[1:]
    per_sample = np.repeat(pos, w)
    values, tally = np.unique(per_sample, return_counts=True)
    median = float(np.median(per_sample))
    return FirstDivergence(
        min=int(values[0]),
        median=int(median) if median.is_integer() else median,
        histogram={str(int(v)): int(t) for v, t in zip(values, tally, strict=True)},
        samples=int(w.sum()),
    )


def _by_fingerprint(
    seqs: Sequences, ok_rows: np.ndarray, fp_codes: np.ndarray, fp_names: list[Any]
) -> list[FingerprintSplit] | None:
    """Per system_fingerprint value: samples, distinct completions, modal share. None unless it varies."""
    codes = fp_codes[ok_rows]
    present = np.unique(codes)
    if len(present) < 2:
        return None
    out = []
    for code in present:
        row_seq = seqs.row_seq[ok_rows[codes == code]]
        uniq, counts = order_uniques(seqs, row_seq)
        out.append(
            FingerprintSplit(
                system_fingerprint=fp_names[code] if code >= 0 else None,
                n=len(row_seq),
                unique=len(uniq),
                modal_share=int(counts[0]) / len(row_seq),
            )
        )
    return out


@dataclass
class ArmPlan:
    """The numbers of one arm, ready before any display column is read; `needed` are the completions it shows."""

    seqs: Sequences
    n: int  # rows, ok or not
    uniq: np.ndarray  # distinct completions of the ok rows, most frequent first
    counts: np.ndarray
    fd: np.ndarray  # first divergence of each (in uniq order) from the modal one
    forks: list[PlannedFork]
    forks_total: int
    sorted_counts: np.ndarray  # counts in lexicographic order of the completions, as the fork plan indexes them
    fingerprints: list[FingerprintSplit] | None
    limits: Limits
    needed: set[int]
    truncated: int = 0  # ok rows not compared: their answers ended without a stated reason
    numeric: NumericPlan | None = None

    @property
    def n_ok(self) -> int:
        return int(self.counts.sum())

    @property
    def earliest_fork(self) -> int | None:
        return self.forks[0].node.position if self.forks else None

    def build(
        self, dec: Decoder, arm: str, concurrency: int | None, expected: int | None, vectors: dict[int, np.ndarray]
    ) -> ArmSummary:
        """The arm's block of the summary (docs/summary.md, `prompts[].arms[]`); `vectors`: the logprobs of the
        rows its numeric plan asked for."""
        n_ok = self.n_ok
        shown = [int(u) for u in self.uniq[: self.limits.completions]]
        completions = []
        for i, u in enumerate(shown):
            text = dec.completion_text(u)
            completions.append(
                Completion(
                    count=int(self.counts[i]),
                    share=int(self.counts[i]) / n_ok,
                    first_divergence=None if i == 0 else int(self.fd[i]),
                    length=int(self.seqs.lens[u]),
                    text=clip_text(text),
                    text_chars=len(text),
                    context=None if i == 0 else _context(dec, self.seqs, shown[0], u, int(self.fd[i])),
                )
            )
        return ArmSummary(
            arm=arm,
            concurrency=concurrency,
            expected=expected,
            n=self.n,
            ok=n_ok,
            errors=self.n - n_ok - self.truncated,
            truncated=self.truncated,
            unique=len(self.uniq),
            completions=completions,
            first_divergence=_first_divergence(self.fd, self.counts),
            forks=fork_list(self.forks, self.sorted_counts, dec, self.limits),
            forks_total=self.forks_total,
            earliest_fork=self.earliest_fork,
            stats=arm_stats(n_ok, int(self.counts[0]) if n_ok else 0, len(self.uniq)),
            system_fingerprints=self.fingerprints,
            numeric=None if self.numeric is None else self.numeric.spread(vectors),
        )


def plan_arm(
    seqs: Sequences, flags: RowFlags, rows: np.ndarray, fp_codes: np.ndarray, fp_names: list[Any], limits: Limits
) -> ArmPlan:
    """The arm made of rows `rows`: its numbers now, its text later (ArmPlan.build)."""
    row_seq = seqs.row_seq[rows]
    ok_rows = rows[row_seq >= 0]
    row_seq = row_seq[row_seq >= 0]
    truncated = int(flags.truncated[rows].sum())
    if not len(row_seq):
        empty = np.zeros(0, np.int64)
        return ArmPlan(seqs, len(rows), empty, empty, empty, [], 0, empty, None, limits, set(), truncated)
    uniq, counts = order_uniques(seqs, row_seq)
    srt, inv, neighbour_lcp = _sorted(seqs, uniq)
    sorted_counts = counts[srt]
    # first divergence: lcp with the modal completion (uniq[0]); -1 for the modal one itself, never shown
    fd = lcp_with(neighbour_lcp, int(inv[0]))[inv]
    forks, forks_total, needed = plan_forks(seqs, uniq[srt], sorted_counts, neighbour_lcp, limits)
    needed.update(int(u) for u in uniq[: limits.completions])
    fingerprints = _by_fingerprint(seqs, ok_rows, fp_codes, fp_names)
    numeric = plan_numeric(flags, ok_rows[row_seq == uniq[0]])
    return ArmPlan(
        seqs,
        len(rows),
        uniq,
        counts,
        fd,
        forks,
        forks_total,
        sorted_counts,
        fingerprints,
        limits,
        needed,
        truncated,
        numeric,
    )
