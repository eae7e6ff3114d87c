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
import pyarrow.compute as pc

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

TOPK_COLUMNS = ["token_ids", "tokens", "top_token_ids", "top_tokens", "top_logprobs"]
META_COLUMNS = ["system_fingerprint", "started_at", "cached_tokens"]
# Top-k values read for T_bg per prompt x arm: its first samples up to this many (~100 MiB while observed), so a run
# of 1000 samples x 1000 tokens x top-20 is read whole and a larger one is not held in memory at once.
TOPK_BUDGET = 1 << 24
# Forks labelled per prompt, those with the most departures: a run where every sample differs has about one fork a
# sample, and the shares are carried by the large ones.
LABELLED_FORKS = 1000
ArmRows = list[tuple[str, int | None, np.ndarray]]  # (arm, concurrency, table rows) of one prompt


def temperature_of(t: BackgroundTemperature, samples: int) -> Temperature:
    """The estimator's result as summary.json holds it (an unbounded end, inf, as null)."""

    def finite(x: float | None) -> float | None:
        return None if x is None or math.isinf(x) else x

    return Temperature(
        kind=t.kind,
        samples=samples,
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


def _list(col: pa.ChunkedArray) -> pa.ListArray:
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)


def _valid(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _rows_1d(arr: pa.ListArray, values: np.ndarray) -> list[np.ndarray | None]:
    """A list column's rows as slices of its child's `values` (as numpy): no Python object per element."""
    off, valid = np.asarray(arr.offsets), _valid(arr)
    return [values[off[i] : off[i + 1]] if valid[i] else None for i in range(len(arr))]


def _rows_2d(arr: pa.ListArray, values: np.ndarray) -> list[Any]:
    """A list<list> column's rows as (positions, k) arrays over the grandchild's `values`; a row whose positions
    are ragged or null as a list of per-position arrays (None where null)."""
    outer, valid = np.asarray(arr.offsets), _valid(arr)
    inner = arr.values
    inner_off, inner_valid = np.asarray(inner.offsets), _valid(inner)
    out: list[Any] = []
    for i in range(len(arr)):
        a, b = int(outer[i]), int(outer[i + 1])
        lens = np.diff(inner_off[a : b + 1])
        if not valid[i]:
            out.append(None)
        elif b == a or ((lens == lens[0]).all() and inner_valid[a:b].all()):
            k = int(lens[0]) if b > a else 0
            out.append(values[inner_off[a] : inner_off[b]].reshape(b - a, k))
        else:
            out.append([values[inner_off[j] : inner_off[j + 1]] if inner_valid[j] else None for j in range(a, b)])
    return out


def _ints(values: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(values, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _records(table: pa.Table) -> tuple[list[Any], list[Any], list[Any]]:
    """Per row: chosen tokens, top-k identities and top-k logprobs, identities coded alike (module docstring).
    Numpy views of the Arrow buffers, so a run of millions of top-k values holds no Python float per value."""
    lps = _rows_2d(*_values(table.column("top_logprobs")))
    tok_ids, top_ids = _list(table.column("token_ids")), _list(table.column("top_token_ids"))
    if len(table) and tok_ids.null_count == 0 and top_ids.null_count == 0:
        return _rows_1d(tok_ids, _ints(tok_ids.values)), _rows_2d(top_ids, _ints(top_ids.values.values)), lps
    toks, tops = _list(table.column("tokens")), _list(table.column("top_tokens"))
    # token strings and top-k strings coded by one dictionary
    both = pa.concat_arrays([toks.values.cast(pa.string()), tops.values.values.cast(pa.string())])
    codes = _ints(pc.dictionary_encode(both).indices)
    chosen = _rows_1d(toks, codes[: len(toks.values)])
    ids = _rows_2d(tops, codes[len(toks.values) :])
    # a row without tokens or identities is not recorded for observe (its ids None)
    return (
        [c if c is not None else np.zeros(0, np.int64) for c in chosen],
        [i if c is not None else None for c, i in zip(chosen, ids, strict=True)],
        lps,
    )


def _margin(lps: Any, position: int) -> float | None:
    """Top-1 minus top-2 logprob of one record at `position` (as decode.Decoder.margin)."""
    if lps is None or position >= len(lps) or lps[position] is None:
        return None
    vals = np.sort(np.asarray(lps[position], dtype=np.float64))[::-1]
    vals = vals[np.isfinite(vals)]
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
    forks_total: int


@dataclass
class BackgroundPlan:
    """The section's numbers; `needed`: the completions whose text it shows."""

    run: Temperature
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
            temperature=self.run,
            arms=self.arms,
            prompt_arms=self.prompt_arms,
            near_tie_dtype=self.config.dtype,
            near_tie_threshold=near_tie_threshold(self.config.dtype, self.config.logit_magnitude),
            shares=divergence_shares(c for p in self.prompts for c in p.causes),
            prompts=[
                PromptCauses(
                    prompt_id=p.prompt_id,
                    forks_total=p.forks_total,
                    forks_labelled=len(p.causes),
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


def _forks(seqs: Sequences, row_u: np.ndarray, reader: SampleReader, rows: np.ndarray) -> tuple[list[_Fork], int]:
    """The forks of the trie of these rows' completions (all arms pooled), with each row's branch: the LABELLED_FORKS
    with the most departures (then the shallowest), and the number of forks in all. The margin is read on the most
    frequent branch that continues past the fork (one row's top-k, as the summary's forks)."""
    uniq = np.unique(row_u)
    if len(uniq) < 2:
        return [], 0
    srt = np.argsort(seqs.rank[uniq], kind="stable")
    su = uniq[srt]
    place = _place(su, row_u)
    cum = np.r_[0, np.cumsum(np.bincount(place, minlength=len(su)))]  # rows on sorted completions [0, i)
    every = find_forks(lcp_pairs(seqs, su[:-1], su[1:]))

    def departures(f: Any) -> int:
        counts = [int(cum[b + 1] - cum[a]) for a, b in f.children]
        return sum(counts) - max(counts)

    kept = sorted(every, key=lambda f: (-departures(f), f.position))[:LABELLED_FORKS]
    order = np.argsort(place, kind="stable")
    found = []
    for f in kept:
        inside = order[cum[f.first] : cum[f.last + 1]]
        starts = np.array([a for a, _ in f.children])
        branch = np.searchsorted(starts, place[inside], side="right") - 1
        counts = np.bincount(branch, minlength=len(starts))
        going = [b for b in np.argsort(-counts, kind="stable").tolist() if seqs.lens[su[starts[b]]] > f.position]
        at = int(inside[branch == going[0]][0]) if going else -1
        found.append((f.position, inside, branch, at, [int(su[a]) for a in starts], int(su[f.first])))
    margin_rows = sorted({at for *_, at, _, _ in found if at >= 0})
    record: dict[int, Any] = {}
    if margin_rows:
        lps = _rows_2d(*_values(reader.rows(rows[margin_rows], ["top_logprobs"]).column("top_logprobs")))
        record = dict(zip(margin_rows, lps, strict=True))
    forks = [
        _Fork(ForkRows(pos, _margin(record[at], pos) if at >= 0 else None, inside, branch), children, prefix_of)
        for pos, inside, branch, at, children, prefix_of in found
    ]
    return forks, len(every)


def _values(col: pa.ChunkedArray) -> tuple[pa.ListArray, np.ndarray]:
    arr = _list(col)
    return arr, arr.values.values.to_numpy(zero_copy_only=False)


def _budget(seqs: Sequences, rows: np.ndarray, k: int) -> np.ndarray:
    """The first of these rows whose top-k values fit TOPK_BUDGET (at least two)."""
    units = np.cumsum(seqs.lens[seqs.row_seq[rows]].astype(np.int64) * k)
    return rows[: max(2, int(np.searchsorted(units, TOPK_BUDGET, side="right")))]


def _top_k(manifest: RunManifest, reader: SampleReader) -> int:
    """The top-k asked for; a run that asked for none but holds top-k lists (an edited or converted run) is read as
    if it had asked for 20; 0 when there are none."""
    return manifest.params.top_logprobs or (20 if reader.list_values("top_logprobs") else 0)


def _observe(reader: SampleReader, seqs: Sequences, rows: np.ndarray, k: int) -> tuple[Observations, int]:
    """One prompt x arm's trie from its first rows within the budget; with the number of rows used."""
    if not k:  # no top-k asked for: nothing to read
        return Observations.pool([]), 0
    used = _budget(seqs, rows, k)
    chosen, ids, lps = _records(reader.rows(used, TOPK_COLUMNS))
    if all(i is None for i in ids):  # no identities recorded (top-k logprobs alone say nothing of which token)
        return Observations.pool([]), 0
    return observe(chosen, ids, lps), len(used)


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
    k = _top_k(manifest, reader)
    per_arm: dict[str, list[tuple[Observations, int]]] = {}
    arm_conc: dict[str, int | None] = {}
    prompt_arms, prompts, needed = [], [], set()
    for p, arm_rows in groups:
        parts = [(a, c, rows[seqs.row_seq[rows] >= 0]) for a, c, rows in arm_rows]
        rows = np.concatenate([r for _, _, r in parts]) if parts else np.zeros(0, np.int64)
        if not len(rows):
            continue
        arm_of: list[str] = []
        for a, c, r in parts:
            arm_conc.setdefault(a, c)
            arm_of += [a] * len(r)
            if len(r):
                obs, used = _observe(reader, seqs, r, k)
                per_arm.setdefault(a, []).append((obs, used))
                t = temperature_of(estimate(obs), used)
                prompt_arms.append(PromptArmTemperature(prompt_id=p, arm=a, temperature=t))
        meta = reader.rows(rows, META_COLUMNS)
        samples = Samples(
            arm=arm_of,
            concurrency=np.array([arm_conc[a] or 0 for a in arm_of], dtype=np.int64),
            fingerprint=meta.column("system_fingerprint").to_pylist(),
            started_at=_seconds(meta.column("started_at").to_pylist()),
            cache=_cache_state(meta.column("cached_tokens").to_pylist(), [arm_cache.get(a) for a in arm_of]),
        )
        forks, total = _forks(seqs, seqs.row_seq[rows], reader, rows)
        causes = label_forks(samples, [f.rows for f in forks], config)
        prompts.append(_PromptPlan(p, forks, causes, total))
        for f, _ in _listed(forks, causes, limits):
            needed.add(f.prefix_of)
            needed.update(f.children_first[: limits.branches])
    arms = [
        ArmTemperature(arm=a, concurrency=arm_conc[a], cache=arm_cache.get(a), temperature=_pooled(parts))
        for a, parts in per_arm.items()
    ]
    run = _pooled([part for parts in per_arm.values() for part in parts])
    return BackgroundPlan(run, arms, prompt_arms, config, prompts, limits, needed)


def _pooled(parts: list[tuple[Observations, int]]) -> Temperature:
    return temperature_of(estimate(Observations.pool([o for o, _ in parts])), sum(n for _, n in parts))


def run_observations(reader: SampleReader, seqs: Sequences, manifest: RunManifest) -> tuple[Observations, int]:
    """Every prompt x arm trie of a run's compared rows (within the budget), pooled: the run's likelihood, for
    compare; with the samples used."""
    rows = np.flatnonzero(seqs.row_seq >= 0)
    if not len(rows):
        return Observations.pool([]), 0
    meta = reader.rows(rows, ["prompt_id", "arm"])
    pairs = zip(meta.column("prompt_id").to_pylist(), meta.column("arm").to_pylist(), strict=True)
    _, group = np.unique(np.array([f"{p}\0{a}" for p, a in pairs], dtype=object), return_inverse=True)
    k = _top_k(manifest, reader)
    parts = [_observe(reader, seqs, rows[group.ravel() == g], k) for g in range(int(group.max()) + 1)]
    return Observations.pool([o for o, _ in parts]), sum(n for _, n in parts)


# Each run's interval at this level makes the difference's interval (their ends crossed) hold with >= 95 %: the
# two runs are independent, so both intervals hold at once with probability LEVEL^2 = 0.95.
DIFFERENCE_LEVEL = math.sqrt(0.95)


def difference(run_a: tuple[Observations, int], run_b: tuple[Observations, int]) -> dict[str, Any]:
    """T_bg of B minus T_bg of A with a conservative 95 % interval [lower_B - upper_A, upper_B - lower_A] (each run's
    interval at DIFFERENCE_LEVEL); null ends where a run bounds nothing, all null where one needs logprobs."""
    (a, samples_a), (b, samples_b) = run_a, run_b
    ta, tb = estimate(a, DIFFERENCE_LEVEL), estimate(b, DIFFERENCE_LEVEL)
    out: dict[str, Any] = {
        "a": temperature_of(estimate(a), samples_a).model_dump(),
        "b": temperature_of(estimate(b), samples_b).model_dump(),
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
