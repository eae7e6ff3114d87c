"""Continuous batching: every step packs one decode token per running sequence plus prompt chunks of sequences
being prefilled into a single variable-length batch (no padding), as an inference server does; with CUDA graphs,
StepFit sizes the steps to the graphs' replay times. Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice

from detaudit.engine.block_manager import BlockManager
from detaudit.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many new tokens each contributes (1 for decode, a prompt chunk for prefill)."""

    seqs: list[Sequence]
    num_new: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


def fit_tokens(floor: int, want: int, sizes: Iterable[int], cost_ms: Callable[[int], float], overhead_ms: float) -> int:
    """How many tokens a step with prefill should hold: `want`, or a graph size between `floor` (the tokens it must
    hold: one per decoding sequence, score-only prompts whole) and `want` that runs more tokens per millisecond, a
    step costing its graphs' replay (`cost_ms`, by token count) plus `overhead_ms` (its eager attention and host
    work). A step a few tokens past a size pads to the next one: 128 decodes and 6 prompt tokens replay as 192
    rows; holding the 6 back to the next step keeps this one at 128. On a tie, the larger step."""
    best, best_rate = want, want / (cost_ms(want) + overhead_ms)
    for size in sizes:
        if floor < size < want:
            rate = size / (cost_ms(size) + overhead_ms)
            if rate > best_rate:
                best, best_rate = size, rate
    return best


class StepFit:
    """The step-size policy under piecewise CUDA graphs (:func:`fit_tokens`): replay times per graph size measured
    at capture, the per-step overhead measured as steps run (a moving mean of wall minus replay). Until a step
    has been measured, every step holds what it wants."""

    def __init__(self, sizes: Iterable[int], cost_ms: Callable[[int], float], *, weight: float = 0.1) -> None:
        self.sizes, self.cost_ms, self.weight = sorted(sizes), cost_ms, weight
        self.overhead_ms: float | None = None
        self.fitted = 0  # steps given a smaller budget than they wanted

    def observe(self, wall_ms: float, replay_ms: float) -> None:
        """Record a step's wall time and its graphs' replay time."""
        sample = max(wall_ms - replay_ms, 0.0)
        mean = self.overhead_ms
        self.overhead_ms = sample if mean is None else mean + self.weight * (sample - mean)

    def __call__(self, floor: int, want: int) -> int:
        if self.overhead_ms is None or want > self.sizes[-1]:
            return want
        tokens = fit_tokens(floor, want, self.sizes, self.cost_ms, self.overhead_ms)
        self.fitted += tokens < want
        return tokens


class Scheduler:
    """`fit`, when given, sizes each step: called with (tokens the step must hold, tokens it wants), it returns the
    step's budget (the engine's StepFit, from its CUDA graphs' replay times)."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_batch: int,
        max_batched_tokens: int,
        fit: Callable[[int, int], int] | None = None,
    ) -> None:
        self.blocks = block_manager
        self.max_batch = max_batch
        self.max_batched_tokens = max_batched_tokens
        self.fit = fit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """Fill a token budget the way vLLM's scheduler does: one token per decoding sequence, then the next chunk of
        prompts still being prefilled, then newly admitted prompts (FIFO) while seats, budget and KV blocks allow.

        A prompt that does not fit the budget left over is split (chunked prefill), so where a prompt's chunks
        start depends on the load: stock attention computes such a prompt differently, batch-invariant attention
        must not. Score-only sequences (rescore) are never split. A newly admitted prompt starts past its cached
        prefix (BlockManager.cached_prefix). Blocks are given as sequences grow; when a running sequence needs one
        and none is free, the youngest running sequence is preempted (see _preempt).
        """
        seqs: list[Sequence] = []
        num_new: list[int] = []
        budget = self._budget()
        for seq in sorted(self.running, key=lambda s: len(s) - s.num_cached > 1):  # decodes first, stable
            if seq.status is not Status.RUNNING:  # preempted for an older sequence earlier in this loop
                continue
            n = min(len(seq) - seq.num_cached, budget)
            if n <= 0:
                continue
            while not self.blocks.grow(seq, seq.num_cached + n):
                victim = self.running[-1]
                self._preempt(victim)
                for i, s in enumerate(seqs):
                    if s is victim:
                        budget += num_new.pop(i)
                        seqs.pop(i)
                        break
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                num_new.append(n)
                budget -= n
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            seq = self.waiting[0]
            hits = self.blocks.cached_prefix(seq)
            computed = len(hits) * self.blocks.block_size
            n = len(seq) - computed
            if seq.score_only and n > budget and seqs:
                break
            n = n if seq.score_only else min(n, budget)
            if not self.blocks.can_admit(hits, computed + n):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, hits)
            self.blocks.grow(seq, computed + n)
            if not seq.preemptions:
                seq.cached_tokens = computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        return ScheduledBatch(seqs, num_new) if seqs else None

    def _budget(self) -> int:
        """The step's token budget: --max-batched-tokens, or what `fit` makes of it given the tokens this step
        would take (decodes, prompt chunks of running sequences, then waiting prompts past their cached prefix, as
        schedule() takes them) and the tokens it must take (one per decode; a score-only prompt is never split, so
        one that would be admitted must fit whole). Held-back prompt tokens run in the next steps."""
        cap = self.max_batched_tokens
        if self.fit is None:
            return cap
        want = floor = 0
        for seq in self.running:
            n = len(seq) - seq.num_cached
            want += n
            floor += n == 1
        for seq in islice(self.waiting, max(self.max_batch - len(self.running), 0)):
            if want >= cap:
                break
            n = len(seq) - len(self.blocks.cached_prefix(seq)) * self.blocks.block_size
            if seq.score_only:
                if want + n > cap and want:
                    break
                floor = want + n
            want += n
        want = min(want, cap)
        return self.fit(min(floor, want), want) if want > floor else cap

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence's blocks back and queue it first, to be recomputed from its tokens (prompt and
        output so far) when blocks free up, as vLLM's recompute preemption does. Its blocks stay in the prefix
        cache until evicted, so the recompute often starts past most of them. With batch-invariant kernels the
        recomputed K/V and the tokens that follow are the bits it would have had without the interruption."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_cached = 0
        seq.preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish_step(self, batch: ScheduledBatch) -> list[Sequence]:
        """Advance the KV position of every sequence of the step; release and return the ones that finished."""
        done = []
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            seq.num_cached += n
            self.blocks.commit(seq)
            if seq.finish_reason is not None or (seq.score_only and seq.num_cached == len(seq)):
                done.append(seq)
        for seq in done:
            self._release(seq)
        return done

    def abort(self, seq: Sequence) -> None:
        """Drop a request (client went away) wherever it is."""
        if seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.status is Status.RUNNING:
            self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
