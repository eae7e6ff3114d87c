"""Model text cut for display: short enough for a table cell, and never cut where the reader needs to look."""

from __future__ import annotations

SHORT_TEXT = 160
BEFORE_FORK = 60  # characters of a completion shown before the point where it leaves the modal one


def shorten(text: str | None, limit: int = SHORT_TEXT) -> str:
    """Long model text cut in the middle, so both the start and the end stay visible."""
    text = text or ""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def around(text: str, at: int | None, limit: int = SHORT_TEXT) -> tuple[str, int | None]:
    """`text` cut to about `limit` characters around character `at` (where it leaves another completion), so the
    divergence is always in view; returns the cut text and where `at` falls in it. Without `at`, the start is kept."""
    if at is None:
        return (text if len(text) <= limit else text[: limit - 1] + "…"), None
    start = max(0, at - BEFORE_FORK)
    stop = min(len(text), start + limit)
    head = ("…" if start else "") + text[start:at]
    return head + text[at:stop] + ("…" if stop < len(text) else ""), len(head)


def common_prefix(a: str, b: str) -> int:
    """Characters two texts share at the start."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
