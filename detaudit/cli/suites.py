"""`detaudit suites [NAME|PATH]`: list the bundled probe suites, or show (and so validate) one suite's entries."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from detaudit.probes.suites import Suite, bundled_suites, load_suite
from detaudit.termsafe import safe


def suites_command(
    suite: Annotated[
        str | None,
        typer.Argument(help="A bundled suite name or a suite file: show its entries (and validate the file)."),
    ] = None,
) -> None:
    console = Console()
    if suite is None:
        console.print(_list_table(bundled_suites()))
        console.print("Use: detaudit run --suite NAME|PATH …   Details: detaudit suites NAME")
        return
    console.print(_entries_table(load_suite(suite)))


def _list_table(suites: list[Suite]) -> Table:
    table = Table(title="Bundled probe suites", title_justify="left")
    table.add_column("suite", style="bold")
    table.add_column("prompts", justify="right")
    table.add_column("max tokens", justify="right")
    table.add_column("description", overflow="fold")
    for s in suites:
        table.add_row(Text(s.name), str(len(s.prompts)), str(s.max_tokens_total), Text(safe(s.description)))
    return table


def _entries_table(suite: Suite) -> Table:
    where = "bundled" if suite.bundled else suite.source
    title = Text(f"{safe(suite.name)} ({safe(where)}): {len(suite.prompts)} prompts")
    table = Table(title=title, title_justify="left")
    table.add_column("id", style="bold", no_wrap=True)
    table.add_column("kind")
    table.add_column("max tokens", justify="right")
    table.add_column("rationale", overflow="fold")
    for p in suite.prompts:
        kind = "prompt" if p.prompt is not None else f"chat ({len(p.messages or [])} msgs)"
        table.add_row(Text(safe(p.prompt_id)), kind, str(p.max_tokens or "run's"), Text(safe(p.rationale or "")))
    return table
