"""Staggered arrivals for the engine's padded-path tests: one request admitted per step, with different lengths,
so steps of every size and mixed prefill + decode steps occur."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from detaudit.engine.llm import Engine
from detaudit.engine.sequence import SamplingParams, Sequence

TEXTS = ["def fibonacci(n):", "import os", "Tell me about Richard Feynman", "x = 1", "class Vector:", "the river"]


def staggered(eng: Engine, first_max_tokens: int, graphs: Any = None,
              size_of: Callable[..., int] | None = None) -> tuple[list[Sequence], list[int]]:
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
