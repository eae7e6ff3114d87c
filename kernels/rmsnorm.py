"""RMSNorm and fused residual-add + RMSNorm, batch-invariant on CUDA (Triton) and CPU (fixed blocks).

Scheme: fp32 sum of squares over the hidden dim in an order fixed by the hidden size, ``rstd = 1/sqrt(ss/D + eps)``,
``y = (h * rstd) * w`` in fp32, one cast to the input dtype. The fused variant rounds ``x + residual`` to the
residual's dtype first (as an unfused add would) and returns it as the new residual.
"""

from __future__ import annotations

import torch
from detaudit.kernels import cpu
from detaudit.kernels._dispatch import use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` with optional elementwise ``weight``."""
    if use_triton(x):
        from detaudit.kernels import triton_rowwise

        return triton_rowwise.rms_norm(x, weight, eps)[0]
    return cpu.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual``; returns ``(rms_norm(new_residual), new_residual)``."""
    if use_triton(x):
        from detaudit.kernels import triton_rowwise

        normed, new_res = triton_rowwise.rms_norm(x, weight, eps, residual=residual)
        assert new_res is not None
        return normed, new_res
    return cpu.fused_add_rms_norm(x, residual, weight, eps)
