"""A growing sequence as OpenAI answers show it: released text that honours stop strings, and per-token logprobs."""

from __future__ import annotations

from typing import Any

from detaudit.engine.llm import Engine
from detaudit.engine.sequence import Sequence


class Output:
    """Turns a growing sequence into text and per-token records, honouring stop strings."""

    def __init__(self, engine: Engine, seq: Sequence, stops: list[str], as_ids: bool) -> None:
        self.engine, self.seq, self.stops, self.as_ids = engine, seq, stops, as_ids
        self.n_tokens = 0  # tokens released so far
        self.text = ""  # text released so far
        self.finish_reason: str | None = None

    def advance(self, n: int, done: bool) -> tuple[str, list[int]]:
        """Release tokens up to n: returns (new text, new token positions); sets finish_reason when over."""
        ids = self.seq.output_ids[:n]
        full = self.engine.decode(ids)
        hits = [(full.find(s), s) for s in self.stops if s in full]
        if hits:
            cut, stop = min(hits)
            n = self.n_tokens  # keep the tokens up to the one that completed the stop string, drop the rest
            while stop not in self.engine.decode(ids[:n]):
                n += 1
            full, done, self.finish_reason = full[:cut], True, "stop"
        if done:
            self.finish_reason = self.finish_reason or self.seq.finish_reason or "length"
        else:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                hold = max(hold, len(full) - len(full.rstrip("\ufffd")))
            full = full[: max(len(self.text), len(full) - hold)]
        new_text, self.text = full[len(self.text) :], full
        positions = list(range(self.n_tokens, n))
        self.n_tokens = n
        return new_text, positions

    def token(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.engine.token_str(token_id)

    def chat_logprobs(self, positions: list[int], k: int) -> dict[str, Any]:
        s = self.seq
        return {
            "content": [
                {
                    "token": self.token(s.output_ids[i]),
                    "logprob": s.logprobs[i],
                    "bytes": list(self.engine.token_bytes(s.output_ids[i])),
                    "top_logprobs": [
                        {"token": self.token(t), "logprob": lp, "bytes": list(self.engine.token_bytes(t))}
                        for t, lp in zip(s.top_ids[i][:k], s.top_logprobs[i][:k], strict=True)
                    ],
                }
                for i in positions
            ]
        }

    def completion_logprobs(self, positions: list[int], k: int) -> dict[str, Any]:
        s = self.seq
        return {
            "tokens": [self.token(s.output_ids[i]) for i in positions],
            "token_logprobs": [s.logprobs[i] for i in positions],
            "top_logprobs": [
                {self.token(t): lp for t, lp in zip(s.top_ids[i][:k], s.top_logprobs[i][:k], strict=True)}
                for i in positions
            ],
            "text_offset": [],
        }
