"""Builds the root typer app from the per-command modules and turns DetauditError into exit codes."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.console import Console
from rich.markup import escape

from detaudit import __version__
from detaudit.cli import helpfmt
from detaudit.errors import EXIT_INTERRUPTED, DetauditError, EndpointError
from detaudit.redact import new_session, session_scrubber
from detaudit.termsafe import safe

if TYPE_CHECKING:
    import click

app = typer.Typer(
    name="detaudit",
    help="Audit LLM nondeterminism at temperature 0.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=helpfmt.Group,
    epilog="Start with the offline demo: detaudit demo",
)
err_console = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"detaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _state["debug"] = debug


def _register() -> None:
    """Every command, in the order `detaudit --help` lists them; each module exposes plain functions."""
    from detaudit.cli import (
        analyze,
        demo,
        gate,
        local,
        probe_kernels,
        report,
        rescore,
        run,
        schema,
        serve,
        suites,
        tiny_model,
    )
    from detaudit.cli.probe import probe_app

    # name, function, one-line help, one example (the help's last line)
    commands: list[tuple[str, Callable[..., Any], str, str]] = [
        (
            "demo",
            demo.demo_command,
            "Offline demo: tiny model served with stock kernels, audited, rerun batch-invariant.",
            "detaudit demo --out /tmp/detaudit-demo",
        ),
        (
            "run",
            run.run_command,
            "Fire N temperature-0 requests per prompt per load arm and record every token stream.",
            'detaudit run --model gpt-4o-mini -p "Tell me about Richard Feynman" -n 100 -c 1,8 --max-tokens 256 '
            "--out runs/feynman",
        ),
        (
            "analyze",
            analyze.analyze_command,
            "Analyse a run: unique completions, forks, statistics, load verdict.",
            "detaudit analyze runs/feynman",
        ),
        (
            "compare",
            analyze.compare_command,
            "Compare two runs: same setup? same modal completions? where do they part?",
            "detaudit compare runs/release-1 runs/release-2",
        ),
        (
            "report",
            report.report_command,
            "Render runs side by side as self-contained HTML, Markdown and/or JUnit XML.",
            "detaudit report runs/endpoint runs/local-bi --html report.html --md report.md",
        ),
        (
            "gate",
            gate.gate_command,
            "Pass or fail a run on thresholds (and a baseline run); exit 0/1/2/3 for CI.",
            "detaudit gate runs/rc --baseline runs/prod --require-same-modal --max-unique 1",
        ),
        (
            "suites",
            suites.suites_command,
            "List the bundled probe suites, or show and validate one suite.",
            "detaudit suites standard",
        ),
        (
            "local",
            local.local_command,
            "Rerun prompts on the bundled engine under server-like load (stock or batch-invariant).",
            'detaudit local --model Qwen/Qwen3-0.6B -p "def fibonacci(n):" -n 100 --kernels batch-invariant '
            "--out runs/local-bi",
        ),
        (
            "serve",
            serve.serve_command,
            "Serve a model on the local engine through an OpenAI-compatible API.",
            "detaudit serve --model Qwen/Qwen3-0.6B --kernels batch-invariant --port 8000",
        ),
        (
            "rescore",
            rescore.rescore_command,
            "Recompute a run's token logprobs by teacher-forced prefill; report the gap.",
            "detaudit rescore runs/local-bi --model Qwen/Qwen3-0.6B",
        ),
        (
            "tiny-model",
            tiny_model.tiny_model_command,
            "Build a tiny random-weight model with an offline tokenizer (tests, demos).",
            "detaudit tiny-model /tmp/tiny --arch qwen3",
        ),
        (
            "schema",
            schema.schema_command,
            "Print the run-directory schema (samples.parquet columns, manifest fields).",
            "detaudit schema --json",
        ),
    ]
    for name, func, text, example in commands:
        app.command(name, help=text, epilog=helpfmt.example(example), cls=helpfmt.Command)(func)
    probe_app.command(
        "kernels",
        help="Sweep our kernels and stock torch over batch sizes: invariant or not, per op.",
        epilog=helpfmt.example("detaudit probe kernels --device cuda --dtype bf16 --quick"),
        cls=helpfmt.Command,
    )(probe_kernels.kernels_command)
    app.add_typer(probe_app, name="probe")


_register()


def _click_errors() -> tuple[type[click.ClickException], ...]:
    """click's ClickException and the copy that typer vendors (typer >= 0.2x raises its own, of the same API)."""
    import click

    vendored = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    return tuple({click.ClickException, *cast("list[type[click.ClickException]]", vendored)})


_CLICK_ERRORS = _click_errors()
# The `local` extra (pyproject.toml): an endpoint-only install lacks these, and the commands that run a model need them.
LOCAL_EXTRA_MODULES = frozenset({"torch", "triton", "transformers", "safetensors", "tokenizers", "fastapi", "uvicorn"})


def _shown(text: str, *, lines: bool = False) -> str:
    """What may reach the terminal of a message that can carry server or file text: secrets scrubbed, control and
    bidi characters escaped, rich markup inert. `lines`: keep line breaks (a managed server's last log lines)."""
    return escape(safe(session_scrubber().scrub(text), keep_newlines=lines))


def _print_error(message: str, label: str = "error", *, lines: bool = False) -> None:
    err_console.print(f"[bold red]{label}:[/] {_shown(message, lines=lines)}", highlight=False, soft_wrap=True)


def _print_traceback() -> None:
    """--debug: the traceback, through the same scrubber and escaping as the error line (a server's echo of the
    Authorization header sits in exception messages)."""
    sys.stderr.write(safe(session_scrubber().scrub(traceback.format_exc()), keep_newlines=True))
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line on stderr and their exit code."""
    if argv is not None:  # in-process (tests): the caller goes on after the command
        _main(argv)
        return
    try:
        _main(None)
    except SystemExit as e:
        if e.code == EXIT_INTERRUPTED:
            # Ctrl-C ends the process now: what a command keeps is closed and marked by then, and the interpreter's
            # teardown of torch and transformers alone takes seconds (a demo took 5 s to give the prompt back).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        raise


def _main(argv: list[str] | None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    new_session()
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="detaudit")  # not argv[0]: python -m, pytest
        if isinstance(rc, int) and rc:  # typer.Exit(code) inside a command returns its code here
            sys.exit(rc)
    except DetauditError as e:
        if debug:  # the traceback, then the same line and exit code as without --debug (re-raising exited 1)
            _print_traceback()
        _print_error(str(e), lines=isinstance(e, EndpointError))  # only those quote log lines, each made safe
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # click usage errors and the rest
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, _CLICK_ERRORS):
            # One line, like every other user error (README "Exit codes").
            message = e.format_message()
            if message:  # empty after `detaudit` with no arguments: the help was the message
                _print_error(message)
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            err_console.print("aborted")
            sys.exit(EXIT_INTERRUPTED)
        if debug:
            _print_traceback()
        missing = (e.name or "").split(".")[0] if isinstance(e, ModuleNotFoundError) else ""
        if missing in LOCAL_EXTRA_MODULES:
            _print_error(
                f"this command runs a model and needs the local extra ({missing} is not installed): "
                "pip install 'detaudit[local]'"
            )
            sys.exit(2)
        if isinstance(e, OSError) and e.strerror:
            # The file system refused a path the user named (unwritable, a directory, a full disk): their input.
            where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
            _print_error(f"{where}: {e.strerror}" if where else e.strerror)
            sys.exit(2)
        # One line even for a multi-line exception message; --debug shows all of it.
        detail = type(e).__name__ + ": " + " ".join(str(e).split())
        _print_error(detail + ("" if debug else " (rerun with --debug for details)"), "internal error")
        sys.exit(70)
