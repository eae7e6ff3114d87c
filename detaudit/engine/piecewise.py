"""Steps with prefill through static padded buffers, replayed as piecewise CUDA graphs with eager attention between.

A decode-only step has one fixed shape per batch size, so graphs.py captures it whole. A step with prefill does
not: its attention depends on how the step's tokens split into sequences and on their context lengths, which
change every step. As vLLM V1 does, the step's token count is padded to a token bucket (2^k and 1.5 x 2^k from 16,
up to ``--max-batched-tokens``) and the model is cut at its attention calls:
the pieces between them — embedding + layer 0's pre-attention, then for each layer its o_proj + MLP + the next
layer's pre-attention (norm, qkv, q/k norm, RoPE, KV write), the last layer's o_proj + MLP — are captured once per
bucket into one graph pool, and attention runs eagerly between replays on the real (unpadded) tokens. The final
norm and the lm_head run eagerly on the rows whose logits are needed, exactly as in CausalLM.forward.

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

from detaudit.errors import UsageError

if TYPE_CHECKING:
    from detaudit.engine.model_runner import ModelRunner


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

    def __init__(self, runner: ModelRunner, max_tokens: int, *, capture: bool, pool: tuple | None = None) -> None:
        # The runner's parts, not the runner (no reference cycle: see graphs.DecodeGraphs).
        self.model, self.kv_caches, self.attn_fn = runner.model, runner.kv_caches, runner.attn_fn
        self.kernels, self.device = runner.kernels, runner.device
        self.page, self.dummy_block = runner.block_size, runner.dummy_block
        self.layers = runner.model.model.layers
        self.buckets = token_buckets(max_tokens)
        n, dev, spec = self.buckets[-1], runner.device, runner.model.spec
        dtype = runner.model.lm_head.weight.dtype
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), self.dummy_block * self.page, dtype=torch.int64, device=dev)
        self.hidden = torch.zeros(n, spec.hidden_size, dtype=dtype, device=dev)
        self.q = torch.zeros(n, spec.num_heads, spec.head_dim, dtype=dtype, device=dev)
        self.attn_out = torch.zeros(n, spec.num_heads, spec.head_dim, dtype=dtype, device=dev)
        self.cos = torch.zeros(n, 1, spec.head_dim, dtype=dtype, device=dev)
        self.sin = torch.zeros(n, 1, spec.head_dim, dtype=dtype, device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.replays = 0
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
        return next(b for b in self.buckets if b >= n)

    def run(
        self, ids: list[int], positions: list[int], slots: list[int], attn: tuple[torch.Tensor, ...], rows: torch.Tensor
    ) -> torch.Tensor:
        """Logits of `rows` for a step of len(ids) real tokens; `attn` is its unpadded (block_tables, cu_seqlens_q,
        context_lens). Call under the step's kernel context."""
        n = len(ids)
        bs = self.bucket(n)
        pad = bs - n
        for buf, values, fill in (
            (self.input_ids, ids, 0),
            (self.positions, positions, 0),
            (self.slot_mapping, slots, self.dummy_block * self.page),
        ):
            buf[:bs].copy_(torch.tensor(values + [fill] * pad, dtype=buf.dtype), non_blocking=True)
        replayed = False
        for i in range(len(self.layers) + 1):
            graph = self.graphs.get((bs, i))
            if graph is None:
                self._piece(i, bs)
            else:
                graph.replay()
                replayed = True
            if i < len(self.layers):
                k_cache, v_cache = self.kv_caches[i]
                o = self.attn_fn(self.q[:n], k_cache, v_cache, *attn, self.layers[i].self_attn.scale)
                self.attn_out[:n].copy_(o)
        self.replays += replayed
        return self.model.lm_head(self.model.model.norm(self.hidden[rows]))

    def _piece(self, i: int, bs: int) -> None:
        """Piece i over the first `bs` rows: layer i-1's second half (or the embedding, for i = 0), then layer i's
        pre-attention (none after the last layer). The same module calls as CausalLM.forward, in the same order."""
        if i == 0:
            x = self.model.model.embed_tokens(self.input_ids[:bs])
            cos, sin = self.model.rotary(self.positions[:bs], x.dtype)
            self.cos[:bs].copy_(cos)
            self.sin[:bs].copy_(sin)
        else:
            prev = self.layers[i - 1]
            x = self.hidden[:bs] + prev.self_attn.o_proj(self.attn_out[:bs].reshape(bs, -1))
            x = prev.mlp_residual(x)
        self.hidden[:bs].copy_(x)
        if i < len(self.layers):
            layer, (k_cache, v_cache) = self.layers[i], self.kv_caches[i]
            q = layer.self_attn.project(layer.input_layernorm(x), (self.cos[:bs], self.sin[:bs]),
                                        self.slot_mapping[:bs], k_cache, v_cache)  # fmt: skip
            self.q[:bs].copy_(q)

    def _capture(self, pool: tuple | None) -> None:
        from detaudit.engine.model_runner import kernel_context

        dev = self.device
        pieces = range(len(self.layers) + 1)
        with torch.cuda.device(dev), torch.inference_mode(), kernel_context(self.kernels):
            for bs in reversed(self.buckets):  # largest first: smaller buckets reuse its pool memory
                # Padding-only inputs: every K/V write goes to the dummy block.
                self.input_ids[:bs].zero_()
                self.positions[:bs].zero_()
                self.slot_mapping[:bs].fill_(self.dummy_block * self.page)
                for i in pieces:  # warm-up: compiles, one-time device checks, nothing of it inside a capture
                    self._piece(i, bs)
                torch.cuda.synchronize(dev)
                for i in pieces:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._piece(i, bs)
                    pool = graph.pool() if pool is None else pool
                    self.graphs[(bs, i)] = graph
        torch.cuda.synchronize(dev)
