"""Terminal lines for the background temperature and the fork causes (#18): `analyze` and `compare`."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from detaudit.analysis.background_schema import BackgroundSummary, Temperature
from detaudit.termsafe import quoted, safe

CAUSE_FORKS_SHOWN = 3  # labelled forks per prompt in the terminal; the JSON has them all (up to the limits)


def _shares(shares: dict[str, float] | None) -> str:
    if shares is None:
        return "nothing diverged"
    return ", ".join(f"{label} {share:.0%}" for label, share in sorted(shares.items(), key=lambda s: -s[1]) if share)


def render_background(bg: BackgroundSummary | None, console: Console) -> None:
    """T_bg of the run and per arm, then per prompt the cause shares and its largest labelled forks."""
    if bg is None:
        return
    console.print()
    console.print(Text(f"background temperature T_bg: {bg.temperature.text()}", style="bold"))
    for arm in bg.arms:
        console.print(Text(f"  {safe(arm.arm)}: {arm.temperature.text()}"))
    if bg.temperature.kind == "needs-logprobs":
        console.print(Text("  T_bg needs top-k logprobs: record with --top-logprobs 5 (or more)", style="dim"))
    console.print(Text(f"fork causes (share of divergence): {_shares(bg.shares)}", style="bold"))
    for prompt in bg.prompts:
        if not prompt.departures:
            continue
        console.print(Text(f"  prompt {safe(prompt.prompt_id)}: {_shares(prompt.shares)}"))
        for fork in [f for f in bg.forks if f.prompt_id == prompt.prompt_id][:CAUSE_FORKS_SHOWN]:
            line = Text(f"    @{fork.position} ", style="bold")
            line.append(quoted(fork.prefix[-30:]), style="cyan")
            line.append(f" {fork.departures} of {fork.prefix_count} left: ")
            line.append(", ".join(fork.labels), style="yellow")
            console.print(line)
            for e in fork.evidence:
                console.print(Text(f"      {safe(e.label)}: {safe(e.detail)}", style="dim"))


def render_difference(doc: dict[str, Any] | None, console: Console) -> None:
    """compare's T_bg of A and B and their difference."""
    if doc is None:
        return
    a, b = Temperature.model_validate(doc["a"]), Temperature.model_validate(doc["b"])
    console.print(Text(f"T_bg A: {a.text()}"))
    console.print(Text(f"T_bg B: {b.text()}"))
    if doc["difference"] is None:
        console.print(Text("T_bg B − A: cannot say (a run lacks top-k logprobs or bounds nothing)", style="dim"))
        return
    low = "−∞" if doc["lower"] is None else f"{doc['lower']:.3g}"
    high = "∞" if doc["upper"] is None else f"{doc['upper']:.3g}"
    console.print(Text(f"T_bg B − A: {doc['difference']:.3g} (95% {low} to {high})", style="bold"))
