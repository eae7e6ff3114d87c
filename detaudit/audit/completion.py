"""What one call to an OpenAI-compatible endpoint comes to: a `Completion` in the samples table's columns, or a
`CallError` that says why not (its `reason` from the vocabulary of the error_reason column); `CallResult` is a
request after its retries. The client (client.py) and the answer parser (answers.py) both speak in these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson

Api = Literal["chat", "completions"]
RAW_CHARS = 2048  # how much of a failed answer is kept (raw_answer)


class CallError(Exception):
    """One failed attempt: why (`reason`, from the vocabulary of the samples' error_reason column), whether another
    attempt may succeed, the server's Retry-After if any, and the start of what the server sent (`raw`)."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        reason: str,
        status: int | None = None,
        retry_after: float | None = None,
        raw: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.raw = raw


@dataclass
class Completion:
    """What one successful request returned, in the columns of the samples table (and only their types)."""

    text: str
    finish_reason: str | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    token_ids: list[int] | None = None
    tokens: list[str] | None = None
    token_bytes: list[bytes | None] | None = None
    logprobs: list[float] | None = None
    top_tokens: list[list[str]] | None = None
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens: proof of a prefix-cache hit

    def columns(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class CallResult:
    """A request after its retries: a Completion, or the reason it failed; never both, never neither."""

    completion: Completion | None
    error: str | None
    attempts: int
    started_at: datetime
    finished_at: datetime
    latency_s: float
    errors: list[str] = field(default_factory=list)
    error_reason: str | None = None  # the last attempt's CallError.reason
    raw_answer: str | None = None  # the last attempt's CallError.raw


def malformed(field: str, why: str) -> CallError:
    """An answer whose `field` does not fit the samples table (reason `malformed:<field>`)."""
    return CallError(f"malformed answer: {field}: {one_line(why)}", retryable=True, reason=f"malformed:{field}")


def one_line(text: str, limit: int = 200) -> str:
    """Server text for a message: one line, bounded, storable as UTF-8 (a lone surrogate becomes '?')."""
    head = text[: limit * 4]  # an 8 MiB error message is cut before it is worked on
    return " ".join(head.encode("utf-8", "replace").decode("utf-8").split())[:limit]


def text_of(value: Any) -> str:
    """A value the server sent, as one bounded line: a string as it is, anything else as compact JSON (str() of a
    deeply nested list would recurse past Python's limit)."""
    if isinstance(value, str):
        return one_line(value)
    try:
        return one_line(orjson.dumps(value).decode())
    except orjson.JSONEncodeError:  # nested past orjson's limit, or a lone surrogate
        return f"({type(value).__name__})"
