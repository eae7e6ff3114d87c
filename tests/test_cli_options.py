"""Options that `detaudit run` and `detaudit local` share are spelled, abbreviated and explained alike, so a command
line moves from one to the other (`-p`, `-n`, `-m`, `-c`, `-o` ...) without surprises."""

from __future__ import annotations

import typer

from detaudit.cli.app import app

# Shared options whose meaning differs between the two commands, so their help must differ too.
MEANING_DIFFERS = {
    "model": "run: a served model name; local: a hub id or model directory",
    "seed": "run: the request's seed field; local: seeds the filler requests",
    "top_logprobs": "run: the default depends on what the endpoint offers; local: a fixed default",
}


def _options(name: str) -> dict[str, typer.core.click.Option]:
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params if p.param_type_name == "option"}


def test_run_and_local_share_option_spellings_and_help() -> None:
    run, local = _options("run"), _options("local")
    shared = sorted(set(run) & set(local))
    assert {"prompt", "repeats", "model", "out", "concurrency", "force", "as_json"} <= set(shared)
    for name in shared:
        assert sorted(run[name].opts) == sorted(local[name].opts), (
            f"{name}: run {run[name].opts}, local {local[name].opts}"
        )
        if name not in MEANING_DIFFERS:
            assert run[name].help == local[name].help, f"--{name}: the help differs between run and local"
    assert set(MEANING_DIFFERS) <= set(shared)
