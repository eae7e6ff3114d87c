"""The run summary (detaudit.summary/1): unique completions, first divergence, forks, statistics and verdicts.

`summarize(manifest, table)` is a pure function of a run's manifest and sample rows in memory;
`summarize_run(run_dir)` streams them from a run directory instead. Both run `analyze()`: one pass that groups
the completions (run_reader), the numbers per prompt and arm (arms, forks, verdicts), then the text of what is
shown, read for a few rows only. The document is typed (summary_schema); docs/summary.md documents every key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from detaudit.analysis.arms import ArmPlan, GroupResult, order_uniques, plan_arm
from detaudit.analysis.core import Sequences
from detaudit.analysis.decode import Decoder
from detaudit.analysis.rescore_summary import summarize_rescore
from detaudit.analysis.run_reader import (
    DISPLAY_COLUMNS,
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
    UnitDetail,
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
    seqs, meta, source = encode(reader, manifest)
    p_codes, p_names = meta.codes("prompt_id")
    a_codes, a_names = meta.codes("arm")
    fp_codes, fp_names = meta.codes("system_fingerprint")

    # prompts and arms in manifest order, then any found only in the rows
    known_prompts = {q.prompt_id for q in manifest.prompts}
    prompt_order = [p.prompt_id for p in manifest.prompts] + [p for p in p_names if p not in known_prompts]
    arm_conc = {a.name: a.concurrency for a in manifest.arms}
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
    plan: list[tuple[str, list[tuple[str, int | None, ArmPlan]], int]] = []
    groups: PromptGroups = []
    pooled_results: dict[str, GroupResult] = {}
    for p in prompt_order:
        arms, arm_rows = [], []
        for a in arm_order:
            rows = rows_of(p, a)
            if not len(rows) and a not in arm_conc:
                continue
            arm = plan_arm(seqs, rows, fp_codes, fp_names, limits)
            needed |= arm.needed
            c = arm_conc[a] if a in arm_conc else meta.concurrency_at(int(rows[0]))
            arms.append((a, c, arm))
            arm_rows.append((a, c, rows))
        all_rows = np.concatenate([r for _, _, r in arm_rows]) if arm_rows else np.zeros(0, np.int64)
        pooled_seq = seqs.row_seq[all_rows]
        pooled_seq = pooled_seq[pooled_seq >= 0]
        plan.append((p, arms, len(np.unique(pooled_seq))))
        if len(pooled_seq):
            uniq, counts = order_uniques(seqs, pooled_seq)
            forks = [arm.earliest_fork for _, _, arm in arms if arm.earliest_fork is not None]
            pooled_results[p] = GroupResult(len(pooled_seq), uniq, counts, min(forks, default=None))
            needed.add(int(uniq[0]))
        groups.append((p, arm_rows))

    shown = np.array(sorted(needed), dtype=np.int64)
    dec = Decoder(reader.rows(sample_rows(seqs, shown, reader.units()), DISPLAY_COLUMNS), shown, seqs)
    prompt_text = {q.prompt_id: _prompt_text(q) for q in manifest.prompts}
    prompts = []
    for p, arms, pooled_unique in plan:
        blocks = [arm.build(dec, a, c, manifest.repeats if a in arm_conc else None) for a, c, arm in arms]
        v, why = verdict(blocks, pooled_unique)
        prompts.append(
            PromptSummary(
                prompt_id=p,
                prompt=prompt_text.get(p),
                unique_all_arms=pooled_unique,
                arms=blocks,
                verdict=v,
                verdict_reason=why,
            )
        )

    n_ok = int((seqs.row_seq >= 0).sum())
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
        ),
        samples=SampleCounts(
            expected=manifest.expected_samples, rows=meta.num_rows, ok=n_ok, errors=meta.num_rows - n_ok
        ),
        unique_per_prompt=[
            PromptUnique(prompt_id=pr.prompt_id, unique=pooled_unique, by_arm={a.arm: a.unique for a in pr.arms})
            for pr, (_, _, pooled_unique) in zip(prompts, plan, strict=True)
        ],
        agreement=agreement(groups, seqs, fp_codes, fp_names),
        earliest_fork=_earliest_fork(prompts),
        limits=limits,
        prompts=prompts,
    )
    return summary, seqs, dec, pooled_results
