"""summary.json's `background` section (#18): T_bg per prompt x arm, per arm and per run, and a cause for every fork.

Planned like an arm (arms.py): `plan_background` does the numbers from the compared rows (their top-k records, start
times, fingerprints and cache state, read one prompt at a time) and names the completions whose text the section
shows; `BackgroundPlan.build` writes the section once the run's decoder holds them. The estimator and the labels
are background_temperature.py and fork_causes.py; this module feeds them a run directory's rows.

Chosen tokens and top-k candidates are matched by token id when every compared row of a prompt records both,
else by token string. A sample's cache state is what it measured (`cached_tokens` > 0: warm, 0: cold), else its
arm's (`ArmSpec.cache`), else unknown. The near-tie threshold takes the local engine's dtype, else bfloat16 (what
endpoints serve most).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from detaudit.analysis.background_schema import (
    ArmTemperature,
    BackgroundSummary,
    CauseBranch,
    ForkCauseEntry,
    ForkEvidence,
    PromptArmTemperature,
    PromptCauses,
    Temperature,
)
from detaudit.analysis.background_temperature import BackgroundTemperature, Observations, estimate, observe
from detaudit.analysis.core import Sequences, find_forks, lcp_pairs
from detaudit.analysis.decode import Decoder
from detaudit.analysis.fork_causes import (
    SIGNIFICAND_BITS,
    CauseConfig,
    ForkCause,
    ForkRows,
    Samples,
    divergence_shares,
    label_forks,
    near_tie_threshold,
)
from detaudit.analysis.run_reader import SampleReader
from detaudit.analysis.summary_schema import Limits
from detaudit.rundir.schema import RunManifest

COLUMNS = ["token_ids", "tokens", "top_token_ids", "top_tokens", "top_logprobs", "system_fingerprint", "started_at"]
ArmRows = list[tuple[str, int | None, np.ndarray]]  # (arm, concurrency, table rows) of one prompt


def temperature_of(t: BackgroundTemperature) -> Temperature:
    """The estimator's result as summary.json holds it (an unbounded end, inf, as null)."""

    def finite(x: float | None) -> float | None:
        return None if x is None or math.isinf(x) else x

    return Temperature(
        kind=t.kind,
        estimate=finite(t.estimate),
        lower=finite(t.lower),
        upper=finite(t.upper),
        trials=t.trials,
        flips=t.flips,
        positions=t.positions,
        outside_top_k=t.outside_top_k,
        unscored_ends=t.unscored_ends,
        invalid_logprobs=t.invalid_logprobs,
    )


def _records(table: pa.Table) -> tuple[list[Any], list[Any], list[Any]]:
    """Per row: chosen tokens, top-k identities and top-k logprobs, identities coded alike (module docstring)."""
    cols = {c: table.column(c).to_pylist() for c in ("token_ids", "tokens", "top_token_ids", "top_tokens")}
    lps = table.column("top_logprobs").to_pylist()
    by_id = all(t is not None and k is not None for t, k in zip(cols["token_ids"], cols["top_token_ids"], strict=True))
    if by_id:
        return cols["token_ids"], cols["top_token_ids"], lps
    codes: dict[str, int] = {}

    def code(values: list[str | None]) -> list[int]:
        return [-1 if v is None else codes.setdefault(v, len(codes)) for v in values]

    chosen: list[Any] = []
    ids: list[Any] = []
    for toks, top, lp in zip(cols["tokens"], cols["top_tokens"], lps, strict=True):
        if toks is None or top is None or lp is None:
            chosen.append(code(toks) if toks is not None else [])
            ids.append(None)
            continue
        chosen.append(code(toks))
        ids.append([code(r) if r is not None else [] for r in top])
    return chosen, ids, lps  # a row without identities (ids None) is not recorded for observe


def _margin(lps: Any, position: int) -> float | None:
    """Top-1 minus top-2 logprob of one record at `position` (as decode.Decoder.margin)."""
    if lps is None or position >= len(lps) or lps[position] is None:
        return None
    vals = sorted((v for v in lps[position] if v is not None and math.isfinite(v)), reverse=True)
    return round(float(vals[0] - vals[1]), 6) if len(vals) >= 2 else None


@dataclass
class _Fork:
    rows: ForkRows
    children_first: list[int]  # per branch, a distinct completion on it (its token at the fork is shown)
    prefix_of: int


def _listed(forks: list[_Fork], causes: list[ForkCause], limits: Limits) -> list[tuple[_Fork, ForkCause]]:
    """The forks a prompt lists: most departures first (then the shallowest), at most `limits.forks`."""
    ranked = sorted(zip(forks, causes, strict=True), key=lambda fc: (-fc[1].departures, fc[1].position))
    return ranked[: limits.forks]


@dataclass
class _PromptPlan:
    prompt_id: str
    forks: list[_Fork]
    causes: list[ForkCause]


@dataclass
class BackgroundPlan:
    """The section's numbers; `needed`: the completions whose text it shows."""

    run: BackgroundTemperature
    arms: list[ArmTemperature]
    prompt_arms: list[PromptArmTemperature]
    config: CauseConfig
    prompts: list[_PromptPlan]
    limits: Limits
    needed: set[int] = field(default_factory=set)

    def build(self, dec: Decoder) -> BackgroundSummary:
        entries = []
        for p in self.prompts:
            for f, c in _listed(p.forks, p.causes, self.limits):
                entries.append(
                    ForkCauseEntry(
                        prompt_id=p.prompt_id,
                        position=c.position,
                        prefix=dec.prefix(f.prefix_of, c.position),
                        prefix_count=len(f.rows.rows),
                        departures=c.departures,
                        margin=f.rows.margin,
                        branches=[
                            CauseBranch(token=dec.token(u, c.position), count=int(np.sum(f.rows.branch == b)))
                            for b, u in enumerate(f.children_first[: self.limits.branches])
                        ],
                        labels=list(c.labels),
                        evidence=[
                            ForkEvidence(label=e.label, detail=e.detail, p_value=e.p_value, effect=e.effect)
                            for e in c.evidence
                        ],
                    )
                )
        return BackgroundSummary(
            temperature=temperature_of(self.run),
            arms=self.arms,
            prompt_arms=self.prompt_arms,
            near_tie_dtype=self.config.dtype,
            near_tie_threshold=near_tie_threshold(self.config.dtype, self.config.logit_magnitude),
            shares=divergence_shares(c for p in self.prompts for c in p.causes),
            prompts=[
                PromptCauses(
                    prompt_id=p.prompt_id,
                    forks_total=len(p.causes),
                    departures=sum(c.departures for c in p.causes),
                    shares=divergence_shares(p.causes),
                )
                for p in self.prompts
            ],
            forks=entries,
        )


def _seconds(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v.timestamp() for v in values], dtype=np.float64)


def _cache_state(cached: list[Any], arm_cache: list[str | None]) -> list[str | None]:
    return [("warm" if c > 0 else "cold") if c is not None else a for c, a in zip(cached, arm_cache, strict=True)]


def _forks(seqs: Sequences, row_u: np.ndarray, records: list[Any]) -> list[_Fork]:
    """The forks of the trie of these rows' completions (all arms pooled), with each row's branch."""
    uniq = np.unique(row_u)
    if len(uniq) < 2:
        return []
    srt = np.argsort(seqs.rank[uniq], kind="stable")
    su = uniq[srt]
    place = _place(su, row_u)
    out = []
    for f in find_forks(lcp_pairs(seqs, su[:-1], su[1:])):
        inside = np.flatnonzero((place >= f.first) & (place <= f.last))
        starts = np.array([a for a, _ in f.children])
        branch = np.searchsorted(starts, place[inside], side="right") - 1
        counts = np.bincount(branch, minlength=len(starts))
        # the margin is read on the most frequent branch that continues past the fork
        going = [b for b in np.argsort(-counts, kind="stable").tolist() if seqs.lens[su[starts[b]]] > f.position]
        margin = None
        if going:
            on = inside[branch == going[0]]
            margin = _margin(records[int(on[0])], f.position)
        out.append(_Fork(ForkRows(f.position, margin, inside, branch), [int(su[a]) for a in starts], int(su[f.first])))
    return out


def _place(su: np.ndarray, row_u: np.ndarray) -> np.ndarray:
    """Each row's completion's index in the lexicographic order `su`."""
    index = np.empty(int(su.max()) + 1, np.int64)
    index[su] = np.arange(len(su))
    return index[row_u]


def near_tie_dtype(manifest: RunManifest) -> str:
    dtype = manifest.target.engine.get("dtype")
    return dtype if isinstance(dtype, str) and dtype in SIGNIFICAND_BITS else "bfloat16"


def plan_background(
    manifest: RunManifest,
    reader: SampleReader,
    seqs: Sequences,
    groups: list[tuple[str, ArmRows]],
    limits: Limits,
) -> BackgroundPlan:
    """T_bg and fork causes of a run (module docstring), the text left for `build`."""
    config = CauseConfig(dtype=near_tie_dtype(manifest))
    arm_cache = {a.name: a.cache for a in manifest.arms}
    per_arm: dict[str, list[Observations]] = {}
    arm_conc: dict[str, int | None] = {}
    prompt_arms, prompts, needed = [], [], set()
    for p, arm_rows in groups:
        parts = [(a, c, rows[seqs.row_seq[rows] >= 0]) for a, c, rows in arm_rows]
        rows = np.concatenate([r for _, _, r in parts]) if parts else np.zeros(0, np.int64)
        if not len(rows):
            continue
        table = reader.rows(rows, [*COLUMNS, "cached_tokens"])
        chosen, ids, lps = _records(table)
        at = 0
        arm_of: list[str] = []
        for a, c, r in parts:
            arm_conc.setdefault(a, c)
            obs = observe(chosen[at : at + len(r)], ids[at : at + len(r)], lps[at : at + len(r)])
            at += len(r)
            arm_of += [a] * len(r)
            if len(r):
                per_arm.setdefault(a, []).append(obs)
                prompt_arms.append(PromptArmTemperature(prompt_id=p, arm=a, temperature=temperature_of(estimate(obs))))
        samples = Samples(
            arm=arm_of,
            concurrency=np.array([arm_conc[a] or 0 for a in arm_of], dtype=np.int64),
            fingerprint=table.column("system_fingerprint").to_pylist(),
            started_at=_seconds(table.column("started_at").to_pylist()),
            cache=_cache_state(table.column("cached_tokens").to_pylist(), [arm_cache.get(a) for a in arm_of]),
        )
        forks = _forks(seqs, seqs.row_seq[rows], lps)
        causes = label_forks(samples, [f.rows for f in forks], config)
        prompts.append(_PromptPlan(p, forks, causes))
        for f, _ in _listed(forks, causes, limits):
            needed.add(f.prefix_of)
            needed.update(f.children_first[: limits.branches])
    arms = [
        ArmTemperature(
            arm=a,
            concurrency=arm_conc[a],
            cache=arm_cache.get(a),
            temperature=temperature_of(estimate(Observations.pool(obs))),
        )
        for a, obs in per_arm.items()
    ]
    run = estimate(Observations.pool([o for obs in per_arm.values() for o in obs]))
    return BackgroundPlan(run, arms, prompt_arms, config, prompts, limits, needed)


def run_observations(reader: SampleReader, seqs: Sequences) -> Observations:
    """Every prompt x arm trie of a run's compared rows, pooled: the run's likelihood, for compare."""
    rows = np.flatnonzero(seqs.row_seq >= 0)
    if not len(rows):
        return Observations.pool([])
    meta = reader.rows(rows, ["prompt_id", "arm"])
    pairs = zip(meta.column("prompt_id").to_pylist(), meta.column("arm").to_pylist(), strict=True)
    keys = [f"{p}\0{a}" for p, a in pairs]
    _, group = np.unique(np.array(keys, dtype=object), return_inverse=True)
    parts = []
    for g in range(int(group.max()) + 1):
        chosen, ids, lps = _records(reader.rows(rows[group.ravel() == g], COLUMNS))
        parts.append(observe(chosen, ids, lps))
    return Observations.pool(parts)


# Each run's interval at this level makes the difference's interval (their ends crossed) hold with >= 95 %: the
# two runs are independent, so both intervals hold at once with probability LEVEL^2 = 0.95.
DIFFERENCE_LEVEL = math.sqrt(0.95)


def difference(a: Observations, b: Observations) -> dict[str, Any]:
    """T_bg of B minus T_bg of A with a conservative 95 % interval [lower_B - upper_A, upper_B - lower_A] (each run's
    interval at DIFFERENCE_LEVEL); null ends where a run bounds nothing, all null where one needs logprobs."""
    ta, tb = estimate(a, DIFFERENCE_LEVEL), estimate(b, DIFFERENCE_LEVEL)
    out: dict[str, Any] = {
        "a": temperature_of(estimate(a)).model_dump(),
        "b": temperature_of(estimate(b)).model_dump(),
        "difference": None,
        "lower": None,
        "upper": None,
        "level_each": DIFFERENCE_LEVEL,
    }
    if ta.kind == "needs-logprobs" or tb.kind == "needs-logprobs":
        return out
    assert ta.estimate is not None and tb.estimate is not None and ta.lower is not None and tb.lower is not None
    assert ta.upper is not None and tb.upper is not None

    def finite(x: float) -> float | None:
        return None if math.isinf(x) or math.isnan(x) else x

    return out | {
        "difference": finite(tb.estimate - ta.estimate),
        "lower": finite(tb.lower - ta.upper),
        "upper": finite(tb.upper - ta.lower),
    }
