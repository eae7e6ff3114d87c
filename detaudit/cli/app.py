"""Builds the root typer app from the per-command modules and turns DetauditError into exit codes."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from detaudit import __version__
from detaudit.errors import EXIT_INTERRUPTED, DetauditError

app = typer.Typer(
    name="detaudit",
    help="Audit LLM nondeterminism at temperature 0.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"detaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug


def _register() -> None:
    # Each command module exposes plain functions; registration lives here so the command list is one place.
    from detaudit.cli import analyze, schema, tiny_model

    app.command("schema", help="Print the run-directory schema (samples.parquet columns, manifest fields).")(
        schema.schema_command
    )
    app.command("tiny-model", help="Build a tiny random-weight model with an offline tokenizer (tests, demos).")(
        tiny_model.tiny_model_command
    )
    app.command("analyze", help="Analyse a run: unique completions, forks, statistics, load verdict.")(
        analyze.analyze_command
    )
    app.command("compare", help="Compare two runs: same setup? same modal completions? where do they part?")(
        analyze.compare_command
    )
    from detaudit.cli import suites

    app.command("suites", help="List the bundled probe suites, or show and validate one suite.")(suites.suites_command)
    from detaudit.cli import probe_kernels, run
    from detaudit.cli.probe import probe_app

    probe_app.command("kernels", help="Sweep our kernels and stock torch over batch sizes: invariant or not, per op.")(
        probe_kernels.kernels_command
    )
    app.add_typer(probe_app, name="probe")
    app.command("run", help="Fire N temperature-0 requests per prompt per load arm and record every token stream.")(
        run.run_command
    )
    from detaudit.cli import gate, report

    app.command("report", help="Render runs side by side as self-contained HTML, Markdown and/or JUnit XML.")(
        report.report_command
    )
    app.command("gate", help="Pass or fail a run on thresholds (and a baseline run); exit 0/1/2/3 for CI.")(
        gate.gate_command
    )
    from detaudit.cli import demo

    app.command("demo", help="Offline demo: tiny model served with stock kernels, audited, rerun batch-invariant.")(
        demo.demo_command
    )
    from detaudit.cli import local

    app.command("local", help="Rerun prompts on the bundled engine under server-like load (stock or batch-invariant).")(
        local.local_command
    )
    from detaudit.cli import serve

    app.command("serve", help="Serve a model on the local engine through an OpenAI-compatible API.")(
        serve.serve_command
    )
    from detaudit.cli import rescore

    app.command("rescore", help="Recompute a run's token logprobs by teacher-forced prefill; report the gap.")(
        rescore.rescore_command
    )


_register()


def _click_errors() -> tuple[type[Exception], ...]:
    """click's ClickException and the copy that typer vendors (typer >= 0.2x raises its own)."""
    import click

    vendored = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    return tuple({click.ClickException, *vendored})


_CLICK_ERRORS = _click_errors()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line on stderr and their exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:  # typer.Exit(code) inside a command returns its code here
            sys.exit(rc)
    except DetauditError as e:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
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
                err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            err_console.print("aborted")
            sys.exit(EXIT_INTERRUPTED)
        if debug:
            raise
        err_console.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} (rerun with --debug for details)")
        sys.exit(70)
