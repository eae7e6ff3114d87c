"""The example GitHub Actions workflow stays in step with the CLI: every detaudit command in it parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main
import yaml

from detaudit.cli.app import app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _commands(workflow: Path) -> list[list[str]]:
    doc = yaml.safe_load(workflow.read_text())
    steps = [s for job in doc["jobs"].values() for s in job["steps"]]
    runs = [s["run"] for s in steps if "run" in s and s["run"].startswith("detaudit ")]
    # GitHub expressions become plain values so shlex sees what the shell would
    return [shlex.split(re.sub(r"\$\{\{[^}]*\}\}", "value", r))[1:] for r in runs]


def test_workflow_audits_baseline_and_candidate_then_gates():
    commands = _commands(EXAMPLES / "release-gate.yml")
    assert [c[0] for c in commands] == ["run", "run", "gate", "report"]
    gate = commands[2]
    assert gate[1:4] == ["runs/candidate", "--baseline", "runs/baseline"]


@pytest.mark.parametrize("argv", _commands(EXAMPLES / "release-gate.yml"), ids=lambda a: a[0])
def test_every_workflow_command_parses(argv):
    command = typer.main.get_command(app).commands[argv[0]]
    command.make_context(argv[0], list(argv[1:]))  # raises a usage error on an unknown option or a bad value
