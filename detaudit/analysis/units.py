"""What a completion is compared as: token ids when recorded, else token bytes, else token strings, else text.

The one place that decides the comparison unit. The runner's live counter keys single rows with
`completion_key`; the analysis picks one source for a whole table with `table_source`. Both walk the same
precedence (`SOURCES`), so whenever every ok row of a run carries the same capture (the runner asks every
request for the same fields) the two agree on which completions are "the same".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

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


def table_source(table: pa.Table, default: Source = "text") -> Source:
    """The richest source that every ok row of `table` carries (the same test as `row_source`, column-wise).

    With no ok row at all nothing says what was captured, so `default` (the manifest's capture) is returned.
    """
    ok = pc.equal(table.column("status"), "ok").fill_null(False)
    if not pc.any(ok).as_py():
        return default
    for source in SOURCES[:-1]:
        if source not in table.column_names:
            continue
        col = table.column(source).filter(ok)
        if col.null_count:
            continue
        if source == "token_bytes" and pc.list_flatten(col).null_count:
            continue
        return source
    return "text"
