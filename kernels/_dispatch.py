"""Device routing shared by the public ops: Triton for CUDA tensors, the fixed-block CPU path otherwise; and which
tuned tables a GPU gets."""

from __future__ import annotations

import functools

import torch


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device (our Triton kernels); CPU tensors take :mod:`detaudit.kernels.cpu`."""
    return t.device.type == "cuda"


@functools.cache
def arch(device: torch.device) -> str:
    """The tuned tables a device gets: ``"h200"`` on an H200 (the H100's SMs with 1.4x its memory bandwidth, so the
    best tiles and split sizes moved), ``"h100"`` (the tables first tuned) on every other device. A table picks which
    fixed configuration runs for a shape; it is a function of the device only, never of the batch."""
    if device.type != "cuda":
        return "h100"
    return "h200" if "H200" in torch.cuda.get_device_name(device) else "h100"
