"""Coverage hook: which of our kernels ran during a block, and which reductions/matmuls ran unprotected.

A model can reach an order-sensitive op we do not override (SDPA, layer_norm, var, cumsum, baddbmm, …); its
result may then still depend on the batch. ``with coverage() as cov:`` records every aten op in the block through
a ``TorchDispatchMode`` (decomposing composite ops so their leaves are seen) and counts our kernels as they run.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result depends on a summation order (matmul-like or floating reductions). Exact ones (max, argmax,
# topk, sort, copies, elementwise) are not listed: they cannot depend on the batch.
ORDER_SENSITIVE = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "addbmm",
        "addmv",
        "mv",
        "dot",
        "vdot",
        "matmul",
        "linear",
        "einsum",
        "tensordot",
        "_int_mm",
        "_scaled_mm",
        "_addmm_activation",
        "convolution",
        "_convolution",
        "conv1d",
        "conv2d",
        "conv3d",
        "mkldnn_convolution",
        "cudnn_convolution",
        "_weight_int4pack_mm",
        "_weight_int8pack_mm",
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward",
        "moe",  # detaudit::moe (detaudit.kernels.moe): grouped expert GEMMs and the top-k combine
        "_efficient_attention_forward",
        "sum",
        "mean",
        "nansum",
        "nanmean",
        "prod",
        "var",
        "var_mean",
        "std",
        "std_mean",
        "norm",
        "linalg_vector_norm",
        "_softmax",
        "_log_softmax",
        "softmax",
        "log_softmax",
        "logsumexp",
        "cumsum",
        "cumprod",
        "logcumsumexp",
        "native_layer_norm",
        "layer_norm",
        "native_group_norm",
        "group_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "batch_norm",
        "rms_norm",
        "_fused_rms_norm",
        "embedding_bag",
        "_embedding_bag",
        "nll_loss_forward",
        "nll_loss2d_forward",
        "trace",
        "dist",
        "cdist",
        "_cdist_forward",
    }
)

_active: list[CoverageReport] = []
_active_lock = threading.Lock()


@dataclass
class CoverageReport:
    """Counts of aten ops by name: ``protected`` ran through our kernels, ``unprotected`` did not."""

    protected: Counter[str] = field(default_factory=Counter)
    unprotected: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        """True when no order-sensitive op ran outside our kernels."""
        return not self.unprotected

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "protected": dict(self.protected), "unprotected": dict(self.unprotected)}


def note_protected(op: str) -> None:
    """Called by every override kernel: count one protected call in each active report."""
    if _active:
        with _active_lock:
            for rep in _active:
                rep.protected[op] += 1


def _device_key(args: Any, kwargs: Any) -> str | None:
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, torch.Tensor):
            return "CUDA" if a.device.type == "cuda" else "CPU" if a.device.type == "cpu" else a.device.type.upper()
        if isinstance(a, list | tuple):
            k = _device_key(a, None)
            if k:
                return k
    return None


class _Recorder(TorchDispatchMode):
    def __init__(self, report: CoverageReport) -> None:
        super().__init__()
        self.report = report

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        from detaudit.kernels import overridden

        name = func.name()  # e.g. "aten::mm" or "aten::mm.out"
        key = _device_key(args, kwargs)
        ours = key is not None and name in overridden(key)
        has_backend = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
        if (
            not ours
            and not has_backend
            and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
        ):
            with self:
                res = func.decompose(*args, **kwargs)
            if res is not NotImplemented:
                return res
        if not ours and func.overloadpacket.__name__ in ORDER_SENSITIVE:
            self.report.unprotected[name] += 1
        return func(*args, **kwargs)


@contextmanager
def coverage() -> Iterator[CoverageReport]:
    """Record kernel coverage for the ops run inside the block (in this thread)."""
    rep = CoverageReport()
    with _active_lock:
        _active.append(rep)
    try:
        with _Recorder(rep):
            yield rep
    finally:
        with _active_lock:
            _active.remove(rep)
