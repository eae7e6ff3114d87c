"""What a completion is compared as: token ids when recorded, else token strings/bytes, else text.

The one place that decides the comparison unit, used by the analysis and by the runner's live counter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

Unit = Literal["token", "text"]


def completion_key(row: Mapping[str, Any]) -> tuple[str, Any] | None:
    """A hashable key equal for two ok rows exactly when their completions are the same; None for error rows."""
    if row.get("status") != "ok":
        return None
    ids: Sequence[int] | None = row.get("token_ids")
    if ids is not None:
        return ("ids", tuple(ids))
    token_bytes = row.get("token_bytes")
    if token_bytes is not None and all(b is not None for b in token_bytes):
        return ("bytes", tuple(token_bytes))
    tokens = row.get("tokens")
    if tokens is not None:
        return ("tokens", tuple(tokens))
    return ("text", row.get("text") or "")
