"""Turning fork positions back into text a person can read.

Only a handful of rows are ever decoded (one representative per shown completion or fork branch): the summary
reads their display columns alone, and this turns single cells into Python values. Token bytes are preferred:
a multi-byte UTF-8 character split across tokens is shown whole, on the branch that decides it, rather than as
replacement characters. With only token ids, a token shows as "<id:123>".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from detaudit.analysis.core import Sequences

PREFIX_DISPLAY_CHARS = 80
ELLIPSIS = "…"
# A completion's text in the summary: its first 6 KiB and last 2 KiB of characters (a 10 MB answer kept whole was
# 10 MB of summary.json and report per distinct completion, #15); its full length is given beside it.
TEXT_HEAD_CHARS, TEXT_TAIL_CHARS = 6144, 2048
TOKEN_DISPLAY_CHARS = 256  # one token shown at a fork or in a context (a server may send a megabyte "token")


def shorten_tail(text: str, limit: int = PREFIX_DISPLAY_CHARS) -> str:
    """Keep the end of a prefix (the part next to the fork), marking the cut with an ellipsis."""
    return text if len(text) <= limit else ELLIPSIS + text[-(limit - 1) :]


def clip_text(text: str, head: int = TEXT_HEAD_CHARS, tail: int = TEXT_TAIL_CHARS) -> str:
    """A long text as its start and its end, the cut marked with how many characters it dropped."""
    cut = len(text) - head - tail
    if cut <= 0:
        return text
    return f"{text[:head]}{ELLIPSIS}[{cut} characters cut]{ELLIPSIS}{text[len(text) - tail :]}"


def _utf8_missing(data: bytes) -> tuple[int, int]:
    """(bytes of an unfinished trailing UTF-8 character, bytes it still lacks); (0, 0) when data ends cleanly."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return (back, need - back) if need > back else (0, 0)
    return 0, 0


class Decoder:
    """Text of completions, prefixes and branch tokens, for the source the completions were compared as."""

    def __init__(self, display: pa.Table, uniques: np.ndarray, seqs: Sequences) -> None:
        """`display` holds the display columns of one sample of each of `uniques` (same order); nothing else."""
        self.display = display
        self.where = {int(u): i for i, u in enumerate(uniques)}
        self.seqs = seqs
        self._cache: dict[tuple[str, int], Any] = {}

    def _cell(self, column: str, u: int) -> Any:
        """Column `column` of the sample that represents distinct completion u."""
        key = (column, u)
        if key not in self._cache:
            self._cache[key] = self.display.column(column)[self.where[u]].as_py()
        return self._cache[key]

    def _bytes(self, u: int) -> list[bytes] | None:
        tb = self._cell("token_bytes", u)
        return tb if tb is not None and all(b is not None for b in tb) else None

    def completion_text(self, u: int) -> str:
        """The completion as the target returned it (the text column), else joined from its tokens."""
        if self.seqs.source == "text":
            return self.seqs.texts[u]
        text = self._cell("text", u)
        if text is not None:
            return text
        tb = self._bytes(u)
        if tb is not None:
            return b"".join(tb).decode("utf-8", errors="replace")
        tokens = self._cell("tokens", u)
        if tokens is not None:
            return "".join(t or "" for t in tokens)
        return "".join(f"<id:{i}>" for i in self.seqs.seq(u).tolist())

    def prefix(self, u: int, position: int) -> str:
        """The first `position` units of completion u, whole characters only, shortened at the front."""
        if self.seqs.source == "text":
            return shorten_tail(self.seqs.texts[u][:position])
        tb = self._bytes(u)
        if tb is not None:
            data = b"".join(tb[:position])
            cut, _ = _utf8_missing(data)
            return shorten_tail(data[: len(data) - cut].decode("utf-8", errors="replace"))
        tokens = self._cell("tokens", u)
        if tokens is not None:
            return shorten_tail("".join(t or "" for t in tokens[:position]))
        ids = self.seqs.seq(u)[:position].tolist()
        return shorten_tail("".join(f"<id:{i}>" for i in ids))

    def token(self, u: int, position: int) -> str:
        """The unit at `position` of completion u ("" when u ends there), with a split character made whole, clipped
        to TOKEN_DISPLAY_CHARS."""
        return clip_text(self._token(u, position), TOKEN_DISPLAY_CHARS // 2, TOKEN_DISPLAY_CHARS // 2)

    def _token(self, u: int, position: int) -> str:
        if position >= self.seqs.lens[u]:
            return ""
        if self.seqs.source == "text":
            return self.seqs.texts[u][position]
        tb = self._bytes(u)
        if tb is not None:
            before = b"".join(tb[:position])
            carried, _ = _utf8_missing(before)
            data = before[len(before) - carried :] + tb[position]
            _, missing = _utf8_missing(data)
            if missing:
                data += b"".join(tb[position + 1 : position + 4])[:missing]
            return data.decode("utf-8", errors="replace")
        tokens = self._cell("tokens", u)
        if tokens is not None and tokens[position] is not None:
            return tokens[position]
        return f"<id:{int(self.seqs.seq(u)[position])}>"

    def units(self, u: int, source: str) -> list | None:
        """Completion u as a list of `source` units (ids, bytes, strings or characters); None if not recorded."""
        if source == "text":
            return list(self.completion_text(u))
        if source == self.seqs.source == "token_ids":
            return self.seqs.seq(u).tolist()
        if self.seqs.source == "text":
            return None
        value = self._cell(source, u)
        if value is None or (source == "token_bytes" and any(b is None for b in value)):
            return None
        return value

    def token_id(self, u: int, position: int) -> int | None:
        if self.seqs.source != "token_ids" or position >= self.seqs.lens[u]:
            return None
        return int(self.seqs.seq(u)[position])

    def margin(self, u: int, position: int) -> float | None:
        """Top-1 minus top-2 logprob at `position` in the sample representing u; None when not recorded."""
        if self.seqs.source == "text":
            return None  # positions are characters; logprobs are per token
        top = self._cell("top_logprobs", u)
        if top is None or position >= len(top) or top[position] is None:
            return None
        vals = sorted((v for v in top[position] if v is not None), reverse=True)
        return round(float(vals[0] - vals[1]), 6) if len(vals) >= 2 else None  # float32 noise off
