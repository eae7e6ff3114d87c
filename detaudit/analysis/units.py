"""What a completion is compared as: token ids when recorded, else token bytes, else token strings, else text.

The one place that decides the comparison unit. The runner's live counter keys single rows with
`completion_key`; the analysis (core.encode_sequences) takes, for a whole run, the first source of the same
precedence (`SOURCES`) that every ok row carries, by the same rule as `row_source`. So whenever every ok row
of a run carries the same capture (the runner asks every request for the same fields) the two agree on which
completions are "the same" -- unless the analysis abandons a record that disagrees with the text or the token
count on some row (row_checks), which one row alone cannot show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

Unit = Literal["token", "text"]
Source = Literal["token_ids", "token_bytes", "tokens", "text"]

# Richest first. token_bytes beats token strings: strings of split multi-byte characters are lossy.
SOURCES: tuple[Source, ...] = ("token_ids", "token_bytes", "tokens", "text")
_KEY_TAG: dict[Source, str] = {"token_ids": "ids", "token_bytes": "bytes", "tokens": "tokens", "text": "text"}


def unit_of(source: Source) -> Unit:
    """Token-level sources compare token by token; text compares character by character."""
    return "text" if source == "text" else "token"


def _row_has(row: Mapping[str, Any], source: Source) -> bool:
    value = row.get(source)
    if source == "text":
        return True  # a missing text is the empty completion
    if value is None:
        return False
    if source == "token_bytes":
        return all(b is not None for b in value)
    return True


def row_source(row: Mapping[str, Any]) -> Source | None:
    """The richest source an ok row carries; None for error rows."""
    if row.get("status") != "ok":
        return None
    return next(s for s in SOURCES if _row_has(row, s))


def completion_key(row: Mapping[str, Any]) -> tuple[str, Any] | None:
    """A hashable key equal for two ok rows exactly when their completions are the same; None for error rows."""
    source = row_source(row)
    if source is None:
        return None
    if source == "text":
        return ("text", row.get("text") or "")
    seq: Sequence[Any] = row[source]
    return (_KEY_TAG[source], tuple(seq))


def position_noun(unit: Unit, plural: bool = False) -> str:
    """What a position counts, in words: a text run's positions are characters, never tokens."""
    noun = "character" if unit == "text" else "token"
    return noun + "s" if plural else noun
