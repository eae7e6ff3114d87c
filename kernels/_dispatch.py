"""Device routing shared by the public ops: Triton for CUDA tensors, the fixed-block CPU path otherwise."""

from __future__ import annotations

import torch


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device (our Triton kernels); CPU tensors take :mod:`detaudit.kernels.cpu`."""
    return t.device.type == "cuda"
