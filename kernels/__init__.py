"""Batch-invariant kernels: ``op(x)[rows]`` has the same bits as ``op(x[rows])`` for every batch size.

``with batch_invariant():`` installs aten overrides through ``torch.library`` — Triton kernels at the CUDA key, the
fixed-16-row-block path at the CPU key — for mm, addmm, bmm, _softmax, _log_softmax, mean.dim, sum.dim_IntList and
rms_norm (plus their ``.out`` overloads on CUDA, which torch.compile lowers to); the Mixture-of-Experts op
``detaudit::moe`` (:mod:`detaudit.kernels.moe`) switches itself to its batch-invariant path inside a block.
Installation is reference-counted, so nested blocks and exceptions leave the previous state intact. Registering the
overrides costs about a millisecond (the dispatcher recomputes its tables per op), too much to pay on every step of
an engine: ``pin()`` keeps them registered between blocks, passing each call through to the stock kernel while no
block is active, so that entering and leaving ``batch_invariant()`` is a flag flip. ``coverage()`` reports which ops
ran through our kernels and which order-sensitive ops ran unprotected. Attention and RMSNorm are also callable
directly: :func:`detaudit.kernels.attention.paged_attention`, :mod:`detaudit.kernels.rmsnorm`. See docs/kernels.md.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
    "pin",
    "unpin",
]

_lock = threading.RLock()
_depth = 0  # active batch_invariant() blocks: our kernels run while > 0
_pins = 0  # holders that keep the overrides registered between blocks (pin/unpin)
_libs: list[torch.library.Library] = []
_passthrough = False  # the registered overrides pass calls through to stock outside a block (installed while pinned)
_installed: dict[str, frozenset[str]] = {}
_cpu_check: list[str] | None = None
# torch.library.get_kernel (torch >= 2.9) fetches the stock kernel a pinned override passes through to; without it
# pinning does nothing and every block registers and removes the overrides.
_CAN_PIN = hasattr(torch.library, "get_kernel")


def overridden(dispatch_key: str) -> frozenset[str]:
    """aten op names (``aten::mm``, ``aten::mm.out``, …) overridden at ``dispatch_key`` right now (in a block)."""
    return _installed.get(dispatch_key, frozenset()) if _depth > 0 else frozenset()


def cpu_self_check() -> list[str]:
    """Run (once per process) the CPU path's row-independence check; returns its failures."""
    global _cpu_check
    if _cpu_check is None:
        from detaudit.kernels import cpu

        _cpu_check = cpu.self_check()
    return _cpu_check


def _install(passthrough: bool) -> None:
    """Register the overrides; ``passthrough`` (pinned) wraps each so that it runs stock outside a block (fetching
    the stock kernels costs about as much again as registering, so an unpinned block registers ours bare)."""
    global _passthrough
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
                if passthrough:
                    lib.impl(op, _switched(f"aten::{op}", key, fn), key, with_keyset=True)
                else:
                    lib.impl(op, fn, key)
                names.add(f"aten::{op}")
        _libs.append(lib)
        _installed[key] = frozenset(names | set(overrides.SELF_SWITCHED))
    _passthrough = passthrough


def _switched(op: str, key: str, ours: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Our kernel inside a block, the stock kernel it replaced outside one (while pinned)."""
    try:
        stock = torch.library.get_kernel(op, key)
    except RuntimeError:  # no stock kernel at this key (a CPU-only build's CUDA key): nothing to pass through to
        stock = None

    def impl(keyset: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _depth > 0:
            return ours(*args, **kwargs)
        if stock is None:  # what torch itself raises for an op without a kernel at this key, unpinned
            raise NotImplementedError(f"{op} has no {key} kernel in this build of torch")
        return stock.call_boxed(keyset, *args, **kwargs)

    return impl


def _uninstall() -> None:
    while _libs:
        _libs.pop()._destroy()
    _installed.clear()


def enable() -> None:
    """Install the overrides (or add one reference if already installed)."""
    global _depth
    with _lock:
        if not _libs:
            try:
                _install(passthrough=_CAN_PIN and _pins > 0)
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
        if _depth == 0 and not (_pins and _passthrough):
            _uninstall()


def pin() -> None:
    """Keep the overrides registered between ``batch_invariant()`` blocks (one reference), so that entering a block
    costs microseconds instead of re-registering every op. Outside a block a pinned override passes each call through
    to the stock kernel (a few microseconds more per matmul/reduction in eager code), so stock results stay stock.
    An engine pins for its lifetime; :func:`unpin` drops the reference."""
    global _pins
    with _lock:
        _pins += 1


def unpin() -> None:
    """Drop one :func:`pin` reference; the overrides go when no block and no pin is left."""
    global _pins
    with _lock:
        if _pins == 0:
            raise RuntimeError("detaudit.kernels.unpin() called without a matching pin()")
        _pins -= 1
        if _pins == 0 and _depth == 0:
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
