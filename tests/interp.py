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


def fixed_order_dot() -> None:
    """Make the interpreter's ``tl.dot`` sum each output element over K in one fixed order, wherever its row sits in
    the tile. The interpreter hands ``tl.dot`` to numpy's matmul, whose BLAS can round a row by its place in the
    tile (seen with numpy's OpenBLAS on an AMD EPYC): bitwise checks of rows that move between tiles, as a MoE
    token's rows do with the batch, would then test the BLAS, not the kernel. Call it in the interpreted process
    (at the test file's import) before any kernel runs."""
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # Triton's signature
        acc = d.data.dtype
        products = a.data.astype(acc)[:, :, None] * b.data.astype(acc)[None, :, :]  # [M, K, N], each rounded once
        total = d.data.copy()
        for k in range(products.shape[1]):  # k = 0, 1, … for every element
            total += products[:, k, :]
        return TensorHandle(total, d.dtype.scalar)

    InterpreterBuilder.create_dot = create_dot


def run_file_under_interpreter(path: str, passed: int) -> None:
    """Run `path` with TRITON_INTERPRET=1 and assert that exactly `passed` tests passed there."""
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "--noconftest", path],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"{passed} passed" in proc.stdout, proc.stdout[-2000:]
