"""The Markdown report: compact enough for a GitHub step summary or a PR comment.

GitHub renders inline HTML in Markdown, so model text is HTML-escaped as well as Markdown-escaped, and
table cells never hold a raw newline or pipe. An `@name` in model text would notify that GitHub user from a PR
comment: a zero-width joiner after such an `@` keeps the text and defuses the mention. Bidi controls, which could
reorder what a reviewer reads, are drawn as visible marks (⟨U+202E⟩).
"""

from __future__ import annotations

import html
import re

from detaudit.reports.findings import Piece
from detaudit.reports.text import shorten
from detaudit.reports.view_model import Cell, CompletionRow, ForkNode, Report, RunInfo

from detaudit.gate import GateResult
from detaudit.termsafe import visible_bidi

MAX_FORKS = 5  # fork lines per cell before "... and N more"
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # terminal escapes and the like, never useful in Markdown
# An @ that GitHub would read as a mention (not inside a word, followed by a name): a zero-width joiner follows it.
_MENTION = re.compile(r"(?<![0-9A-Za-z_])@(?=[0-9A-Za-z])")
# Whitespace inside a token drawn as in the HTML report: " " and "  " must not vanish into the table.
_VISIBLE = str.maketrans({" ": "·", "\n": "↵", "\t": "→", "\r": "␍"})


def md_text(text: str, limit: int | None = None) -> str:
    """Model text made inert for a Markdown table cell: HTML-escaped, pipes/backticks/brackets escaped, one line,
    no @mention, bidi controls visible."""
    if limit is not None:
        text = shorten(text, limit)
    text = _CONTROL.sub("\ufffd", html.escape(visible_bidi(text), quote=False))
    for ch in "\\`*_[]|#~":
        text = text.replace(ch, "\\" + ch)
    text = text.replace("\r", "").replace("\n", "↵").replace("\t", "→")
    return _MENTION.sub("@\u200d", text)


EMPTY = "*(empty completion)*"  # never a blank cell; model text is escaped, so this mark cannot be model text


def _token(token: str) -> str:
    """A token in quotes with its whitespace visible (· space, ↵ newline, → tab)."""
    return "(end)" if token == "" else f"“{md_text(shorten(token, 40).translate(_VISIBLE))}”"


def _fork_line(fork: ForkNode, noun: str) -> str:
    branches = " / ".join(f"{_token(b.token)} ×{b.count}" for b in fork.branches)
    margin = f", margin {fork.margin:.3g}" if fork.margin is not None else ""
    return f"{noun} {fork.position}: {branches}{margin}"


def _sentence(pieces: list[Piece]) -> str:
    out = []
    for piece in pieces:
        if piece.kind == "token":
            out.append(_token(piece.text))
        elif piece.kind == "quote":
            out.append(f"“{md_text(piece.text)}”")
        elif piece.kind == "strong":
            out.append(f"**{md_text(piece.text)}**")
        else:
            out.append(md_text(piece.text))
    return "".join(out)


def _completion(row: CompletionRow) -> str:
    """The completion cut around its divergence, ▸ marking where it leaves the modal one."""
    if row.fork_at is None:
        return md_text(row.text)
    return f"{md_text(row.before)}▸{md_text(row.after)}"


def _all_forks(forks: list[ForkNode]) -> list[ForkNode]:
    out: list[ForkNode] = []
    stack = list(reversed(forks))
    while stack:
        f = stack.pop()
        out.append(f)
        for b in reversed(f.branches):
            stack.extend(reversed(b.children))
    return sorted(out, key=lambda f: (f.position, -f.prefix_count))


def _first(cell: Cell) -> str:
    if cell.first_min is None:
        return "—"
    return f"{cell.run.noun} {cell.first_min} (median {cell.first_median:g})"


def _run_figures(run: RunInfo) -> str:
    """The multi-prompt figures of one run: share of prompts all identical, earliest fork across prompts."""
    parts = []
    if run.incomplete:
        parts.append(f"incomplete ({md_text(run.incomplete)}): agreement not claimed")
    elif run.agreement is not None:
        counts = f" ({run.agreement_counts[0]}/{run.agreement_counts[1]})" if run.agreement_counts else ""
        parts.append(f"{run.agreement:.1%} of prompts fully identical{counts}")
    if run.earliest_fork is not None:
        pos, prompt, arm = run.earliest_fork
        parts.append(f"earliest fork at {run.noun} {pos} ({md_text(prompt)} · {md_text(arm)})")
    elif run.agreement is not None:
        parts.append("no fork in any prompt")
    return f"**{md_text(run.label)}**: " + "; ".join(parts) if parts else ""


def render_markdown(report: Report, *, heading: str = "## detaudit report") -> str:
    """Headline table (one row per run/prompt/arm), forks per cell, completions in collapsed details."""
    lines = [heading, ""]
    lines += [f"> **warning:** {md_text(w)}" for w in report.warnings] + ([""] if report.warnings else [])
    many_prompts = len(report.prompts) > 1
    for run in report.runs:
        if run.incomplete:
            lines += [
                f"> **{md_text(run.label)} is incomplete** ({md_text(run.incomplete)}): its counts cover only the "
                "samples it recorded; no agreement is claimed for it.",
                "",
            ]
    for p in report.prompts:
        lines.append(f"- **{md_text(p.prompt_id)}**: {_sentence(p.finding)}")
    lines.append("")
    lines.append(
        "| run | target | "
        + ("prompt | " if many_prompts else "")
        + "arm | ok/asked | unique | modal share | first divergence | verdict |"
    )
    lines.append("|---|---|" + ("---|" if many_prompts else "") + "---|--:|--:|--:|--:|---|")
    for p in report.prompts:
        verdicts = dict(p.verdicts)
        for c in p.cells:
            share = f"{c.completions[0].share:.1%}" if c.completions else "—"
            row = [md_text(c.run.label), md_text(c.run.title)]
            if many_prompts:
                row.append(md_text(p.prompt_id))
            row += [
                f"{md_text(c.arm)} ({md_text(c.load)})",
                f"{c.ok}/{c.asked}" + (f" ({c.truncated} truncated)" if c.truncated else ""),
                f"**{c.unique}**",
                share,
                _first(c),
                md_text(verdicts.get(c.run.label, "")),
            ]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if many_prompts:
        lines += [f"- {line}" for run in report.runs if (line := _run_figures(run))] + [""]
    fork_lines = []
    for p in report.prompts:
        for c in p.cells:
            forks = _all_forks(c.forks)
            if not forks:
                continue
            prompt = f"{md_text(p.prompt_id)} · " if many_prompts else ""
            where = f"{md_text(c.run.label)} · {prompt}{md_text(c.arm)}"
            shown = "; ".join(_fork_line(f, c.run.noun) for f in forks[:MAX_FORKS])
            more = f"; … {len(forks) - MAX_FORKS} more" if len(forks) > MAX_FORKS else ""
            fork_lines.append(f"- **{where}**: {shown}{more}")
    if fork_lines:
        lines += ["**Forks**", "", *fork_lines, ""]
    numeric = [
        f"- **{md_text(c.run.label)} · {md_text(p.prompt_id)} · {md_text(c.arm)}**: {md_text(c.numeric)}"
        for p in report.prompts
        for c in p.cells
        if c.numeric
    ]
    if numeric:
        lines += ["**Below the tokens**", "", *numeric, ""]
    cache = [
        f"- **{md_text(c.run.label)} · {md_text(p.prompt_id)} · {md_text(c.arm)}**: {md_text(c.cache)}"
        for p in report.prompts
        for c in p.cells
        if c.cache
    ]
    if cache:
        lines += ["**Prefix cache**", "", *cache, ""]
    notes = [
        f"- **{md_text(run.label)}**: {md_text(text)}" for run in report.runs for key, text in run.meta if key == "note"
    ]
    if notes:
        lines += ["**Notes**", "", *notes, ""]
    for p in report.prompts:
        for c in p.cells:
            if c.unique < 2:
                continue
            lines.append(
                f"<details><summary>{md_text(c.run.label)} · {md_text(p.prompt_id)} · {md_text(c.arm)}: "
                f"{c.unique} distinct completions</summary>"
            )
            lines += [
                "",
                f"| # | count | share | first div. ({c.run.noun}) | completion (▸ where it leaves the modal one) |",
                "|--:|--:|--:|--:|---|",
            ]
            for r in c.completions:
                first = "modal" if r.rank == 1 else ("—" if r.first_divergence is None else str(r.first_divergence))
                text = EMPTY if r.empty else _completion(r)
                lines.append(f"| {r.rank} | {r.count} | {r.share:.1%} | {first} | {text} |")
            if c.more_completions:
                lines.append(f"| | | | | … {c.more_completions} more |")
            lines += ["", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_gate_markdown(result: GateResult) -> str:
    """The gate's verdict and one line per rule, for $GITHUB_STEP_SUMMARY or a PR comment."""
    icon = {"passed": "✅", "failed": "❌", "cannot judge": "⚠️"}[result.verdict]
    base = f" against baseline `{md_text(result.baseline)}`" if result.baseline else ""
    lines = [f"## detaudit gate {icon} {result.verdict}", "", f"Run `{md_text(result.run)}`{base}.", ""]
    lines += ["| rule | threshold | result |", "|---|---|---|"]
    for rule in result.rules:
        status = "cannot judge" if not rule.judged else ("pass" if rule.passed else "**FAIL**")
        failed = [f"{md_text(c.where)}: {md_text(c.observed)}" for c in rule.checks if not c.passed]
        detail = f" ({'; '.join(failed)})" if failed else ""
        lines.append(f"| {rule.rule} | {md_text(rule.threshold)} | {status}{detail} |")
    return "\n".join(lines) + "\n"
