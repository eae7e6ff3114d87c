"""What the arms say together: each prompt's load verdict, and agreement (TARr) across the prompts of a run."""

from __future__ import annotations

from typing import Any

import numpy as np

from detaudit.analysis.cache_evidence import cache_verdict
from detaudit.analysis.core import Sequences
from detaudit.analysis.summary_schema import (
    Agreement,
    ArmAgreement,
    ArmSummary,
    FingerprintAgreement,
    PromptCache,
    Verdict,
)

MIN_SAMPLES = 2  # fewer ok samples than this cannot show a divergence: the arm is inconclusive
# The rows of each arm of each prompt: [(prompt_id, [(arm, concurrency, rows), ...]), ...]
PromptGroups = list[tuple[str, list[tuple[str, int | None, np.ndarray]]]]


def verdict(
    arms: list[ArmSummary], pooled_unique: int, pooled_vectors: int | None = None, cache: PromptCache | None = None
) -> tuple[Verdict, str]:
    """Verdict of one prompt from its arms (docs/summary.md, "verdict"), with the reason in words.

    `pooled_vectors`: distinct logprob vectors of the prompt's modal completion over all arms (None: no logprobs);
    `cache`: cold against warm, when the run has cache arms (its verdict outranks the load verdicts).
    Truncated answers are never compared; an arm made mostly of them cannot be judged at all."""
    if not arms:
        return "inconclusive", "no samples"
    cut = [a for a in arms if 2 * a.truncated > a.ok + a.truncated]
    if cut:
        counts = ", ".join(f"{a.arm} {a.truncated} of {a.ok + a.truncated}" for a in cut)
        return "inconclusive", f"most answers ended without a stated reason (truncated: {counts}); nothing to compare"
    v, why = _token_verdict(arms, pooled_unique, pooled_vectors, cache)
    truncated = sum(a.truncated for a in arms)
    return v, why + (f" ({truncated} truncated answers not compared)" if truncated else "")


def _token_verdict(
    arms: list[ArmSummary], pooled_unique: int, pooled_vectors: int | None, cache: PromptCache | None
) -> tuple[Verdict, str]:
    thin = [a.arm for a in arms if a.ok < MIN_SAMPLES]
    if thin:
        return "inconclusive", f"fewer than {MIN_SAMPLES} ok samples in arm {', '.join(thin)}"
    by_cache = cache_verdict(cache)
    if by_cache is not None:
        return by_cache
    serial = [a for a in arms if a.concurrency == 1]
    loaded = [a for a in arms if a.concurrency != 1]
    with_errors = [a.arm for a in arms if a.errors]
    if any(a.unique > 1 for a in serial):
        return "load-independent", "the serial arm (concurrency 1) already diverges"
    diverging = [a.arm for a in loaded if a.unique > 1]
    if not diverging and pooled_unique == 1:
        if with_errors:
            return "inconclusive", f"no divergence seen, but errors in arm {', '.join(with_errors)} may hide one"
        return _numeric_verdict(serial, loaded, pooled_vectors)
    if not serial:
        return "inconclusive", "completions differ, but there is no serial arm (concurrency 1) to compare with"
    serial_errors = [a.arm for a in serial if a.errors]
    if serial_errors:
        return "inconclusive", f"errors in the serial arm {', '.join(serial_errors)} may hide a divergence there"
    if diverging:
        return "load-dependent", f"the serial arm returns one completion; arm {', '.join(diverging)} diverges"
    return "load-dependent", "each arm returns one completion, but the loaded arm's differs from the serial one"


def _numeric_verdict(
    serial: list[ArmSummary], loaded: list[ArmSummary], pooled_vectors: int | None
) -> tuple[Verdict, str]:
    """Every arm returned the same completion: its logprobs decide between deterministic and
    numerically-load-dependent (one vector in the serial arm, more than one over all arms)."""
    same = "every arm returned one completion, the same in all arms"
    if pooled_vectors is None or pooled_vectors == 1:
        return "deterministic", same + ("" if pooled_vectors is None else ", with the same logprobs")
    serial_vectors = [a.numeric.vectors for a in serial if a.numeric is not None]
    if not serial_vectors:
        return "deterministic", f"{same}; its logprobs vary ({pooled_vectors} vectors), with no serial arm to compare"
    if max(serial_vectors) > 1:
        return "deterministic", f"{same}; its logprobs vary already in the serial arm ({max(serial_vectors)} vectors)"
    spread = [a for a in loaded if a.numeric is not None and a.numeric.max_abs_delta is not None]
    detail = "".join(
        f"; arm {a.arm}: {a.numeric.vectors} vectors, max |Δ logprob| {a.numeric.max_abs_delta:.3g}, first at "
        f"position {a.numeric.first_position}"
        for a in spread
        if a.numeric is not None
    )
    return (
        "numerically-load-dependent",
        f"{same}, but its logprobs vary under load: one vector in the serial arm, {pooled_vectors} over all arms"
        + detail,
    )


def agreement(prompt_groups: PromptGroups, seqs: Sequences, fp_codes: np.ndarray, fp_names: list[Any]) -> Agreement:
    """TARr-style agreement: the share of prompts whose completions are all identical, overall, per arm, per
    system_fingerprint (when it varies). A prompt with fewer than MIN_SAMPLES ok samples is not counted."""

    def share(groups: list[np.ndarray]) -> tuple[int, int, float | None]:
        judged = [g for g in groups if (seqs.row_seq[g] >= 0).sum() >= MIN_SAMPLES]
        same = sum(1 for g in judged if len(np.unique(seqs.row_seq[g][seqs.row_seq[g] >= 0])) == 1)
        return len(judged), same, same / len(judged) if judged else None

    pooled = [np.concatenate([r for _, _, r in arms]) if arms else np.zeros(0, np.int64) for _, arms in prompt_groups]
    arm_names: dict[str, int | None] = {}
    for _, arms in prompt_groups:
        for name, conc, _ in arms:
            arm_names.setdefault(name, conc)
    by_arm = []
    for name, conc in arm_names.items():
        n, same, fraction = share([r for _, arms in prompt_groups for a, _, r in arms if a == name])
        by_arm.append(ArmAgreement(arm=name, concurrency=conc, prompts=n, all_identical=same, share=fraction))
    values = np.unique(fp_codes[seqs.row_seq >= 0])
    by_fingerprint = None
    if len(values) > 1:
        by_fingerprint = []
        for v in values:
            n, same, fraction = share([g[fp_codes[g] == v] for g in pooled])
            value = fp_names[v] if v >= 0 else None
            by_fingerprint.append(
                FingerprintAgreement(system_fingerprint=value, prompts=n, all_identical=same, share=fraction)
            )
    n, same, fraction = share(pooled)
    return Agreement(
        prompts=n,
        all_identical=same,
        share=fraction,
        by_arm=by_arm,
        by_system_fingerprint=by_fingerprint,
    )
