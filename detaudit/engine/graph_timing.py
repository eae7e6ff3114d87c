"""Which captured CUDA graph size runs a step: each size's replay timed once after capture, then the fastest size
that holds the step (used by the decode graphs, graphs.py, and the piecewise prefill graphs, piecewise.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cheapest_route(times: dict[int, float]) -> dict[int, int]:
    """For each padded size, the size at least as large whose graphs replay fastest (on a tie, the smaller)."""
    route: dict[int, int] = {}
    best: int | None = None
    for size in sorted(times, reverse=True):
        if best is None or times[size] <= times[best]:
            best = size
        route[size] = best
    return route


def replay_ms(graphs: Sequence[torch.cuda.CUDAGraph], reps: int = 5) -> float:
    """Milliseconds of one pass over ``graphs`` replayed in order (mean of ``reps`` passes after an untimed one)."""
    for g in graphs:
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        for g in graphs:
            g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
