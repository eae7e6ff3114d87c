"""An arm's forks: the branching nodes of the prefix trie of its completions, planned on numbers, then decoded.

The plan (which forks and branches are listed, which completions their text needs) is made before any display
column is read; `fork_list` turns it into text once the decoder holds those completions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detaudit.analysis.core import Fork as TrieNode
from detaudit.analysis.core import Sequences, find_forks
from detaudit.analysis.decode import Decoder
from detaudit.analysis.summary_schema import Branch, Fork, ForkParent, Limits


@dataclass(frozen=True)
class Child:
    """One branch of a fork: samples on it, the branch's first completion, its most frequent one, and whether the
    completion continues past the fork (False: "ended here")."""

    count: int
    first: int
    modal: int
    continues: bool


@dataclass(frozen=True)
class PlannedFork:
    node: TrieNode
    prefix_count: int
    children: list[Child]  # by count, ties in token order ("ended" first)
    on_modal: int | None  # a completion on the most frequent branch that continues: where the margin is read
    prefix_of: int  # a completion holding the shared prefix


def plan_forks(
    seqs: Sequences, su: np.ndarray, sc: np.ndarray, neighbour_lcp: np.ndarray, limits: Limits
) -> tuple[list[PlannedFork], int, set[int]]:
    """Branching nodes of the prefix trie of these completions (sorted, with their counts): the numbers only.

    Returns (forks shown, total forks, completions the text of the forks needs).
    """
    if len(su) < 2:
        return [], 0, set()
    cum = np.concatenate([[0], np.cumsum(sc)])
    raw = find_forks(neighbour_lcp)
    # keep the forks most samples pass through, then list them by depth
    raw.sort(key=lambda f: (-(cum[f.last + 1] - cum[f.first]), f.position))
    shown = sorted(raw[: limits.forks], key=lambda f: (f.position, -(cum[f.last + 1] - cum[f.first])))
    plans: list[PlannedFork] = []
    needed: set[int] = set()
    for f in shown:
        children = []
        for a, b in f.children:
            best = a + int(np.argmax(sc[a : b + 1]))  # the most frequent completion on this branch
            continues = bool(seqs.lens[su[a]] > f.position)
            children.append(Child(int(cum[b + 1] - cum[a]), int(su[a]), int(su[best]), continues))
        children.sort(key=lambda c: (-c.count, int(seqs.rank[c.first])))  # by count, ties in token order
        on_modal = next((c.modal for c in children if c.continues), None)
        plans.append(PlannedFork(f, int(cum[f.last + 1] - cum[f.first]), children, on_modal, int(su[f.first])))
        needed.update(c.first for c in children[: limits.branches])
        needed.add(int(su[f.first]))
        if on_modal is not None:
            needed.add(on_modal)
    return plans, len(raw), needed


def fork_list(plans: list[PlannedFork], sorted_counts: np.ndarray, dec: Decoder, limits: Limits) -> list[Fork]:
    """The planned forks as the summary lists them, each naming its parent fork and branch."""
    parents = _parents([p.node for p in plans], sorted_counts, limits)
    return [
        Fork(
            position=p.node.position,
            prefix_count=p.prefix_count,
            prefix=dec.prefix(p.prefix_of, p.node.position),
            branches=[
                Branch(
                    token=dec.token(c.first, p.node.position),
                    token_id=dec.token_id(c.first, p.node.position),
                    count=c.count,
                )
                for c in p.children[: limits.branches]
            ],
            branches_total=len(p.children),
            margin=dec.margin(p.on_modal, p.node.position) if p.on_modal is not None else None,
            parent=parent,
        )
        for p, parent in zip(plans, parents, strict=True)
    ]


def _parents(shown: list[TrieNode], sorted_counts: np.ndarray, limits: Limits) -> list[ForkParent | None]:
    """Each listed fork's parent: the deepest listed fork above it and the branch it is on.

    Forks are lcp intervals of the sorted completions, so an ancestor's interval contains its descendants'.
    A fork whose ancestors are not listed (limits), or that sits on an unlisted branch, stays a root (None).
    """
    out: list[ForkParent | None] = []
    for g in shown:
        above = [
            fi for fi, f in enumerate(shown) if f.position < g.position and f.first <= g.first and g.last <= f.last
        ]
        if not above:
            out.append(None)
            continue
        fi = max(above, key=lambda i: shown[i].position)
        f = shown[fi]
        ranked = sorted(
            range(len(f.children)),
            key=lambda c: (-int(sorted_counts[f.children[c][0] : f.children[c][1] + 1].sum()), f.children[c][0]),
        )
        child = next(c for c, (a, b) in enumerate(f.children) if a <= g.first <= b)
        branch = ranked.index(child)
        out.append(ForkParent(fork=fi, branch=branch) if branch < limits.branches else None)
    return out
