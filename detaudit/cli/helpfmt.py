"""How `--help` names option values: click's words (TEXT, INTEGER, PATH), no placeholder after a flag.

typer 0.29 prints a Python type after every option (`--force <bool>`, `--prompt <list[str]>`, `--help <bool>`), a
required argument as `{run_dir}` in the usage line and `<path>` beside it. Pinning an older typer would only defer
the question, and typer has no setting for it, so every command and group here is built with these classes (`cls=`),
which give each parameter without a metavar of its own the click-style one: nothing for a flag, the word for its
type otherwise, and an argument's name in capitals.
"""

from __future__ import annotations

from typing import Any

import typer.core
from rich.markup import escape

# typer's name of a parameter's type -> the word --help shows (a repeatable option shows its item's word).
_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "Path": "PATH", "list[str]": "TEXT", "list[Path]": "PATH"}


def example(command: str) -> str:
    """The last line of a command's help: one example (as text: rich markup in it stays inert)."""
    return "Example: " + escape(command)


class _Option(typer.core.TyperOption):
    def display_type_rich(self, ctx: Any) -> str | None:
        if self.is_flag:
            return None
        return self.metavar or _WORDS.get(self.bare_type(), "VALUE")


class _Argument(typer.core.TyperArgument):
    def display_type_rich(self, ctx: Any) -> str | None:
        return None  # the argument's name column already says what it is

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.metavar or (self.name or "").upper()
        name += "..." if self.nargs != 1 else ""
        return [name if self.required else f"[{name}]"]


def _plain(params: list[Any]) -> None:
    """Give typer's parameters the display above (same state, a subclass that only renders differently)."""
    for p in params:
        if type(p) is typer.core.TyperOption:
            p.__class__ = _Option
        elif type(p) is typer.core.TyperArgument:
            p.__class__ = _Argument
            if p.metavar is None:
                p.metavar = (p.name or "").upper()


class Command(typer.core.TyperCommand):
    """A command whose help shows click-style value names (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        _plain([option])
        return option


class Group(typer.core.TyperGroup):
    """A command group whose help shows click-style value names (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        _plain([option])
        return option
