"""Terminal rendering of a summary (detaudit.summary/1) and of a comparison (detaudit.compare/1) with rich.

Renders from the typed summary and the compare document only, so what the terminal shows is exactly what --json
and summary.json say.
Every string in them came from a server or a run directory: names pass `safe`, completion text `quoted` (control
and bidi characters escaped either way), and none is read as rich markup.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from detaudit.analysis.summary_schema import ArmSummary, Fork, PromptSummary, RunSummary
from detaudit.analysis.units import position_noun
from detaudit.reports.view_model import cache_text, numeric_text
from detaudit.termsafe import quoted, safe

FORKS_SHOWN = 3  # per arm, in the terminal; the JSON has them all (up to the summary's limits)
PROMPT_SHOWN = 48  # characters of the prompt shown beside its id
_VERDICT_STYLE = {
    "deterministic": "bold green",
    "load-dependent": "bold yellow",
    "load-independent": "bold red",
    "inconclusive": "bold magenta",
    "numerically-load-dependent": "bold yellow",
    "cache-dependent": "bold red",
    "numerically-cache-dependent": "bold yellow",
}


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _short(text: str, limit: int = PROMPT_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unit_text(token: str) -> str:
    """A token (or character) of a completion; the empty one is where the completion ended (or an empty one)."""
    return "⟂ (ended)" if token == "" else quoted(token)


def _fork_line(fork: Fork) -> Text:
    line = Text(f"  @{fork.position:<5} ", style="bold")
    line.append(f"({fork.prefix_count} through) ", style="dim")
    line.append(quoted(fork.prefix[-40:]), style="cyan")
    line.append(" → ")
    parts = [f"{_unit_text(b.token)} ×{b.count}" for b in fork.branches]
    if fork.branches_total > len(fork.branches):
        parts.append(f"… {fork.branches_total - len(fork.branches)} more")
    line.append(" | ".join(parts))
    if fork.margin is not None:
        line.append(f"  margin {fork.margin:.3g}", style="yellow")
    return line


def _bound_text(arm: ArmSummary) -> str:
    st = arm.stats
    if st.divergence_rate_upper95 is not None:
        return f"rate ≤ {_pct(st.divergence_rate_upper95, 2)}"
    if st.modal_share_wilson95:
        lo, hi = st.modal_share_wilson95
        return f"{100 * lo:.1f}–{100 * hi:.1f}%"
    return "–"


def _arm_table(prompt: PromptSummary, nouns: str) -> Table:
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in (
        "arm",
        "conc",
        "ok/asked",
        "err",
        "unique",
        "modal",
        "95% bound",
        f"1st div min/med ({nouns})",
        "forks",
    ):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm in prompt.arms:
        fd = arm.first_divergence
        first = "–" if fd.min is None else f"{fd.min}/{fd.median}"
        table.add_row(
            Text(safe(arm.arm)),
            str(arm.concurrency),
            f"{arm.ok}/{max(arm.expected or 0, arm.n)}"  # what was asked, not just the rows there
            + (f" ({arm.truncated} cut)" if arm.truncated else ""),
            str(arm.errors),
            str(arm.unique),
            _pct(arm.stats.modal_share),
            _bound_text(arm),
            first,
            str(arm.forks_total),
        )
    return table


def _miss_hint(arm: ArmSummary) -> Text | None:
    """For an arm that never diverged: what N agreeing samples can and cannot rule out."""
    st = arm.stats
    if arm.unique != 1 or not st.miss_probability:
        return None
    miss = st.miss_probability["0.01"]
    need = st.samples_needed95["0.01"]
    return Text(
        f"  {safe(arm.arm)}: {arm.ok} agreeing samples; a 1% divergence would go unseen with probability "
        f"{_pct(miss, 2)} ({need} samples catch it 95% of the time)",
        style="dim",
    )


def render_summary(summary: RunSummary, console: Console) -> None:
    """Print the run summary: per prompt an arm table, the first forks and the verdict; then cross-prompt figures."""
    detail = summary.unit_detail
    samples = summary.samples
    head = Text(f"run {safe(summary.run_id)}", style="bold")
    head.append(f"  model {safe(summary.model or '?')}  ·  {safe(summary.run_status)}", style="dim")
    console.print(head)
    console.print(
        Text(
            f"compared as {detail.compared_as} (unit: {summary.unit}, positions in {detail.positions}); "
            f"{samples.ok} ok, {samples.errors} errors"
            + (f", {samples.truncated} truncated" if samples.truncated else "")
            + f" of {samples.rows} rows ({samples.expected} expected)"
        )
    )
    nouns = position_noun(summary.unit, plural=True)
    incomplete = summary.run_status != "complete" or samples.rows < samples.expected
    if incomplete:
        console.print(
            Text(
                f"incomplete run ({safe(summary.run_status)}): {samples.rows} of {samples.expected} samples recorded; "
                "the figures below cover only those",
                style="bold yellow",
            )
        )
    for note in summary.notes:
        console.print(Text(f"note: {safe(note)}", style="yellow"))
    for prompt in summary.prompts:
        console.print()
        title = Text(f"prompt {safe(prompt.prompt_id)}", style="bold")
        if prompt.prompt:
            title.append(f" {quoted(_short(prompt.prompt))}")
        title.append(": ", style="bold")
        title.append(safe(prompt.verdict), style=_VERDICT_STYLE[prompt.verdict])
        title.append(f" — {safe(prompt.verdict_reason)}", style="dim")
        console.print(title)
        console.print(_arm_table(prompt, nouns))
        for arm in prompt.arms:
            if arm.forks:
                console.print(Text(f"  forks in {safe(arm.arm)} (@ {nouns}):", style="bold"))
                for fork in arm.forks[:FORKS_SHOWN]:
                    console.print(_fork_line(fork))
                if arm.forks_total > FORKS_SHOWN:
                    console.print(Text(f"  … {arm.forks_total - FORKS_SHOWN} more (--json)", style="dim"))
            numeric = numeric_text(arm)
            if numeric is not None:
                console.print(Text(f"  {safe(arm.arm)}: {numeric}", style="yellow"))
            cache = cache_text(arm)
            if cache is not None:
                console.print(Text(f"  {safe(arm.arm)}: {cache}", style="cyan"))
            hint = _miss_hint(arm)
            if hint is not None:
                console.print(hint)
            for fp in arm.system_fingerprints or []:
                console.print(
                    Text(
                        f"  system_fingerprint {safe(fp.system_fingerprint)}: n={fp.n} unique={fp.unique} "
                        f"modal {_pct(fp.modal_share)}"
                    )
                )
    if len(summary.prompts) > 1 and incomplete:
        console.print()
        console.print(Text("prompts with all completions identical: not claimed, the run is incomplete", style="bold"))
    elif len(summary.prompts) > 1:
        ag = summary.agreement
        console.print()
        console.print(
            Text(
                f"prompts with all completions identical: {ag.all_identical}/{ag.prompts} ({_pct(ag.share)})",
                style="bold",
            )
        )
        for arm_ag in ag.by_arm:
            console.print(Text(f"  {safe(arm_ag.arm)}: {arm_ag.all_identical}/{arm_ag.prompts} ({_pct(arm_ag.share)})"))
        for fp_ag in ag.by_system_fingerprint or []:
            console.print(
                Text(f"  system_fingerprint {safe(fp_ag.system_fingerprint)}: {fp_ag.all_identical}/{fp_ag.prompts}")
            )
        if summary.earliest_fork:
            ef = summary.earliest_fork
            console.print(
                Text(
                    f"earliest fork: prompt {safe(ef.prompt_id)}, arm {safe(ef.arm)}, "
                    f"{position_noun(summary.unit)} {ef.position}"
                )
            )


def render_compare(result: dict[str, Any], console: Console) -> None:
    """Print a comparison of two runs: setup differences, then per prompt whether the modal completions agree."""
    a, b = result["a"], result["b"]
    console.print(
        Text(
            f"A {safe(a['run_id'])} ({safe(a['model'])})  vs  B {safe(b['run_id'])} ({safe(b['model'])})", style="bold"
        )
    )
    console.print(Text(f"compared as {safe(result['compared_as'])}"))
    if not result["same_model"]:
        console.print(Text(f"models differ: {safe(a['model'])} vs {safe(b['model'])}", style="bold yellow"))
    if not result.get("same_api", True):
        console.print(Text(f"APIs differ: {safe(a['api'])} vs {safe(b['api'])}", style="bold yellow"))
    nouns = {side: position_noun(result[side]["unit"], plural=True) for side in ("a", "b")}
    if nouns["a"] != nouns["b"]:
        console.print(Text(f"earliest forks count {nouns['a']} in A, {nouns['b']} in B", style="yellow"))
    for name, (va, vb) in result["param_differences"].items():
        console.print(Text(f"parameter {safe(name)} differs: {safe(repr(va))} vs {safe(repr(vb))}", style="yellow"))
    for diff in result["prompt_differences"]:
        console.print(Text(f"prompt {safe(diff['prompt_id'])}: {safe(diff['what'])}", style="yellow"))
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    split_noun = position_noun("text" if result["compared_as"] == "text" else "token", plural=True)
    fork_col = f"earliest fork A/B ({nouns['a']})" if nouns["a"] == nouns["b"] else "earliest fork A/B"
    for col in ("prompt", "modal equal", "unique A/B", fork_col, f"modals part at ({split_noun})", "A", "B"):
        table.add_column(col)
    for p in result["prompts"]:
        split = p["modal_split"]
        ef = p["earliest_fork"]
        table.add_row(
            Text(safe(p["prompt_id"])),
            Text("yes", style="green") if p["modal_equal"] else Text("no", style="red"),
            f"{p['unique']['a']}/{p['unique']['b']}",
            f"{ef['a'] if ef['a'] is not None else '–'}/{ef['b'] if ef['b'] is not None else '–'}",
            "–" if split is None else str(split["position"]),
            Text("" if split is None else _unit_text(split["a"])),
            Text("" if split is None else _unit_text(split["b"])),
        )
    console.print(table)
