"""The finding that leads a report: one sentence per prompt, in plain words, built from the report model.

It says the verdict, the distinct completions per arm (with what each arm's load was), where the first fork is
and between which tokens, and what every other run (a local rerun) says, including whether a rerun's single
answer is the endpoint's serial answer. The renderers only lay the pieces out (tokens with visible whitespace).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from detaudit.reports.text import common_prefix

if TYPE_CHECKING:  # the report model imports this module; at run time only attributes are read
    from detaudit.reports.view_model import Cell, ForkNode, PromptSection, RunInfo

PREFIX_SHOWN = 40  # characters of the shared text before a fork quoted in the sentence


@dataclass(frozen=True)
class Piece:
    """A piece of a finding sentence: plain words, a model token (drawn with visible whitespace), or emphasis."""

    text: str
    kind: str = "text"  # "text", "token", "quote" (model text in quotes) or "strong"


# Local load scenarios (audit/workload.py) in words a reader needs no glossary for.
_SCENARIO_WORDS = {
    "serial": "one request at a time",
    "single": "copies of the prompt arriving over time, up to {c} per batch",
    "mixed": "among as many other prompts, up to {c} per batch",
    "prefix": "among prompts that extend it, up to {c} per batch",
}


def arm_words(kind: str, arm: str, concurrency: int | None, cache: str | None = None) -> str:
    """How an arm loaded its target: 'one request at a time', '16 requests in flight', ...; a cache arm adds its
    cache state ('one request at a time, warm cache')."""
    if kind == "local" and arm in _SCENARIO_WORDS:
        return _SCENARIO_WORDS[arm].format(c=concurrency or "?")
    if concurrency == 1:
        words = "one request at a time"
    else:
        words = f"{concurrency} requests in flight" if concurrency else arm
    return f"{words}, {cache} cache" if cache else words


def run_words(run: RunInfo) -> str:
    """'the endpoint', 'the local rerun with batch-invariant kernels'."""
    if run.kind == "endpoint":
        return "the endpoint"
    return f"the local rerun with {run.kernels} kernels" if run.kernels else "the local rerun"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _counts(cells: Sequence[Cell]) -> list[Piece]:
    """'1 distinct completion of 40 one request at a time and 4 of 40 with 16 requests in flight'."""
    out: list[Piece] = []
    for i, c in enumerate(cells):
        if i:
            out.append(Piece(" and " if i == len(cells) - 1 else ", "))
        words = arm_words(c.run.kind, c.arm, c.concurrency, c.cache_state)
        what = _plural(c.unique, "distinct completion") if i == 0 else str(c.unique)
        out += [Piece(what, "strong"), Piece(f" of {c.ok} ok ({words})")]
    return out


def _earliest(cells: Sequence[Cell]) -> ForkNode | None:
    roots = [f for c in cells for f in c.forks]
    return min(roots, key=lambda f: (f.position, -f.prefix_count), default=None)


def _fork(fork: ForkNode, noun: str) -> list[Piece]:
    """'; they fork at token 5, after “…was born in”, between “ Queens” ×33 and “ New” ×6'."""
    prefix = fork.prefix if len(fork.prefix) <= PREFIX_SHOWN else "…" + fork.prefix[-PREFIX_SHOWN:]
    out = [Piece(f"; the first fork is at {noun} {fork.position}")]
    if prefix:
        out += [Piece(", after "), Piece(prefix, "quote")]
    out.append(Piece(", between "))
    top = fork.branches[:2]
    for i, b in enumerate(top):
        if i:
            out.append(Piece(" and "))
        out += [Piece(b.token, "token") if b.token else Piece("the end of the completion"), Piece(f" ×{b.count}")]
    if len(fork.branches) > 2:
        out.append(Piece(f" (and {len(fork.branches) - 2} more)"))
    return out


def _serial(cells: Sequence[Cell]) -> Cell | None:
    """The most serial arm with an answer: the one a rerun's answer is compared with."""
    answered = [c for c in cells if c.modal_text is not None]
    return min(answered, key=lambda c: c.concurrency or 0, default=None)


def _rerun(run: RunInfo, cells: Sequence[Cell], reference: Cell | None, primary: RunInfo) -> list[Piece]:
    """'. The local rerun with batch-invariant kernels gave 1 distinct completion of 40 ok (...), the same answer
    as the endpoint one request at a time'."""
    out = [Piece(f". {run_words(run)[0].upper()}{run_words(run)[1:]} gave ")] + _counts(cells)
    if run.incomplete:
        out.append(Piece(f" (incomplete run, {run.incomplete})"))
    single = [c for c in cells if c.unique == 1 and c.modal_text is not None]
    if reference is None or reference.modal_text is None or len(single) != len(cells) or not single:
        return out
    answers = {c.modal_text for c in single}
    if len(answers) != 1:
        return out
    (answer,) = answers
    load = arm_words(primary.kind, reference.arm, reference.concurrency, reference.cache_state)
    serial = f"{run_words(primary)}'s answer when sent {load}"
    if answer == reference.modal_text:
        return [*out, Piece(f"; that answer is the same as {serial}")]
    at = common_prefix(answer, reference.modal_text)
    mine = answer[at : at + 12] or "(end)"
    theirs = reference.modal_text[at : at + 12] or "(end)"
    return [
        *out,
        Piece("; that answer "),
        Piece("differs", "strong"),
        Piece(f" from {serial}, from character {at} on: "),
        Piece(mine, "token"),
        Piece(" vs "),
        Piece(theirs, "token"),
    ]


def finding(section: PromptSection) -> list[Piece]:
    """One sentence for a prompt: the first run's verdict, counts and first fork, then what each other run says."""
    runs: list[RunInfo] = []
    for c in section.cells:
        if c.run not in runs:
            runs.append(c.run)
    if not runs:
        return []
    primary = runs[0]
    verdicts = dict(section.verdicts)
    cells = [c for c in section.cells if c.run is primary]
    out = [Piece(verdicts.get(primary.label, ""), "strong"), Piece(f": {run_words(primary)} gave ")]
    out += _counts(cells)
    if primary.incomplete:
        out.append(Piece(f" (incomplete run, {primary.incomplete}: only those are judged)"))
    fork = _earliest(cells)
    if fork is not None:
        out += _fork(fork, primary.noun)
    reference = _serial(cells)
    for run in runs[1:]:
        out += _rerun(run, [c for c in section.cells if c.run is run], reference, primary)
    return [*out, Piece(".")]
