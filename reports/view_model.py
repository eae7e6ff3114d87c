"""The report model: what every renderer shows, built from run manifests and their summaries (detaudit.summary/1).

Renderers (HTML, Markdown, JUnit) read only this model, never Parquet. Several runs (say an endpoint, a local
stock rerun and a local batch-invariant rerun) become one report with the runs side by side per prompt, led by one
sentence per prompt (reports/findings.py). Prompts are matched across runs by what they say
(PromptSpec.content_key), never by their ids: each run numbers its own prompts p0, p1, ..., so the same id can name
different prompts in two runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detaudit.reports.findings import Piece, arm_words, finding
from detaudit.reports.text import around, common_prefix, shorten

from detaudit.analysis.summary_schema import ArmSummary, Completion, RunSummary
from detaudit.analysis.summary_schema import Fork as SummaryFork
from detaudit.analysis.units import position_noun
from detaudit.gate import arm_name
from detaudit.rundir.schema import PromptSpec, RunManifest

TOKEN_WINDOW = 6  # units shown on each side of a fork in the aligned token view (the summary keeps 6)
MAX_COMPLETIONS = 20  # completions-table rows per arm; the rest are counted in one line
MAX_TOKEN_VIEWS = 8  # variants shown in the aligned token view per arm


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
    noun: str = "token"  # what this run's positions count: "token", or "character" for a run compared as text
    engine: str | None = None  # the engine facts that explain determinism, one short line (kernels, dtype, device)
    engine_facts: list[tuple[str, str]] = field(default_factory=list)  # every engine fact, for the expandable block
    kernels: str | None = None
    incomplete: str | None = None  # set when rows are missing: the run's figures cover only what it recorded

    @property
    def nouns(self) -> str:
        return self.noun + "s"


@dataclass
class CompletionRow:
    """One distinct completion; `text` is cut around where it leaves the modal one (`fork_at`, in `text`)."""

    rank: int
    count: int
    share: float
    first_divergence: int | None
    text: str
    fork_at: int | None = None
    empty: bool = False  # the completion is empty: renderers show a marker, never a blank cell

    @property
    def before(self) -> str:
        return self.text if self.fork_at is None else self.text[: self.fork_at]

    @property
    def after(self) -> str:
        return "" if self.fork_at is None else self.text[self.fork_at :]


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
    expected: int | None  # samples the manifest asked for in this arm (None: an arm found only in the rows)
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
    modal_text: str | None = None  # the most frequent completion in full (as the summary keeps it)
    load: str = ""  # the arm's load in plain words ("one request at a time", "16 requests in flight")
    truncated: int = 0  # ok answers that ended without a stated reason: not compared
    numeric: str | None = None  # logprobs varying among identical completions, in words
    cache: str | None = None  # a cache arm's evidence (cached_tokens), in words
    cache_state: str | None = None  # the cache state a cache arm asked for ("cold", "warm")

    @property
    def asked(self) -> int:
        """The denominator of ok/N: what was asked for, never just the rows that happen to be there."""
        return self.n if self.expected is None else max(self.expected, self.n)


@dataclass
class PromptSection:
    """One prompt, by content, with every run that asked it. `prompt_id` is its heading: the ids the runs gave it
    ("p0", or "p0/p2" when two runs numbered it differently), with the runs' labels added when another prompt
    would otherwise get the same heading."""

    prompt_id: str
    prompt: str
    verdicts: list[tuple[str, str]]
    cells: list[Cell]
    finding: list[Piece] = field(default_factory=list)
    key: str = ""  # PromptSpec.content_key
    asked: list[tuple[str, str]] = field(default_factory=list)  # (run label, the prompt's id in that run)


@dataclass
class Report:
    runs: list[RunInfo]
    prompts: list[PromptSection]
    warnings: list[str] = field(default_factory=list)  # shown atop every report and on stderr


def _label(path: Path, used: set[str]) -> str:
    base = path.name or str(path)
    label, i = base, 2
    while label in used:
        label, i = f"{base}-{i}", i + 1
    used.add(label)
    return label


def _run_info(path: Path, manifest: RunManifest, summary: RunSummary, label: str) -> RunInfo:
    t = manifest.target
    kernels = t.engine.get("kernels")
    if t.kind == "endpoint":
        title = f"endpoint {t.base_url or ''} ({t.api})".strip()
    else:
        title = f"local engine, {kernels} kernels" if kernels else "local engine"
    p = manifest.params
    params = [f"temperature={p.temperature:g}"]
    optional = (("max_tokens", p.max_tokens), ("top_p", p.top_p), ("seed", p.seed), ("top_logprobs", p.top_logprobs))
    params += [f"{k}={v}" for k, v in optional if v is not None]
    if p.stop:
        params.append(f"stop={p.stop!r}")
    noun = position_noun(summary.unit)
    meta = [
        ("target", title),
        ("model", t.model or "—"),
        ("params", ", ".join(params)),
        ("capture", f"{manifest.capture} (compared as {summary.unit}; positions count {noun}s)"),
        ("samples", f"{manifest.repeats} per prompt per arm; arms {', '.join(a.name for a in manifest.arms)}"),
        ("status", f"{manifest.status}; started {manifest.created_at:%Y-%m-%d %H:%M:%S} UTC"),
        ("detaudit", manifest.tool_version),
    ]
    fingerprints = summary.system_fingerprints
    meta.append(("system_fingerprint", ", ".join(fingerprints) if fingerprints else "not reported"))
    for note in [*manifest.notes, *summary.notes]:
        meta.append(("note", note))
    if t.engine.get("random_weights") is True:
        meta.append(("note", RANDOM_WEIGHTS_NOTE))
    agreement = summary.agreement
    earliest = summary.earliest_fork
    samples = summary.samples
    incomplete = None
    if manifest.status != "complete" or samples.rows < samples.expected:
        incomplete = f"{manifest.status}: {samples.rows} of {samples.expected} samples recorded"
    return RunInfo(
        label=label,
        path=str(path),
        title=title,
        kind=t.kind,
        meta=meta,
        unit=summary.unit,
        # An incomplete run claims no agreement over rows it does not have.
        agreement=None if incomplete else agreement.share,
        agreement_counts=None if incomplete else (agreement.all_identical, agreement.prompts),
        earliest_fork=None if earliest is None else (earliest.position, earliest.prompt_id, earliest.arm),
        noun=noun,
        engine=_engine_brief(t.engine) if t.engine else None,
        engine_facts=_engine_facts(t.engine),
        kernels=str(kernels) if kernels else None,
        incomplete=incomplete,
    )


RANDOM_WEIGHTS_NOTE = (
    "random weights: the model is a test model with untrained weights (detaudit tiny-model), so its text means "
    "nothing; only where and how often the completions fork matters"
)
_ENGINE_FIRST = ("kernels", "dtype", "device", "gpu", "torch", "triton", "engine", "scenarios", "seed")


def _engine_brief(engine: Mapping[str, Any]) -> str:
    """The three facts that decide determinism, as words: 'batch-invariant kernels, bfloat16, cpu'."""
    parts = [f"{engine['kernels']} kernels" if "kernels" in engine else None, engine.get("dtype"), engine.get("device")]
    brief = ", ".join(str(x) for x in parts if x)
    return brief or f"{len(engine)} facts"


def _engine_facts(engine: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every engine fact as (key, value), the ones that explain determinism first, nested values as compact JSON."""
    keys = [k for k in _ENGINE_FIRST if k in engine] + sorted(k for k in engine if k not in _ENGINE_FIRST)
    out = []
    for k in keys:
        v = engine[k]
        text = json.dumps(v, separators=(", ", ": "), default=str) if isinstance(v, (dict, list)) else str(v)
        out.append((k, text))
    return out


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


def cache_text(arm: ArmSummary) -> str | None:
    """A cache arm's evidence as one phrase: what it asked for, what its cached_tokens show; None for a load arm."""
    c = arm.cache
    if c is None:
        return None
    if c.evidence == "unverified":
        return f"{c.asked} cache asked; unverified: none of {c.rows} answers reported cached_tokens"
    tokens = f"{c.cached_tokens_min}" if c.cached_tokens_min == c.cached_tokens_max else ""
    tokens = tokens or f"{c.cached_tokens_min}–{c.cached_tokens_max}"
    shown = c.evidence if c.evidence != c.asked else f"{c.evidence}, as asked"
    return (
        f"{c.asked} cache asked; {c.hits} of {c.rows} answers hit the cache ({c.reporting} reported cached_tokens, "
        f"{tokens} tokens): {shown}"
    )


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


def _completion_rows(completions: Sequence[Completion]) -> list[CompletionRow]:
    """The listed completions, each cut around where it leaves the modal one; the modal one around the earliest
    such point, so the rows line up on the divergence."""
    shown = completions[:MAX_COMPLETIONS]
    if not shown:
        return []
    modal = shown[0].text
    forks = [common_prefix(c.text, modal) for c in shown[1:]]
    rows = []
    for i, c in enumerate(shown):
        at = (min(forks) if forks else None) if i == 0 else forks[i - 1]
        text, fork_at = around(c.text, at)
        rows.append(CompletionRow(i + 1, c.count, c.share, c.first_divergence, text, fork_at, c.text_chars == 0))
    return rows


def _cell(run: RunInfo, arm: ArmSummary) -> Cell:
    first = arm.first_divergence
    views, note = _token_views(arm.completions)
    return Cell(
        run=run,
        arm=arm_name(arm),
        concurrency=arm.concurrency,
        expected=arm.expected,
        n=arm.n,
        ok=arm.ok,
        errors=arm.errors,
        unique=arm.unique,
        statistic=statistic_text(arm),
        completions=_completion_rows(arm.completions),
        more_completions=max(0, arm.unique - MAX_COMPLETIONS),
        first_min=first.min,
        first_median=first.median,
        histogram={int(k): v for k, v in first.histogram.items()},
        forks=_fork_tree(arm.forks),
        fork_count=len(arm.forks),
        token_views=views,
        token_view_note=note,
        fingerprints=_fingerprints(arm),
        modal_text=arm.completions[0].text if arm.completions else None,
        load=arm_words(run.kind, arm_name(arm), arm.concurrency, arm.cache.asked if arm.cache else None),
        truncated=arm.truncated,
        numeric=numeric_text(arm),
        cache=cache_text(arm),
        cache_state=arm.cache.asked if arm.cache else None,
    )


def _prompt_text(spec: PromptSpec) -> str:
    if spec.prompt is not None:
        return spec.prompt
    return "\n".join(f"{msg.get('role', '?')}: {msg.get('content', '')}" for msg in spec.messages or [])


MAX_UNSHARED_WARNINGS = 5  # prompts named one by one in the "not asked by every run" warning


def build_report(runs: Sequence[tuple[Path, RunManifest, RunSummary]]) -> Report:
    """The report model for one or more runs: each prompt once (matched by content), in first-seen order, with the
    runs that asked it side by side."""
    used: set[str] = set()
    infos = [_run_info(Path(path), m, s, _label(Path(path), used)) for path, m, s in runs]
    sections: dict[str, PromptSection] = {}
    for info, (_, manifest, summary) in zip(infos, runs, strict=True):
        specs = {spec.prompt_id: spec for spec in manifest.prompts}
        for prompt in summary.prompts:
            spec = specs[prompt.prompt_id]
            key = spec.content_key()
            if key not in sections:
                text = shorten(_prompt_text(spec), 400)
                sections[key] = PromptSection(prompt_id="", prompt=text, verdicts=[], cells=[], key=key)
            section = sections[key]
            section.asked.append((info.label, prompt.prompt_id))
            section.verdicts.append((info.label, prompt.verdict))
            section.cells.extend(_cell(info, arm) for arm in prompt.arms)
    prompts = list(sections.values())
    _headings(prompts)
    for section in prompts:
        section.finding = finding(section)
    return Report(runs=infos, prompts=prompts, warnings=_warnings(len(infos), prompts))


def _headings(sections: list[PromptSection]) -> None:
    """Each section's heading: its ids across runs, and the runs that asked it where two would read the same."""
    bases = ["/".join(dict.fromkeys(pid for _, pid in s.asked)) for s in sections]
    for section, base in zip(sections, bases, strict=True):
        clash = bases.count(base) > 1
        section.prompt_id = f"{base} ({', '.join(label for label, _ in section.asked)})" if clash else base


def _warnings(n_runs: int, sections: list[PromptSection]) -> list[str]:
    """What a reader comparing runs must know: ids that name different prompts in different runs (matched by
    content here, so never mixed), and prompts that not every run asked."""
    if n_runs < 2:
        return []
    out = []
    keys_by_id: dict[str, set[str]] = {}
    for s in sections:
        for _, pid in s.asked:
            keys_by_id.setdefault(pid, set()).add(s.key)
    for pid, keys in keys_by_id.items():
        if len(keys) > 1:
            out.append(
                f"prompt id {pid} names {len(keys)} different prompts in these runs: prompts are matched by their "
                "content, not their id"
            )
    unshared = [s for s in sections if len(s.asked) < n_runs]
    if unshared:
        out.append(
            f"the runs do not share all their prompts: {len(unshared)} of {len(sections)} not asked by every run"
        )
    for s in unshared[:MAX_UNSHARED_WARNINGS]:
        runs = ", ".join(label for label, _ in s.asked)
        out.append(f"prompt {s.prompt_id} ({shorten(s.prompt, 60)!r}) was asked only by {runs}")
    if len(unshared) > MAX_UNSHARED_WARNINGS:
        out.append(f"… and {len(unshared) - MAX_UNSHARED_WARNINGS} more prompts not asked by every run")
    return out
