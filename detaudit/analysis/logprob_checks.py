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

from detaudit.analysis.row_checks import RowFlags
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


def _count(lps: Any, tops: Any, asked: int | None) -> tuple[int, int, int]:
    """(positions checked, chosen below the top-1, top-k lists longer than asked) of one row."""
    if lps is None or tops is None or len(lps) != len(tops):
        return 0, 0, 0
    checked = below = grown = 0
    for lp, top in zip(lps, tops, strict=True):
        best = max((v for v in top or () if v is not None and v == v), default=None)
        if lp is None or lp != lp or best is None:
            continue
        checked += 1
        below += best - lp > TIE
        grown += asked is not None and len(top) > asked
    return checked, below, grown


def sampling_check(
    table: pa.Table, rows_by_arm: list[tuple[str, int | None, np.ndarray]], asked: int | None
) -> SamplingCheck:
    """Chosen tokens against the reported top-1, per arm; `table` holds logprobs and top_logprobs of every row in
    `rows_by_arm` (in that order, arm after arm)."""
    lps, tops = table.column("logprobs").to_pylist(), table.column("top_logprobs").to_pylist()
    arms, at = [], 0
    for name, concurrency, rows in rows_by_arm:
        totals = np.zeros(3, dtype=np.int64)
        for i in range(at, at + len(rows)):
            totals += _count(lps[i], tops[i], asked)
        at += len(rows)
        checked, below, grown = (int(x) for x in totals)
        arms.append(
            ArmSampling(
                arm=name,
                concurrency=concurrency,
                rows=len(rows),
                positions=checked,
                below_top1=below,
                share=below / checked if checked else None,
                grown_lists=grown,
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
