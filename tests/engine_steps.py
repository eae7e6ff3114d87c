"""Staggered arrivals for the engine's padded-path tests: one request admitted per step, with different lengths,
so steps of every size and mixed prefill + decode steps occur."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detaudit.engine.llm import Engine
from detaudit.engine.sequence import SamplingParams, Sequence

TEXTS = ["def fibonacci(n):", "import os", "Tell me about Richard Feynman", "x = 1", "class Vector:", "the river"]


def staggered(
    eng: Engine, first_max_tokens: int, graphs: Any = None, size_of: Callable[..., int] | None = None
) -> tuple[list[Sequence], list[int]]:
    """Run TEXTS to completion, request i asking for first_max_tokens + 2i tokens. When `graphs` (a DecodeGraphs or
    PiecewiseGraphs) is given, its `run` is wrapped to record `size_of(*args)` for every step it served."""
    sizes: list[int] = []
    if graphs is not None and size_of is not None:
        run = graphs.run

        def counting(*args: Any) -> Any:
            sizes.append(size_of(*args))
            return run(*args)

        graphs.run = counting
    seqs = []
    for i, text in enumerate(TEXTS):
        params = SamplingParams(max_tokens=first_max_tokens + 2 * i, ignore_eos=True, top_logprobs=2)
        seqs.append(eng.add(Sequence(eng.encode_chat([{"role": "user", "content": text}]), params)))
        eng.step()
    while eng.scheduler.has_work():
        eng.step()
    return seqs, sizes


def outputs(seqs: list[Sequence]) -> list[tuple[Any, ...]]:
    """What a request gets back, per sequence: tokens, their logprobs and the top-k ids and logprobs (to compare
    bitwise)."""
    return [(s.output_ids, s.logprobs, s.top_ids, s.top_logprobs) for s in seqs]


# Ops whose result a host must read back from the device (a sync, which a CUDA graph cannot hold).
HOST_READS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::repeat_interleave.Tensor",
)


class HostReads(TorchDispatchMode):
    """Records every op run under it that reads a device value on the host (boolean-mask indexing included)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.name() in HOST_READS or (
            func.name() == "aten::index.Tensor" and any(i is not None and i.dtype == torch.bool for i in args[1])
        ):
            self.seen.append(func.name())
        return func(*args, **(kwargs or {}))
