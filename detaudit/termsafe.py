"""Text from outside (an endpoint, a run directory, a prompt file) made safe to show on a terminal or in a report.

The terminal rule is Python's repr rule: every character `str.isprintable()` rejects (C0 and C1 controls, DEL,
bidi overrides and isolates, zero-width and other format characters, line and paragraph separators, lone
surrogates) is shown as its escape (`\\x1b`, `\\u202e`). So a model name can neither drive the terminal (an OSC
window title, a screen clear, a carriage return that overprints a line) nor reorder or hide what is shown, and a
lone surrogate cannot crash the encoder of stdout. Completion text is shown with `quoted`, the same rule in quotes.

Reports (HTML, Markdown) keep the characters a reader needs but draw the bidi controls as visible marks.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Bidi embeddings, overrides and isolates, and the marks that steer them: they reorder what a reader sees.
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(ch: str) -> str:
    return repr(ch)[1:-1]  # '\x1b', '\u202e', '\t': what repr shows inside the quotes


def safe(text: object, *, keep_newlines: bool = False) -> str:
    """`text` (any object, as str) with every non-printable character shown as its escape.

    keep_newlines: a message that is several lines by design (a server's last log lines) keeps its line breaks;
    nothing else is kept, not even a carriage return."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() or (keep_newlines and ch == "\n") else _escape(ch) for ch in s)


def json_text(doc: Any) -> str:
    """`doc` as indented JSON for stdout (--json): exact, and readable in any script, but every character `safe`
    would escape is written as a \\uXXXX escape (json.dumps escapes only C0 controls when it keeps non-ASCII)."""
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    if text.isprintable():
        return text
    # Outside strings JSON holds only ASCII punctuation, digits, letters, spaces and (indent) newlines, so every
    # character replaced here sits inside a string, where a \\u escape means the same character.
    return "".join(ch if ch.isprintable() or ch == "\n" else _json_escape(ch) for ch in text)


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def quoted(text: str) -> str:
    """Completion text (a token, a prefix) in quotes, escaped by the same rule as `safe`."""
    return repr(text)


def bidi_marker(ch: str) -> str:
    """The visible stand-in for one bidi control in a report, e.g. ⟨U+202E⟩."""
    return f"⟨U+{ord(ch):04X}⟩"


def visible_bidi(text: str) -> str:
    """`text` with every bidi control replaced by its visible marker (for reports, before escaping)."""
    return BIDI_CONTROLS.sub(lambda m: bidi_marker(m.group()), text)
