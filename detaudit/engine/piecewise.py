"""Steps with prefill through static padded buffers, replayed as piecewise CUDA graphs with eager attention between.

A decode-only step has one fixed shape per batch size, so graphs.py captures it whole. A step with prefill does
not: its attention depends on how the step's tokens split into sequences and on their context lengths, which
change every step. As vLLM V1 does, the step's token count is padded to a token bucket (2^k and 1.5 x 2^k from 16,
up to ``--max-batched-tokens``) and the model is cut at its attention calls:
the pieces between them — the model's own (``CausalLM.piece``: embedding + layer 0's pre-attention, then for each
layer its o_proj + MLP + the next layer's pre-attention, the last layer's o_proj + MLP) — are captured once per
bucket into one graph pool, and attention (``CausalLM.attend``) runs eagerly between replays on the real
(unpadded) tokens. The final norm and the lm_head (``CausalLM.logits``) run eagerly on the rows whose logits are
needed. These are the calls CausalLM.forward makes, in its order; only the buffers in between are this module's.

As for decode graphs (graphs.py), a step goes to the bucket whose pieces replay fastest among those that hold it.

Padding rows are token 0 at position 0 whose K/V go to the dummy block (see graphs.py); attention never reads
them, and their hidden states are dropped. With batch-invariant kernels a real row's bits do not depend on the
rows beside it (every piece is row-wise or a row-invariant matmul), so the padded piecewise step gives the bits of
the eager unpadded one. Pieces pass their results through static buffers allocated outside the pool (hidden
state, q, attention output, RoPE's cos/sin), so no tensor made inside a capture outlives it and all graphs of
all buckets can share one pool. Memory: those buffers for the largest bucket plus the pool, which holds the
largest piece's temporaries once (the MLP's [bucket, 2 x intermediate] of the largest bucket).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from detaudit.engine.config import kernel_context
from detaudit.engine.graph_timing import cheapest_route, replay_ms
from detaudit.engine.model import AttentionInputs, Carry, PagedModel
from detaudit.errors import UsageError

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE as GraphPool  # what CUDAGraph.pool() returns; torch names it privately


def token_buckets(max_tokens: int) -> list[int]:
    """Padded token counts with graphs: 16, 24, 32, 48, 64, 96, ... (2^k and 1.5 x 2^k) below max_tokens, and
    max_tokens itself; past 16 tokens, padding wastes at most a third of a step."""
    sizes, p = {max_tokens}, 16
    while p < max_tokens:
        sizes |= {s for s in (p, p + p // 2) if s < max_tokens}
        p *= 2
    return sorted(sizes)


class PiecewiseGraphs:
    """Static buffers for padded steps with prefill and, when `capture`, one CUDA graph per (bucket, piece)."""

    def __init__(self, paged: PagedModel, max_tokens: int, *, capture: bool, pool: GraphPool | None = None) -> None:
        self.model, self.cache, self.kv_caches = paged.model, paged.cache, paged.cache.layers
        self.attn_fn, self.kernels, self.device = paged.attn_fn, paged.kernels, paged.device
        self.buckets = token_buckets(max_tokens)
        n, dev, spec = self.buckets[-1], paged.device, paged.model.spec
        dtype = paged.model.lm_head.weight.dtype
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), paged.cache.dummy_slot, dtype=torch.int64, device=dev)
        self.hidden = torch.zeros(n, spec.hidden_size, dtype=dtype, device=dev)
        self.q = torch.zeros(n, spec.num_heads, spec.head_dim, dtype=dtype, device=dev)
        self.attn_out = torch.zeros(n, spec.num_heads, spec.head_dim, dtype=dtype, device=dev)
        self.cos = torch.zeros(n, 1, spec.head_dim, dtype=dtype, device=dev)
        self.sin = torch.zeros(n, 1, spec.head_dim, dtype=dtype, device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.replays = 0
        self.replay_ms: dict[int, float] = {}  # per bucket, all its pieces, measured after capture
        self.route = {b: b for b in self.buckets}  # bucket -> the bucket that runs it
        if capture:
            try:
                self._capture(pool)
            except torch.OutOfMemoryError:
                self.graphs.clear()
                raise UsageError(
                    "capturing the prefill CUDA graphs ran out of GPU memory; lower "
                    "--max-batched-tokens, --max-batch or --max-model-len, or pass --no-cuda-graphs"
                ) from None

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.buckets[-1]

    def bucket(self, n: int) -> int:
        return self.route[next(b for b in self.buckets if b >= n)]

    def cost_ms(self, n: int) -> float:
        """Replay milliseconds (measured after capture) of the graphs that run a step of `n` tokens."""
        return self.replay_ms[self.bucket(n)]

    def run(
        self, ids: list[int], positions: list[int], slots: list[int], attention: AttentionInputs, rows: torch.Tensor
    ) -> torch.Tensor:
        """Logits of `rows` for a step of len(ids) real tokens; `attention` is its unpadded block tables,
        cu_seqlens_q and context lengths. Call under the step's kernel context."""
        n = len(ids)
        bs = self.bucket(n)
        pad = bs - n
        for buf, values, fill in (
            (self.input_ids, ids, 0),
            (self.positions, positions, 0),
            (self.slot_mapping, slots, self.cache.dummy_slot),
        ):
            buf[:bs].copy_(torch.tensor(values + [fill] * pad, dtype=buf.dtype), non_blocking=True)
        replayed = False
        for i in range(self.model.num_pieces):
            if i > 0:  # attention between pieces i-1 and i, on the real rows only
                o = self.model.attend(i - 1, self.q[:n], self.kv_caches, attention, self.attn_fn)
                self.attn_out[:n].copy_(o)
            graph = self.graphs.get((bs, i))
            if graph is None:
                self._piece(i, bs)
            else:
                graph.replay()
                replayed = True
        self.replays += replayed
        return self.model.logits(self.hidden, rows)

    def _piece(self, i: int, bs: int) -> None:
        """CausalLM.piece i over the first `bs` rows, from and into the static buffers."""
        carry = None if i == 0 else Carry(self.hidden[:bs], (self.cos[:bs], self.sin[:bs]), None, self.attn_out[:bs])
        out = self.model.piece(
            i, carry, self.input_ids[:bs], self.positions[:bs], self.slot_mapping[:bs], self.kv_caches
        )
        self.hidden[:bs].copy_(out.hidden)
        if i == 0:
            self.cos[:bs].copy_(out.rope[0])
            self.sin[:bs].copy_(out.rope[1])
        if out.q is not None:
            self.q[:bs].copy_(out.q)

    def _capture(self, pool: GraphPool | None) -> None:
        dev = self.device
        pieces = range(self.model.num_pieces)
        with torch.cuda.device(dev), torch.inference_mode(), kernel_context(self.kernels):
            for bs in reversed(self.buckets):  # largest first: smaller buckets reuse its pool memory
                # Padding-only inputs: every K/V write goes to the dummy block.
                self.input_ids[:bs].zero_()
                self.positions[:bs].zero_()
                self.slot_mapping[:bs].fill_(self.cache.dummy_slot)
                for i in pieces:  # warm-up: compiles, one-time device checks, nothing of it inside a capture
                    self._piece(i, bs)
                torch.cuda.synchronize(dev)
                for i in pieces:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._piece(i, bs)
                    pool = graph.pool() if pool is None else pool
                    self.graphs[(bs, i)] = graph
            pieces_of = {bs: [self.graphs[(bs, i)] for i in pieces] for bs in self.buckets}
            self.replay_ms = {bs: replay_ms(graphs) for bs, graphs in pieces_of.items()}
        self.route = cheapest_route(self.replay_ms)
