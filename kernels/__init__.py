"""Batch-invariant kernels: ``op(x)[rows]`` has the same bits as ``op(x[rows])`` for every batch size.

``with batch_invariant():`` installs aten overrides through ``torch.library`` — Triton kernels at the CUDA key, the
fixed-16-row-block path at the CPU key — for mm, addmm, bmm, _softmax, _log_softmax, mean.dim, sum.dim_IntList and
rms_norm (plus their ``.out`` overloads on CUDA, which torch.compile lowers to). Installation is reference-counted,
so nested blocks and exceptions leave the previous state intact. ``coverage()`` reports which ops ran through our
kernels and which order-sensitive ops ran unprotected. Attention and RMSNorm are also callable directly:
:func:`detaudit.kernels.attention.paged_attention`, :mod:`detaudit.kernels.rmsnorm`. See docs/kernels.md.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from detaudit.kernels.coverage import CoverageReport, coverage

__all__ = [
    "batch_invariant",
    "enable",
    "disable",
    "is_enabled",
    "coverage",
    "CoverageReport",
    "overridden",
    "cpu_self_check",
]

_lock = threading.RLock()
_depth = 0
_libs: list[torch.library.Library] = []
_installed: dict[str, frozenset[str]] = {}
_cpu_check: list[str] | None = None


def overridden(dispatch_key: str) -> frozenset[str]:
    """aten op names (``aten::mm``, ``aten::mm.out``, …) currently overridden at ``dispatch_key``."""
    return _installed.get(dispatch_key, frozenset())


def cpu_self_check() -> list[str]:
    """Run (once per process) the CPU path's row-independence check; returns its failures."""
    global _cpu_check
    if _cpu_check is None:
        from detaudit.kernels import cpu

        _cpu_check = cpu.self_check()
    return _cpu_check


def _install() -> None:
    from detaudit.kernels import overrides

    failures = cpu_self_check()
    if failures:
        raise RuntimeError(
            "detaudit: the fixed-block CPU path is not batch-invariant on this machine: " + "; ".join(failures)
        )
    has_rms = hasattr(torch.ops.aten, "rms_norm")
    for key, table in (("CUDA", overrides.CUDA_TABLE), ("CPU", overrides.CPU_TABLE)):
        lib = torch.library.Library("aten", "IMPL")
        names = set()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            for op, fn in table:
                if op == "rms_norm" and not has_rms:
                    continue
                lib.impl(op, fn, key)
                names.add(f"aten::{op}")
        _libs.append(lib)
        _installed[key] = frozenset(names)


def _uninstall() -> None:
    while _libs:
        _libs.pop()._destroy()
    _installed.clear()


def enable() -> None:
    """Install the overrides (or add one reference if already installed)."""
    global _depth
    with _lock:
        if _depth == 0:
            try:
                _install()
            except BaseException:
                _uninstall()
                raise
        _depth += 1


def disable() -> None:
    """Drop one reference; the overrides are removed when the last one goes."""
    global _depth
    with _lock:
        if _depth == 0:
            raise RuntimeError("detaudit.kernels.disable() called without a matching enable()")
        _depth -= 1
        if _depth == 0:
            _uninstall()


def is_enabled() -> bool:
    """True while at least one ``enable()`` / ``batch_invariant()`` is active."""
    return _depth > 0


@contextmanager
def batch_invariant() -> Iterator[None]:
    """Context manager form of :func:`enable` / :func:`disable`; nesting- and exception-safe."""
    enable()
    try:
        yield
    finally:
        disable()
