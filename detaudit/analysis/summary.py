"""The run summary (detaudit.summary/1): unique completions, first divergence, forks, statistics and verdicts.

`summarize(manifest, table)` is a pure function of a run's manifest and sample rows in memory;
`summarize_run(run_dir)` streams them from a run directory instead. Both run `analyze()`: one pass that groups
the completions (run_reader), the numbers per prompt and arm (arms, forks, verdicts), then the text of what is
shown, read for a few rows only. The document is typed (summary_schema); docs/summary.md documents every key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from detaudit.analysis.arms import ArmPlan, GroupResult, order_uniques, plan_arm
from detaudit.analysis.cache_evidence import arm_evidence, compare_cache, compared, read_cached_tokens
from detaudit.analysis.core import Sequences
from detaudit.analysis.decode import Decoder
from detaudit.analysis.logprob_checks import GREEDY_ROWS, distinct_vectors, greedy_note, read_vectors, sampling_check
from detaudit.analysis.rescore_summary import summarize_rescore
from detaudit.analysis.run_reader import (
    DISPLAY_COLUMNS,
    Encoded,
    RunDirReader,
    SampleReader,
    TableReader,
    encode,
    frugal_arrow_pool,
    sample_rows,
)
from detaudit.analysis.summary_schema import (
    EarliestFork,
    Limits,
    PromptSummary,
    PromptUnique,
    RunSummary,
    SampleCounts,
    SamplingCheck,
    UnitDetail,
    UnitFallback,
)
from detaudit.analysis.units import unit_of
from detaudit.analysis.verdicts import PromptGroups, agreement, verdict
from detaudit.errors import RunDirError
from detaudit.rundir.io import check_samples, has_samples, load_manifest, read_rescore, write_summary
from detaudit.rundir.schema import SAMPLES_FILE, PromptSpec, RunManifest


def summarize(manifest: RunManifest, table: pa.Table, limits: Limits = Limits()) -> RunSummary:
    """The detaudit.summary/1 document of a run, from its manifest and sample rows (in SAMPLES_SCHEMA)."""
    return analyze(manifest, TableReader(table), limits)[0]


def load_run_manifest(run_dir: Path) -> RunManifest:
    """The manifest of a run to analyse, once its rows have been checked against it (io.check_samples): an edited
    run directory is refused with what is wrong, never counted. So is a finished run whose samples file is gone
    (it would read as 0/0)."""
    manifest = load_manifest(run_dir)
    # A finished run always has some: samples.parquet is written before the manifest says complete.
    if manifest.status == "complete" and not has_samples(run_dir):
        raise RunDirError(f"{run_dir}: {SAMPLES_FILE} is missing, though the manifest says the run is complete")
    check_samples(run_dir, manifest)
    return manifest


def summarize_run(run_dir: Path | str, limits: Limits = Limits()) -> RunSummary:
    """Read a run directory (manifest + samples) and summarize it; raises RunDirError for what is not a run.

    The samples are streamed: all rows of the compared column, and the display columns of a few rows only.
    """
    manifest = load_run_manifest(Path(run_dir))
    summary = analyze(manifest, RunDirReader(Path(run_dir)), limits)[0]
    rescored = read_rescore(Path(run_dir))
    if rescored is not None:
        summary.rescore = summarize_rescore(rescored)
    return summary


def store_summary(run_dir: Path | str, on_unwritable: Callable[[OSError], None] | None = None) -> RunSummary:
    """The last step of every pipeline: summarize a run and write it to RUN/summary.json. With `on_unwritable`, a
    summary.json that cannot be written (a read-only copy of a run) is reported to it instead of raised."""
    summary = summarize_run(run_dir)
    try:
        write_summary(Path(run_dir), summary)
    except OSError as e:
        if on_unwritable is None:
            raise
        on_unwritable(e)
    return summary


def analyze(
    manifest: RunManifest, reader: SampleReader, limits: Limits = Limits()
) -> tuple[RunSummary, Sequences, Decoder, dict[str, GroupResult]]:
    """summarize(), plus the internals compare needs: sequences, decoder and each prompt's pooled result."""
    with frugal_arrow_pool():
        return _analyze(manifest, reader, limits)


def _prompt_text(spec: PromptSpec) -> str | None:
    """The prompt as a person reads it: the plain prompt, else the last chat message's text."""
    if spec.prompt is not None:
        return spec.prompt
    content = (spec.messages or [{}])[-1].get("content")
    return content if isinstance(content, str) else None


def _earliest_fork(prompts: list[PromptSummary]) -> EarliestFork | None:
    """The shallowest fork over all prompts and arms (the first listed, on a tie)."""
    earliest = None
    for pr in prompts:
        for a in pr.arms:
            if a.forks and (earliest is None or a.forks[0].position < earliest.position):
                f = a.forks[0]
                earliest = EarliestFork(
                    prompt_id=pr.prompt_id, arm=a.arm, position=f.position, prefix=f.prefix, branches=f.branches
                )
    return earliest


def _analyze(
    manifest: RunManifest, reader: SampleReader, limits: Limits
) -> tuple[RunSummary, Sequences, Decoder, dict[str, GroupResult]]:
    enc = encode(reader, manifest)
    seqs, meta, source, flags = enc.seqs, enc.meta, enc.source, enc.flags
    p_codes, p_names = meta.codes("prompt_id")
    a_codes, a_names = meta.codes("arm")
    fp_codes, fp_names = meta.codes("system_fingerprint")

    # prompts and arms in manifest order, then any found only in the rows
    known_prompts = {q.prompt_id for q in manifest.prompts}
    prompt_order = [p.prompt_id for p in manifest.prompts] + [p for p in p_names if p not in known_prompts]
    arm_conc = {a.name: a.concurrency for a in manifest.arms}
    arm_cache = {a.name: a.cache for a in manifest.arms}
    cached = read_cached_tokens(reader, manifest)
    arm_order = list(arm_conc) + [a for a in a_names if a not in arm_conc]
    p_index = {name: i for i, name in enumerate(p_names)}
    a_index = {name: i for i, name in enumerate(a_names)}
    key = p_codes.astype(np.int64) * (len(a_names) + 1) + a_codes
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], np.arange(len(p_names) * (len(a_names) + 1) + 1))  # every (p, a) key

    def rows_of(p: str, a: str) -> np.ndarray:
        if p not in p_index or a not in a_index:
            return np.zeros(0, dtype=np.int64)
        k = p_index[p] * (len(a_names) + 1) + a_index[a]
        return order[bounds[k] : bounds[k + 1]]

    # numbers first, for every prompt and arm; the text of what will be shown is read afterwards, in one pass
    needed: set[int] = set()
    plan: list[tuple[str, list[tuple[str, int | None, ArmPlan]], int, int | None]] = []
    groups: PromptGroups = []
    pooled_results: dict[str, GroupResult] = {}
    for p in prompt_order:
        arms, arm_rows = [], []
        for a in arm_order:
            rows = rows_of(p, a)
            if not len(rows) and a not in arm_conc:
                continue
            arm = plan_arm(seqs, flags, rows, fp_codes, fp_names, limits)
            needed |= arm.needed
            c = arm_conc[a] if a in arm_conc else meta.concurrency_at(int(rows[0]))
            arms.append((a, c, arm))
            arm_rows.append((a, c, rows))
        all_rows = np.concatenate([r for _, _, r in arm_rows]) if arm_rows else np.zeros(0, np.int64)
        pooled_seq = seqs.row_seq[all_rows]
        pooled_seq = pooled_seq[pooled_seq >= 0]
        pooled_vectors = None
        if len(pooled_seq):
            uniq, counts = order_uniques(seqs, pooled_seq)
            pooled_vectors = distinct_vectors(flags, all_rows[seqs.row_seq[all_rows] == uniq[0]])
            forks = [arm.earliest_fork for _, _, arm in arms if arm.earliest_fork is not None]
            pooled_results[p] = GroupResult(len(pooled_seq), uniq, counts, min(forks, default=None))
            needed.add(int(uniq[0]))
        plan.append((p, arms, len(np.unique(pooled_seq)), pooled_vectors))
        groups.append((p, arm_rows))

    shown = np.array(sorted(needed), dtype=np.int64)
    dec = Decoder(reader.rows(sample_rows(seqs, shown, reader.units()), DISPLAY_COLUMNS), shown, seqs)
    prompt_text = {q.prompt_id: _prompt_text(q) for q in manifest.prompts}
    numeric_rows = np.array(
        sorted({int(r) for _, arms, _, _ in plan for _, _, arm in arms if arm.numeric for r in arm.numeric.read}),
        dtype=np.int64,
    )
    vectors = read_vectors(reader.rows(numeric_rows, ["logprobs"]), numeric_rows) if len(numeric_rows) else {}
    prompts = []
    for (p, arms, pooled_unique, pooled_vectors), (_, arm_rows) in zip(plan, groups, strict=True):
        blocks = [arm.build(dec, a, c, manifest.repeats if a in arm_conc else None, vectors) for a, c, arm in arms]
        cache = None
        if cached is not None:
            cache_arms = [(a, arm_cache.get(a), rows) for a, _, rows in arm_rows if arm_cache.get(a)]
            for block, (a, _, rows) in zip(blocks, arm_rows, strict=True):
                asked = arm_cache.get(a)
                if asked is not None:
                    block.cache = arm_evidence(asked, cached[compared(seqs, rows)])
            cache = compare_cache(seqs, flags, cache_arms, [b.cache for b in blocks if b.cache], manifest)
        v, why = verdict(blocks, pooled_unique, pooled_vectors, cache)
        prompts.append(
            PromptSummary(
                prompt_id=p,
                prompt=prompt_text.get(p),
                unique_all_arms=pooled_unique,
                arms=blocks,
                verdict=v,
                verdict_reason=why,
                cache=cache,
            )
        )

    n_ok = int((seqs.row_seq >= 0).sum())
    n_truncated = int(flags.truncated.sum())
    sampling = _sampling(reader, manifest, seqs, a_codes, a_names, arm_order, arm_conc)
    summary = RunSummary(
        run_id=manifest.run_id,
        run_status=manifest.status,
        model=manifest.target.model,
        system_fingerprints=sorted(str(n) for n in fp_names if n is not None),  # every value the run saw
        unit=unit_of(source),
        unit_detail=UnitDetail(
            compared_as=source,
            capture=manifest.capture,
            positions="characters (Unicode code points)" if source == "text" else "tokens",
            fallbacks=[UnitFallback(source=s, rows=n) for s, n in enc.abandoned.items()],
        ),
        samples=SampleCounts(
            expected=manifest.expected_samples,
            rows=meta.num_rows,
            ok=n_ok,
            errors=meta.num_rows - n_ok - n_truncated,
            truncated=n_truncated,
        ),
        unique_per_prompt=[
            PromptUnique(prompt_id=pr.prompt_id, unique=pooled_unique, by_arm={a.arm: a.unique for a in pr.arms})
            for pr, (_, _, pooled_unique, _) in zip(prompts, plan, strict=True)
        ],
        agreement=agreement(groups, seqs, fp_codes, fp_names),
        earliest_fork=_earliest_fork(prompts),
        limits=limits,
        prompts=prompts,
        sampling=sampling,
    )
    summary.notes = _notes(summary, enc, manifest)
    return summary, seqs, dec, pooled_results


def _sampling(
    reader: SampleReader,
    manifest: RunManifest,
    seqs: Sequences,
    a_codes: np.ndarray,
    a_names: list[Any],
    arm_order: list[str],
    arm_conc: dict[str, int],
) -> SamplingCheck | None:
    """The greedy check (logprob_checks) over the first GREEDY_ROWS compared rows of each arm; None without top-k
    logprobs."""
    if not reader.list_values("top_logprobs"):
        return None
    compared = seqs.row_seq >= 0
    code = {name: i for i, name in enumerate(a_names)}
    by_arm = []
    for a in arm_order:
        rows = np.flatnonzero(compared & (a_codes == code[a]))[:GREEDY_ROWS] if a in code else np.zeros(0, np.int64)
        by_arm.append((a, arm_conc.get(a), rows))
    rows = np.concatenate([r for _, _, r in by_arm])
    if not len(rows):
        return None
    check = sampling_check(reader.rows(rows, ["logprobs", "top_logprobs"]), by_arm, manifest.params.top_logprobs)
    return check if any(a.positions for a in check.arms) else None


def _notes(summary: RunSummary, enc: Encoded, manifest: RunManifest) -> list[str]:
    """What the reader must know to trust the numbers (RunSummary.notes), in the order the analysis found it."""
    notes = []
    ok_rows = summary.samples.ok + summary.samples.truncated
    if not enc.finish_recorded and ok_rows:
        notes.append("no answer recorded a finish_reason: truncated answers cannot be told apart, all were compared")
    if summary.samples.truncated:
        where = ", ".join(
            f"{p.prompt_id}/{a.arm} {a.truncated}/{a.ok + a.truncated}"
            for p in summary.prompts
            for a in p.arms
            if a.truncated
        )
        notes.append(
            f"{summary.samples.truncated} of {ok_rows} ok answers ended without a stated reason (no finish_reason, or "
            f"`length` short of max_tokens): counted as truncated and not compared ({where})"
        )
    for fb in summary.unit_detail.fallbacks:
        notes.append(
            f"{fb.source} disagreed with the text or usage.completion_tokens on {fb.rows} rows: not compared; "
            f"compared as {summary.unit_detail.compared_as} instead"
        )
    if summary.sampling is not None:
        note = greedy_note(summary.sampling, manifest.params.extra_body)
        if note:
            notes.append(note)
    jitter = [
        f"{p.prompt_id}/{a.arm} {a.numeric.vectors} vectors"
        + (
            f", max |Δ| {a.numeric.max_abs_delta:.3g} first at position {a.numeric.first_position}"
            if a.numeric.max_abs_delta is not None
            else ""
        )
        for p in summary.prompts
        for a in p.arms
        if a.numeric is not None and a.numeric.vectors > 1
    ]
    if jitter:
        notes.append(
            "identical completions carry different logprobs (divergence below the tokens): " + "; ".join(jitter)
        )
    return notes
