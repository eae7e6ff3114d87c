"""The report model: what every renderer shows, built from run manifests and their summaries (detaudit.summary/1).

Renderers (HTML, Markdown, JUnit) read only this model, never Parquet. Several runs (say an endpoint, a local
stock rerun and a local batch-invariant rerun) become one report with the runs side by side per prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detaudit.analysis.summary_schema import ArmSummary, Completion, RunSummary
from detaudit.analysis.summary_schema import Fork as SummaryFork
from detaudit.gate import arm_name
from detaudit.rundir.schema import RunManifest

TOKEN_WINDOW = 6  # units shown on each side of a fork in the aligned token view (the summary keeps 6)
MAX_COMPLETIONS = 20  # completions-table rows per arm; the rest are counted in one line
MAX_TOKEN_VIEWS = 8  # variants shown in the aligned token view per arm
SHORT_TEXT = 160


@dataclass
class RunInfo:
    """One run directory: its label and metadata rows (endpoint, model, params, capture, fingerprints)."""

    label: str
    path: str
    title: str
    kind: str
    meta: list[tuple[str, str]]
    unit: str
    agreement: float | None
    agreement_counts: tuple[int, int] | None  # (prompts all identical, prompts judged)
    earliest_fork: tuple[int, str, str] | None  # (position, prompt id, arm) of the shallowest fork in the run


@dataclass
class CompletionRow:
    rank: int
    count: int
    share: float
    first_divergence: int | None
    text: str


@dataclass
class Branch:
    token: str
    count: int
    children: list[ForkNode] = field(default_factory=list)


@dataclass
class ForkNode:
    """A fork of the prefix trie: position, shortened shared prefix, branches (with the forks below each)."""

    position: int
    prefix: str
    prefix_count: int
    margin: float | None
    branches: list[Branch]


@dataclass
class Tok:
    """One slot of the aligned token view: a token, the end of the completion, or nothing (past the end)."""

    text: str
    diverges: bool = False
    end: bool = False
    blank: bool = False


@dataclass
class TokenView:
    """One variant aligned with the modal completion around its first divergence, slot by slot."""

    rank: int
    count: int
    position: int
    start: int
    positions: list[int]
    modal: list[Tok]
    variant: list[Tok]


@dataclass
class Cell:
    """One run x one arm of one prompt: a column of the side-by-side view."""

    run: RunInfo
    arm: str
    concurrency: int | None
    n: int
    ok: int
    errors: int
    unique: int
    statistic: str
    completions: list[CompletionRow]
    more_completions: int
    first_min: int | None
    first_median: float | None
    histogram: dict[int, int]
    forks: list[ForkNode]
    fork_count: int
    token_views: list[TokenView]
    token_view_note: str | None
    fingerprints: dict[str, int]
    truncated: int = 0  # ok answers that ended without a stated reason: not compared
    numeric: str | None = None  # logprobs varying among identical completions, in words


@dataclass
class PromptSection:
    prompt_id: str
    prompt: str
    verdicts: list[tuple[str, str]]
    cells: list[Cell]


@dataclass
class Report:
    runs: list[RunInfo]
    prompts: list[PromptSection]


def shorten(text: str | None, limit: int = SHORT_TEXT) -> str:
    """Long model text cut in the middle, so both the start and the end stay visible."""
    text = text or ""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def _label(path: Path, used: set[str]) -> str:
    base = path.name or str(path)
    label, i = base, 2
    while label in used:
        label, i = f"{base}-{i}", i + 1
    used.add(label)
    return label


def _run_info(path: Path, manifest: RunManifest, summary: RunSummary, label: str) -> RunInfo:
    t = manifest.target
    if t.kind == "endpoint":
        title = f"endpoint {t.base_url or ''} ({t.api})".strip()
    else:
        kernels = t.engine.get("kernels")
        title = f"local engine, {kernels} kernels" if kernels else "local engine"
    p = manifest.params
    params = [f"temperature={p.temperature:g}"]
    optional = (("max_tokens", p.max_tokens), ("top_p", p.top_p), ("seed", p.seed), ("top_logprobs", p.top_logprobs))
    params += [f"{k}={v}" for k, v in optional if v is not None]
    if p.stop:
        params.append(f"stop={p.stop!r}")
    meta = [("target", title), ("model", t.model or "—")]
    if t.engine:
        meta.append(("engine", _engine_facts(t.engine)))
    meta += [
        ("params", ", ".join(params)),
        ("capture", f"{manifest.capture} (compared as {summary.unit})"),
        ("samples", f"{manifest.repeats} per prompt per arm; arms {', '.join(a.name for a in manifest.arms)}"),
        ("status", f"{manifest.status}; started {manifest.created_at:%Y-%m-%d %H:%M:%S} UTC"),
        ("detaudit", manifest.tool_version),
    ]
    fingerprints = summary.system_fingerprints
    meta.append(("system_fingerprint", ", ".join(fingerprints) if fingerprints else "not reported"))
    for note in [*manifest.notes, *summary.notes]:
        meta.append(("note", note))
    agreement = summary.agreement
    earliest = summary.earliest_fork
    return RunInfo(
        label=label,
        path=str(path),
        title=title,
        kind=t.kind,
        meta=meta,
        unit=summary.unit,
        agreement=agreement.share,
        agreement_counts=(agreement.all_identical, agreement.prompts),
        earliest_fork=None if earliest is None else (earliest.position, earliest.prompt_id, earliest.arm),
    )


_ENGINE_FIRST = ("kernels", "dtype", "device", "gpu", "torch", "triton", "engine", "scenarios", "seed")


def _engine_facts(engine: Mapping[str, Any]) -> str:
    """Engine facts as one line: the ones that explain determinism first, nested values as compact JSON."""
    keys = [k for k in _ENGINE_FIRST if k in engine] + sorted(k for k in engine if k not in _ENGINE_FIRST)
    parts = []
    for k in keys:
        v = engine[k]
        text = json.dumps(v, separators=(",", ":"), default=str) if isinstance(v, (dict, list)) else str(v)
        parts.append(f"{k}={text}")
    return ", ".join(parts)


def _fingerprints(arm: ArmSummary) -> dict[str, int]:
    """system_fingerprint -> ok samples, when the fingerprint varies within the arm (the summary omits it otherwise)."""
    return {str(item.system_fingerprint): item.n for item in arm.system_fingerprints or []}


def statistic_text(arm: ArmSummary) -> str:
    """The arm's statistic as one phrase: an upper bound when all agree, else an interval on the modal share."""
    if arm.ok == 0:
        return "no successful samples"
    upper = arm.stats.divergence_rate_upper95
    if upper is not None:
        return f"all {arm.ok} identical: P(divergence per request) ≤ {upper:.3g} (95% one-sided)"
    wilson = arm.stats.modal_share_wilson95
    if wilson:
        return f"modal share {wilson[0]:.3g}–{wilson[1]:.3g} (95% Wilson interval)"
    return f"{arm.unique} unique in {arm.ok}"


def numeric_text(arm: ArmSummary) -> str | None:
    """Logprob vectors that differ among the arm's identical (modal) completions, as one phrase; None if they don't."""
    num = arm.numeric
    if num is None or num.vectors < 2:
        return None
    where = "" if num.max_abs_delta is None else f": max |Δ logprob| {num.max_abs_delta:.3g}, first at position "
    where += "" if num.max_abs_delta is None else str(num.first_position)
    return f"{num.vectors} distinct logprob vectors among {num.rows} identical completions{where}"


def _fork_tree(forks: Sequence[SummaryFork]) -> list[ForkNode]:
    """Nest the summary's flat fork list by each fork's `parent` ({fork, branch} indices); roots are returned."""
    nodes = [
        ForkNode(
            position=f.position,
            prefix=shorten(f.prefix, 80),
            prefix_count=f.prefix_count,
            margin=f.margin,
            branches=[Branch(token=b.token, count=b.count) for b in f.branches],
        )
        for f in forks
    ]
    roots: list[ForkNode] = []
    for fork, node in zip(forks, nodes, strict=True):
        parent = fork.parent
        if parent is not None and 0 <= parent.fork < len(nodes):
            branches = nodes[parent.fork].branches
            if 0 <= parent.branch < len(branches):
                branches[parent.branch].children.append(node)
                continue
        roots.append(node)
    return roots


def _slots(window: list[str], start: int, stop: int, fork: int, length: int) -> list[Tok]:
    """Slots start..stop-1 of a completion of `length` units whose units from `start` on are `window`:
    the slot right after its last unit marks its end, later slots are blank."""
    out = []
    for i in range(start, stop):
        if i < length and i - start < len(window):
            out.append(Tok(text=shorten(window[i - start], 40), diverges=i == fork))
        elif i == length:
            out.append(Tok(text="", diverges=i == fork, end=True))
        else:
            out.append(Tok(text="", blank=True))
    return out


def _token_views(completions: Sequence[Completion]) -> tuple[list[TokenView], str | None]:
    """Each listed variant against the modal completion, from the `context` the summary keeps around its fork."""
    if len(completions) < 2:
        return [], None
    modal_length = completions[0].length
    views = []
    for rank, comp in enumerate(completions[1 : MAX_TOKEN_VIEWS + 1], start=2):
        ctx, pos = comp.context, comp.first_divergence
        if ctx is None or pos is None:
            continue
        start, length = ctx.start, comp.length
        stop = min(pos + TOKEN_WINDOW, max(modal_length, length) + 1)
        views.append(
            TokenView(
                rank=rank,
                count=comp.count,
                position=pos,
                start=start,
                positions=list(range(start, stop)),
                modal=_slots(ctx.modal, start, stop, pos, modal_length),
                variant=_slots(ctx.tokens, start, stop, pos, length),
            )
        )
    more = len(completions) - 1 - MAX_TOKEN_VIEWS
    return views, (f"{more} more listed variants not shown here" if more > 0 else None)


def _cell(run: RunInfo, arm: ArmSummary) -> Cell:
    first = arm.first_divergence
    views, note = _token_views(arm.completions)
    return Cell(
        run=run,
        arm=arm_name(arm),
        concurrency=arm.concurrency,
        n=arm.n,
        ok=arm.ok,
        errors=arm.errors,
        unique=arm.unique,
        statistic=statistic_text(arm),
        completions=[
            CompletionRow(
                rank=i, count=c.count, share=c.share, first_divergence=c.first_divergence, text=shorten(c.text)
            )
            for i, c in enumerate(arm.completions[:MAX_COMPLETIONS], start=1)
        ],
        more_completions=max(0, arm.unique - MAX_COMPLETIONS),
        first_min=first.min,
        first_median=first.median,
        histogram={int(k): v for k, v in first.histogram.items()},
        forks=_fork_tree(arm.forks),
        fork_count=len(arm.forks),
        token_views=views,
        token_view_note=note,
        fingerprints=_fingerprints(arm),
        truncated=arm.truncated,
        numeric=numeric_text(arm),
    )


def _prompt_text(manifests: Sequence[RunManifest], prompt_id: str) -> str:
    for m in manifests:
        for p in m.prompts:
            if p.prompt_id == prompt_id:
                if p.prompt is not None:
                    return p.prompt
                return "\n".join(f"{msg.get('role', '?')}: {msg.get('content', '')}" for msg in p.messages or [])
    return ""


def build_report(runs: Sequence[tuple[Path, RunManifest, RunSummary]]) -> Report:
    """The report model for one or more runs, prompts in first-seen order, runs side by side within each."""
    used: set[str] = set()
    infos = [_run_info(Path(path), m, s, _label(Path(path), used)) for path, m, s in runs]
    order: list[str] = []
    for _, _, summary in runs:
        for prompt in summary.prompts:
            if prompt.prompt_id not in order:
                order.append(prompt.prompt_id)
    sections = []
    manifests = [m for _, m, _ in runs]
    for pid in order:
        cells: list[Cell] = []
        verdicts: list[tuple[str, str]] = []
        for info, (_, _, summary) in zip(infos, runs, strict=True):
            for prompt in summary.prompts:
                if prompt.prompt_id != pid:
                    continue
                verdicts.append((info.label, prompt.verdict))
                cells.extend(_cell(info, arm) for arm in prompt.arms)
        prompt_text = shorten(_prompt_text(manifests, pid), 400)
        sections.append(PromptSection(prompt_id=pid, prompt=prompt_text, verdicts=verdicts, cells=cells))
    return Report(runs=infos, prompts=sections)
