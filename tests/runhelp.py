"""Helpers for tests that drive the `detaudit` CLI in-process or as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from detaudit.cli.app import main

FEYNMAN = "Tell me about Richard Feynman"
# Two completions that share 7 tokens, then fork: "Queens, New York" vs "New York City".
QUEENS = ["Richard", " Feynman", " was", " born", " in", " Queens", ",", " New", " York", "."]
NYC = QUEENS[:5] + [" New", " York", " City", "."]
# The console script, not `python -m`: that would put the working directory (the repo root) on sys.path.
DETAUDIT = str(Path(sys.executable).with_name("detaudit"))


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """Run `detaudit ARGS` in this process; returns exit code and captured stdout/stderr."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return Result(code, cap.out, cap.err)


def cli_process(*args: object, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    """Run `detaudit ARGS` as a child process (for signals, kills and secrets in the environment); a bytes argument
    goes to argv as is (e.g. not UTF-8)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    proc = subprocess.run([DETAUDIT, *argv], capture_output=True, text=True, env=full_env, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: to show that a failed command changed nothing."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
