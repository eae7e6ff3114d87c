"""`detaudit schema`: print the run-directory schema from its single owner, detaudit.rundir.schema."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from detaudit.cli import options
from detaudit.cli.options import like
from detaudit.rundir.schema import MANIFEST_SCHEMA, SCHEMA_VERSION, RunManifest, describe_schema


def schema_command(
    as_json: Annotated[bool, like(options.Json, help="Print as JSON (columns + manifest JSON Schema).")] = False,
) -> None:
    if as_json:
        out = {
            "schema_version": SCHEMA_VERSION,
            "samples": describe_schema(),
            "manifest": RunManifest.model_json_schema(by_alias=True),
        }
        typer.echo(json.dumps(out, indent=2))
        return
    table = Table(title=f"samples.parquet (schema version {SCHEMA_VERSION})")
    for col in ("column", "type", "doc"):
        table.add_column(col)
    for row in describe_schema():
        table.add_row(row["column"], row["type"], row["doc"])
    console = Console()
    console.print(table)
    console.print(f"manifest.json: {MANIFEST_SCHEMA} — `detaudit schema --json` prints its JSON Schema.")
