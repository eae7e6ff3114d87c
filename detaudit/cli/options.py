"""Command-line helpers shared by the commands."""

from __future__ import annotations

import click


def given_options(ctx: click.Context) -> set[str]:
    """Names of the parameters the user set (command line or environment), not left at their default.

    Compared by name: typer may vendor its own click, whose ParameterSource enum is not click's.
    """
    given = set()
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name) if p.name else None
        if source is not None and source.name != "DEFAULT":
            given.add(p.name)
    return given
