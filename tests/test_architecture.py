"""The one direction of imports (docs/architecture.md), checked by import-linter's contracts in pyproject.toml.

import-linter walks a package's folder, and kernels/, probes/ and reports/ only become detaudit.kernels, ... when
installed: the check runs on the package as pip installs it (into a temporary folder, without dependencies)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold(tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-compile",
        "--target",
        str(target),
        str(ROOT),
    ]
    subprocess.run(pip, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "broken" not in proc.stdout.lower().split("contracts:")[-1].replace("0 broken", "")
