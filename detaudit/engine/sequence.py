"""Requests as the scheduler sees them. Pure Python: the scheduler and block manager never touch torch."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. temperature 0 is greedy; >0 samples with a generator seeded from `seed`."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_logprobs: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # a request is itself: compared (and found in queues) by identity
class Sequence:
    """One request: prompt ids, what was generated so far, and where its KV lives (block table).

    A `score_only` sequence is a teacher-forced prefill: it runs once over all its tokens and records the logprob
    of every token from index `score_from` on (rescore), generating nothing.
    """

    prompt_ids: list[int]
    params: SamplingParams
    score_only: bool = False
    score_from: int = 0
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks named in the prefix cache so far
    num_cached: int = 0  # tokens whose K/V is in the cache: computed, or shared from the prefix cache
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache when first admitted (OpenAI's cached_tokens)
    preemptions: int = 0  # times its blocks were taken back and its tokens recomputed
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        """tokens[i] without building the whole list (the decode path asks for one token per sequence per step)."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_len(self) -> int:
        """Tokens this sequence may ever hold in the KV cache."""
        return len(self.prompt_ids) if self.score_only else len(self.prompt_ids) + self.params.max_tokens

    def truncate(self, n: int) -> None:
        """Forget every output past the first n and reopen the sequence: a failed step's partial results, before
        the step is run again."""
        del self.output_ids[n:], self.logprobs[n:], self.top_ids[n:], self.top_logprobs[n:]
        self.finish_reason = None

    def append(
        self, token_id: int, logprob: float, top_ids: list[int], top_lps: list[float], eos_ids: set[int]
    ) -> None:
        """Record one sampled token and decide whether the sequence is done."""
        self.output_ids.append(token_id)
        self.logprobs.append(logprob)
        self.top_ids.append(top_ids)
        self.top_logprobs.append(top_lps)
        if not self.params.ignore_eos and (token_id in eos_ids or token_id in self.params.stop_token_ids):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
