"""Running a test file's Triton kernel tests under TRITON_INTERPRET=1 (CPU), in a subprocess.

Triton reads the variable when it decorates kernels (its own standard library included), so it must be set before
anything imports them: the file's outer test re-runs the file in a fresh interpreter with it set, and the inner
tests, marked with ``inner``, run only there.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
inner = pytest.mark.skipif(not INTERPRETED, reason="runs inside test_under_interpreter's subprocess")


def run_file_under_interpreter(path: str, passed: int) -> None:
    """Run `path` with TRITON_INTERPRET=1 and assert that exactly `passed` tests passed there."""
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", path],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"{passed} passed" in proc.stdout, proc.stdout[-2000:]
