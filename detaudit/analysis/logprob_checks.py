"""What the logprobs say beside the tokens: numeric divergence among identical completions, and whether
"temperature 0" was greedy (docs/summary.md, "Logprobs").

Both read logprobs for a bounded number of rows only: the run-wide pass keeps just a hash of each row's vector
(row_checks); the vectors themselves are read for one row per distinct vector (at most VECTORS_READ per arm),
and the greedy check reads the first GREEDY_ROWS compared rows of each arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detaudit.analysis.row_checks import RowFlags, bools
from detaudit.analysis.summary_schema import ArmSampling, NumericSpread, SamplingCheck

VECTORS_READ = 64  # distinct logprob vectors read per arm to measure their spread
GREEDY_ROWS = 256  # compared rows per arm whose chosen tokens are checked against the top-1
TIE = 1e-4  # a chosen logprob this close below the top-1 is a float tie, not another choice
# Request fields that make a server's temperature 0 greedy when a penalty or filter moved its choice.
GREEDY_PARAMS = ("repeat_penalty=1", "presence_penalty=0", "frequency_penalty=0", "top_k=1")
_PENALTIES = ("repeat_penalty", "presence_penalty", "frequency_penalty", "top_k", "min_p", "typical_p")


def _sig(x: float) -> float:
    return float(f"{x:.6g}")  # float32 noise off


@dataclass
class NumericPlan:
    """The logprob vectors of one arm's modal completion: how many distinct, and the rows to read to measure them."""

    rows: int
    vectors: int
    read: np.ndarray  # one row per distinct vector, at most VECTORS_READ, in row order

    def spread(self, vectors: dict[int, np.ndarray]) -> NumericSpread:
        """The arm's block, once the rows in `read` were read (`vectors`: row -> its logprobs)."""
        delta = max_at = first = None
        if len(self.read) > 1:
            vs = [vectors[int(r)] for r in self.read]
            common = min(len(v) for v in vs)
            stack = np.stack([v[:common] for v in vs]).astype(np.float64)
            spread = np.nan_to_num(stack.max(axis=0) - stack.min(axis=0), nan=0.0)
            differ = np.flatnonzero(spread > 0)
            if len(differ):
                first, max_at = int(differ[0]), int(spread.argmax())
                delta = _sig(float(spread[max_at]))
            elif any(len(v) != common for v in vs):
                first = common
        return NumericSpread(
            rows=self.rows,
            vectors=self.vectors,
            vectors_compared=len(self.read),
            max_abs_delta=delta,
            max_position=max_at,
            first_position=first,
        )


def plan_numeric(flags: RowFlags, rows: np.ndarray) -> NumericPlan | None:
    """`rows`: the compared rows of one arm holding its modal completion. None when none carries logprobs."""
    rows = rows[flags.has_lp[rows]]
    if not len(rows):
        return None
    _, first = np.unique(flags.lp_hash[rows], return_index=True)
    read = np.sort(rows[first])[:VECTORS_READ] if len(first) > 1 else np.zeros(0, np.int64)
    return NumericPlan(len(rows), len(first), read)


def distinct_vectors(flags: RowFlags, rows: np.ndarray) -> int | None:
    """Distinct logprob vectors among these rows (those carrying logprobs); None when none does."""
    rows = rows[flags.has_lp[rows]]
    return len(np.unique(flags.lp_hash[rows])) if len(rows) else None


def read_vectors(table: pa.Table, rows: np.ndarray) -> dict[int, np.ndarray]:
    """Row -> its logprobs (float32), from `table` holding the logprobs column of `rows` in that order."""
    col = table.column("logprobs").to_pylist()
    return {int(r): np.array(v, dtype=np.float32) for r, v in zip(rows, col, strict=True)}


def _lengths(col: pa.Array) -> np.ndarray:
    return pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _floats(values: pa.Array) -> np.ndarray:
    """float values with null and NaN as -inf (never a best logprob, never a checked one)."""
    out = values.fill_null(float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)
    out[np.isnan(out)] = -np.inf
    return out


def _positions(table: pa.Table, asked: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per position of the rows whose logprobs and top-k lists line up: (its row, checked, chosen below the
    top-1, top-k list longer than asked). Vectorised over all rows at once."""
    lps = table.column("logprobs").combine_chunks()
    tops = table.column("top_logprobs").combine_chunks()
    n_lp, n_top = _lengths(lps), _lengths(tops)
    good = (n_lp == n_top) & bools(lps.is_valid()) & bools(tops.is_valid())
    lp_row = np.repeat(np.arange(len(n_lp)), n_lp)
    top_row = np.repeat(np.arange(len(n_top)), n_top)
    chosen = _floats(lps.flatten())[good[lp_row]]
    inner = tops.flatten()
    sizes = _lengths(inner)
    values = _floats(inner.flatten())
    best = np.full(len(sizes), -np.inf)
    filled = np.flatnonzero(sizes > 0)
    if len(filled):
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])[filled]
        best[filled] = np.maximum.reduceat(values, starts)
    keep = good[top_row]
    best, sizes, rows = best[keep], sizes[keep], top_row[keep]
    checked = np.isfinite(chosen) & np.isfinite(best)
    below = checked & (best - chosen > TIE)
    grown = checked & (sizes > asked) if asked is not None else np.zeros(len(rows), dtype=bool)
    return rows, checked, below, grown


def sampling_check(
    table: pa.Table, rows_by_arm: list[tuple[str, int | None, np.ndarray]], asked: int | None
) -> SamplingCheck:
    """Chosen tokens against the reported top-1, per arm; `table` holds logprobs and top_logprobs of every row in
    `rows_by_arm` (in that order, arm after arm)."""
    rows, checked, below, grown = _positions(table, asked)
    arm_of_row = np.repeat(np.arange(len(rows_by_arm)), [len(r) for _, _, r in rows_by_arm])
    arm = arm_of_row[rows]
    per_arm = [np.bincount(arm[m], minlength=len(rows_by_arm)) for m in (checked, below, grown)]
    arms = []
    for i, (name, concurrency, arm_rows) in enumerate(rows_by_arm):
        n_checked, n_below, n_grown = (int(c[i]) for c in per_arm)
        arms.append(
            ArmSampling(
                arm=name,
                concurrency=concurrency,
                rows=len(arm_rows),
                positions=n_checked,
                below_top1=n_below,
                share=n_below / n_checked if n_checked else None,
                grown_lists=n_grown,
            )
        )
    return SamplingCheck(greedy=not any(a.below_top1 for a in arms), tolerance=TIE, arms=arms)


def greedy_note(check: SamplingCheck, extra_body: dict[str, Any]) -> str | None:
    """Why the fork margins cannot be trusted when temperature 0 was not greedy, and what would make it greedy."""
    if check.greedy:
        return None
    where = ", ".join(f"{a.arm} {a.below_top1}/{a.positions}" for a in check.arms if a.below_top1)
    grown = sum(a.grown_lists for a in check.arms)
    sent = ", ".join(f"{k}={extra_body[k]!r}" for k in _PENALTIES if k in extra_body)
    return (
        f"temperature 0 was not greedy: the chosen token was below the reported top-1 at {where} checked positions"
        + (f", and {grown} top-k lists held the chosen token appended beyond those asked for" if grown else "")
        + ". Fork margins come from logprobs the sampler did not follow, so they are not comparable with a greedy "
        "server's. A repeat or presence/frequency penalty (or a top-k/min-p filter) does this; send "
        + ", ".join(GREEDY_PARAMS[:3])
        + f" (or {GREEDY_PARAMS[3]}) to make it greedy"
        + (f"; this run sent {sent}" if sent else "")
        + "."
    )
