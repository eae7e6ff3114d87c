"""Counts of a run computed by hand from its samples.parquet with pyarrow alone (never detaudit.analysis), so a
test can check what `detaudit analyze` says against an independent reading of the same rows.

The rules are docs/summary.md's, written out again: an ok answer is compared only when it ended for a stated reason
(`stop`-like, or `length` at max_tokens); completions are compared as token ids when every ok row has them, else
as text; distinct completions are counted per prompt and arm; the verdict follows the rules' first match.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

STOPPED = {"stop", "eos", "eos_token", "stop_sequence"}


@dataclass(frozen=True)
class ArmCount:
    """One arm of one prompt: compared answers, cut ones, errors, and the distinct completions among the compared."""

    concurrency: int
    ok: int
    truncated: int
    errors: int
    completions: Counter  # completion (tuple of token ids, or text) -> samples
    vectors: frozenset  # distinct logprob vectors among the answers that hold the modal completion (token ids only)

    @property
    def unique(self) -> int:
        return len(self.completions)

    @property
    def logprob_vectors(self) -> int:
        return len(self.vectors)


def _compared(row: dict, max_tokens: int) -> bool:
    if row["finish_reason"] in STOPPED:
        return True
    return row["finish_reason"] == "length" and row["completion_tokens"] in (None, max_tokens)


def count(run_dir: Path, max_tokens: int) -> dict[str, dict[str, ArmCount]]:
    """prompt_id -> arm -> its counts, from `run_dir`/samples.parquet (a finished run)."""
    cols = ["prompt_id", "arm", "concurrency", "status", "text", "token_ids", "logprobs"]
    rows = pq.read_table(run_dir / "samples.parquet", columns=[*cols, "finish_reason", "completion_tokens"])
    rows = rows.to_pylist()
    by_ids = all(r["token_ids"] is not None for r in rows if r["status"] == "ok")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["prompt_id"], r["arm"]), []).append(r)
    out: dict[str, dict[str, ArmCount]] = {}
    for (prompt, arm), group in groups.items():
        ok = [r for r in group if r["status"] == "ok" and _compared(r, max_tokens)]
        key = [tuple(r["token_ids"]) if by_ids else r["text"] for r in ok]
        completions = Counter(key)
        modal = min(completions.items(), key=lambda kv: (-kv[1], kv[0]))[0] if completions else None
        vectors = {
            tuple(r["logprobs"]) for r, k in zip(ok, key, strict=True) if k == modal and by_ids and r["logprobs"]
        }
        out.setdefault(prompt, {})[arm] = ArmCount(
            concurrency=group[0]["concurrency"],
            ok=len(ok),
            truncated=sum(r["status"] == "ok" for r in group) - len(ok),
            errors=sum(r["status"] != "ok" for r in group),
            completions=completions,
            vectors=frozenset(vectors),
        )
    return out


def verdict(arms: dict[str, ArmCount]) -> str:
    """The verdict of one prompt from its arms' counts (docs/summary.md, "Verdict rules", first match wins)."""
    if any(a.truncated * 2 > a.ok + a.truncated for a in arms.values()):
        return "inconclusive"
    if any(a.ok < 2 for a in arms.values()):
        return "inconclusive"
    serial = [a for a in arms.values() if a.concurrency == 1]
    if serial and serial[0].unique > 1:
        return "load-independent"
    pooled = set().union(*(a.completions for a in arms.values()))
    if len(pooled) == 1:
        if any(a.errors for a in arms.values()):
            return "inconclusive"
        moved = (
            serial
            and serial[0].logprob_vectors == 1
            and len(frozenset().union(*(a.vectors for a in arms.values()))) > 1
        )
        return "numerically-load-dependent" if moved else "deterministic"
    if not serial or serial[0].errors:
        return "inconclusive"
    return "load-dependent"
