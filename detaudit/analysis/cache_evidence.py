"""Cache arms (`detaudit run --cache cold,warm`): what each arm's `cached_tokens` prove about the prefix cache, and
whether a prompt answers the same cold and warm (docs/summary.md, "Cache arms").

An arm asks for a state; its answers' `usage.prompt_tokens_details.cached_tokens` say which it got. A prompt is
`cache-dependent` when its cold arms' most frequent completion is not its warm arms' one, and
`numerically-cache-dependent` when it is the same completion but no logprob vector of it in a cold arm is one of
a warm arm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from detaudit.analysis.arms import order_uniques
from detaudit.analysis.core import Sequences
from detaudit.analysis.row_checks import RowFlags, ints
from detaudit.analysis.run_reader import SampleReader
from detaudit.analysis.summary_schema import CacheEvidence, CacheEvidenceState, CacheState, PromptCache, Verdict
from detaudit.rundir.schema import RunManifest

# (arm name, the cache state it asked for, its rows) of one prompt
CacheArms = Sequence[tuple[str, CacheState | None, np.ndarray]]


def read_cached_tokens(reader: SampleReader, manifest: RunManifest) -> np.ndarray | None:
    """Each row's cached_tokens (-1: not reported), in reader order; None when the run has no cache arm (the column
    is then never read)."""
    if not any(a.cache for a in manifest.arms):
        return None
    parts = [ints(b.column(0)) for b in reader.batches(["cached_tokens"])]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def arm_evidence(asked: CacheState, cached: np.ndarray) -> CacheEvidence:
    """The evidence of one arm from the cached_tokens of its compared rows (-1: not reported)."""
    reported = cached[cached >= 0]
    hits = int((reported > 0).sum())
    state: CacheEvidenceState
    if not len(reported):
        state = "unverified"
    elif len(reported) == len(cached) and hits == 0:
        state = "cold"
    elif len(reported) == len(cached) and hits == len(cached):
        state = "warm"
    else:
        state = "mixed"
    return CacheEvidence(
        asked=asked,
        evidence=state,
        rows=len(cached),
        reporting=len(reported),
        hits=hits,
        cached_tokens_min=int(reported.min()) if len(reported) else None,
        cached_tokens_max=int(reported.max()) if len(reported) else None,
    )


def compared(seqs: Sequences, rows: np.ndarray) -> np.ndarray:
    """The rows whose completions are compared (ok and not truncated)."""
    return rows[seqs.row_seq[rows] >= 0]


def compare_cache(
    seqs: Sequences, flags: RowFlags, arms: CacheArms, evidence: Sequence[CacheEvidence], manifest: RunManifest
) -> PromptCache:
    """Cold against warm for one prompt: the evidence of its cache arms together, the modal completions, and the
    logprob vectors of a shared modal completion."""
    cold = [r for _, s, r in arms if s == "cold"]
    warm = [r for _, s, r in arms if s == "warm"]
    if any(e.evidence == "unverified" for e in evidence):
        state = "unverified"
    elif all(e.evidence == e.asked for e in evidence):
        state = "verified"
    else:
        state = "contradicted"
    method = manifest.probe.get("cache", {}).get("cold", "nonce") if cold else None
    out = PromptCache(
        cold_arms=[a for a, s, _ in arms if s == "cold"],
        warm_arms=[a for a, s, _ in arms if s == "warm"],
        evidence=cast(Any, state),
        cold_method=method,
        same_completion=None,
        cold_vectors=None,
        warm_vectors=None,
        shared_vectors=None,
    )
    cold_rows = compared(seqs, np.concatenate(cold)) if cold else np.zeros(0, np.int64)
    warm_rows = compared(seqs, np.concatenate(warm)) if warm else np.zeros(0, np.int64)
    if not len(cold_rows) or not len(warm_rows):
        return out
    cold_modal = order_uniques(seqs, seqs.row_seq[cold_rows])[0][0]
    warm_modal = order_uniques(seqs, seqs.row_seq[warm_rows])[0][0]
    out.same_completion = bool(cold_modal == warm_modal)
    if not out.same_completion:
        return out
    cold_lp = cold_rows[(seqs.row_seq[cold_rows] == cold_modal) & flags.has_lp[cold_rows]]
    warm_lp = warm_rows[(seqs.row_seq[warm_rows] == warm_modal) & flags.has_lp[warm_rows]]
    if len(cold_lp) and len(warm_lp):
        cold_v, warm_v = set(flags.lp_hash[cold_lp].tolist()), set(flags.lp_hash[warm_lp].tolist())
        out.cold_vectors, out.warm_vectors, out.shared_vectors = len(cold_v), len(warm_v), len(cold_v & warm_v)
    return out


def cache_verdict(cache: PromptCache | None) -> tuple[Verdict, str] | None:
    """The cache verdict of a prompt, which outranks the load verdicts; None when cold and warm agree (or are not
    both there), and the load rules decide."""
    if cache is None or cache.same_completion is None:
        return None
    caveats = []
    if cache.evidence != "verified":
        caveats.append(
            "the cache state is unverified: the endpoint reports no cached_tokens"
            if cache.evidence == "unverified"
            else "the cached_tokens contradict the asked cache state in some arm"
        )
    if cache.cold_method == "nonce":
        caveats.append("cold prompts began with a nonce line")
    tail = f" ({'; '.join(caveats)})" if caveats else ""
    cold, warm = ", ".join(cache.cold_arms), ", ".join(cache.warm_arms)
    if not cache.same_completion:
        return "cache-dependent", f"the cold arm ({cold}) and the warm arm ({warm}) give different completions{tail}"
    if cache.shared_vectors == 0:
        return (
            "numerically-cache-dependent",
            f"the cold arm ({cold}) and the warm arm ({warm}) give the same completion, but none of its "
            f"{cache.cold_vectors} cold logprob vectors is one of its {cache.warm_vectors} warm ones{tail}",
        )
    return None
