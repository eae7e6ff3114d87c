"""An endpoint-only install (no torch, transformers, triton, fastapi, uvicorn) runs every endpoint command, and the
commands that run a model say which extra they need (exit 2) instead of crashing.

The child processes get tests/no_local_extra/ on PYTHONPATH, whose sitecustomize makes those modules unimportable:
the same import failures a machine without the `local` extra gives, in the environment CI already has."""

from __future__ import annotations

import json
import os
from pathlib import Path

from runhelp import FEYNMAN, NYC, QUEENS, cli_process

from detaudit.cli.app import LOCAL_EXTRA_MODULES

BLOCKER = Path(__file__).with_name("no_local_extra")
ENV = {"PYTHONPATH": str(BLOCKER) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(*args: object, timeout: float = 120):
    r = cli_process(*map(str, args), env=ENV, timeout=timeout)
    assert "internal error" not in r.err and "Traceback" not in r.err, r.err
    return r


def test_the_blocker_really_hides_the_local_extra():
    import subprocess
    import sys

    code = "import importlib.util, sys\ntry:\n    import torch\nexcept ModuleNotFoundError:\n    sys.exit(7)"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **ENV}, timeout=60)
    assert proc.returncode == 7
    blocked = (BLOCKER / "sitecustomize.py").read_text()
    assert all(f'"{m}"' in blocked for m in LOCAL_EXTRA_MODULES)


def test_endpoint_commands_work_without_the_local_extra(scripted_server, tmp_path):
    server = scripted_server(completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 15), ("N", 1)]})
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = _run("run", "--base-url", server.base_url, "-p", FEYNMAN, "-n", 16, "-c", "1,4", "--out", out)
        assert r.code == 0, r.err
    assert json.loads((a / "summary.json").read_text())["unique_per_prompt"][0]["by_arm"] == {"c1": 2, "c4": 2}
    assert _run("analyze", a, "--json").code == 0
    assert _run("compare", a, b).code == 0
    report = tmp_path / "report"
    r = _run(
        "report",
        a,
        b,
        "--html",
        report.with_suffix(".html"),
        "--md",
        report.with_suffix(".md"),
        "--junit",
        report.with_suffix(".xml"),
    )
    assert r.code == 0 and report.with_suffix(".html").stat().st_size > 1000
    assert _run("gate", a, "--max-unique", 2).code == 0
    assert _run("probe", "endpoint", "--base-url", server.base_url, "--json").code == 0
    assert _run("suites").code == 0 and _run("schema").code == 0


def test_model_commands_name_the_missing_extra(tmp_path):
    commands = [
        ["local", "--model", tmp_path, "-p", "hi", "--out", tmp_path / "run"],
        ["serve", "--model", tmp_path],
        ["tiny-model", tmp_path / "tiny"],
        ["probe", "kernels"],
        ["demo", "--out", tmp_path / "demo"],
    ]
    for args in commands:
        r = _run(*args)
        assert r.code == 2, (args, r.err)
        assert "detaudit[local]" in r.err and len(r.err.strip().splitlines()) == 1, (args, r.err)
    assert not any((tmp_path / d).exists() for d in ("run", "tiny", "demo"))
