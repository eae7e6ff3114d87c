"""Samples of an ideal sampler at a known temperature from a synthetic language model (issue #18 validation).

The model: every prefix has K candidate tokens (ids 0..K-1, best first) whose logprobs are drawn once per prefix
(a node of the trie), so samples that share a prefix see the same distribution and a sample that left the modal
path continues from its own branch. The top-1 - top-2 margin is log-uniform over [MARGIN_LOW, MARGIN_HIGH]: no
scale is special, so every tested T finds near-ties of its own order (a model whose margins cluster at one scale
would be informative about temperatures of that scale only). Further candidates trail by exponential gaps. Each
sample draws from softmax(logprobs / T) over the K candidates (Gumbel-max): the estimator's model exactly
(T = 0: the top candidate; the model's draws then do not depend on n).
Shared by tests/test_background_temperature.py and benchmarks/background_temperature.py.
"""

from __future__ import annotations

import numpy as np

MARGIN_LOW, MARGIN_HIGH = 1e-6, 10.0


def simulate(
    rng: np.random.Generator, n: int, length: int, k: int, temperature: float, tie_share: float = 1.0
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """n samples of `length` tokens at `temperature`: per sample its tokens, top-k ids and top-k logprobs.

    tie_share < 1: only that share of nodes draws its margin as above, the others a margin in [10, 20] (no flip
    at the tested temperatures): the sparse-flip regime of a real model, where most positions are clear-cut."""
    node = np.zeros(n, dtype=np.int64)
    tokens = np.empty((n, length), dtype=np.int64)
    lps = np.empty((n, length, k))
    for p in range(length):
        uniq, inv = np.unique(node, return_inverse=True)
        margin = np.exp(rng.uniform(np.log(MARGIN_LOW), np.log(MARGIN_HIGH), len(uniq)))
        if tie_share < 1:
            margin = np.where(rng.random(len(uniq)) < tie_share, margin, rng.uniform(10.0, 20.0, len(uniq)))
        trail = np.cumsum(rng.exponential(2.0, (len(uniq), k - 2)), axis=1)
        logits = np.hstack([np.zeros((len(uniq), 1)), -margin[:, None], -margin[:, None] - trail])
        logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
        lp = logits[inv.ravel()]
        scores = lp / temperature + rng.gumbel(size=(n, k)) if temperature > 0 else lp  # T = 0: greedy
        choice = np.argmax(scores, axis=1)
        tokens[:, p], lps[:, p] = choice, lp
        node = inv.ravel() * k + choice
    ids = np.broadcast_to(np.arange(k), (length, k))
    return list(tokens), [ids] * n, list(lps)
