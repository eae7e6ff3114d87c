"""Decode-only steps through static padded buffers, replayed from one CUDA graph per batch-size bucket.

An eager decode step of a 28-layer model is hundreds of kernel launches, and with batch-invariant kernels every
matmul, norm and reduction also passes through a Python ``torch.library`` override before its Triton launch: on
a GPU the step is bound by host overhead, not by the GPU. As vLLM and nano-vllm do, a step in which every sequence
adds exactly one token to a complete prompt is padded to the next bucket size (1, 2, 4, 8, then multiples of 8 up
to ``max_batch``) and replayed from a graph captured once for that size; prefill and mixed steps stay eager.

Padding rows are dummies: token 0 at position 0, written to and read from a KV block that the block manager never
hands out (``KVCache.dummy_block``), context length 1; their logits are ignored. With batch-invariant kernels a real
row's bits do not depend on the rows beside it, so padding and replay give the same bits as the eager unpadded step.

All graphs are captured up front, largest first, into one shared memory pool: the warm-up before each capture
compiles that size's Triton kernels and runs the kernels' one-time device checks (matmul config agreement, the
attention split-launch check), none of which may run inside a capture; the startup cost is paid once, outside
any timed request; and a GPU short of memory fails at startup, not in the middle of a run.

A batch goes to the captured size that replays fastest among those that hold it, not always the nearest: matmul
tile tables are tuned per range of rows, and a larger size can be the faster one (on the H200 the bundled kernels
replayed a 128-row step faster than a 96-row one, benchmarks/RESULTS.md). Each graph's replay is timed once
after capture, on dummy rows, and the times become the route (detaudit.engine.graph_timing). With bundled kernels
padding never changes a real row's bits, so the route changes only the time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from detaudit.engine.config import kernel_context
from detaudit.engine.graph_timing import cheapest_route, replay_ms
from detaudit.engine.model import AttentionInputs, PagedModel, StepInputs
from detaudit.engine.scheduler import ScheduledBatch
from detaudit.engine.sequence import Sequence
from detaudit.errors import UsageError

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE as GraphPool  # what CUDAGraph.pool() returns; torch names it privately


def decode_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes with a graph each: 1, 2, 4, 8, multiples of 8, and max_batch itself."""
    sizes = {s for s in (1, 2, 4) if s < max_batch} | set(range(8, max_batch, 8)) | {max_batch}
    return sorted(sizes)


def is_decode_only(batch: ScheduledBatch) -> bool:
    """Every sequence adds exactly its one newest token to a complete prompt (and generates: not score-only)."""
    return all(
        n == 1 and not s.score_only and s.num_cached + 1 == len(s)
        for s, n in zip(batch.seqs, batch.num_new, strict=True)
    )


class DecodeGraphs:
    """Static input/output buffers for padded decode steps and, when `capture`, their CUDA graphs."""

    def __init__(self, paged: PagedModel, max_batch: int, *, capture: bool) -> None:
        self.model, self.cache, self.kv_caches = paged.model, paged.cache, paged.cache.layers
        self.attn_fn, self.kernels, self.device = paged.attn_fn, paged.kernels, paged.device
        self.buckets = decode_buckets(max_batch)
        n, dev = self.buckets[-1], paged.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, paged.cache.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=dev)  # one query per row, always
        head = paged.model.lm_head.weight
        self.logits = torch.empty(n, head.shape[0], dtype=head.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: GraphPool | None = None  # the graphs' memory pool, which the piecewise prefill graphs share
        self.replays = 0
        self.replay_ms: dict[int, float] = {}  # per size, measured after capture
        self.route = {b: b for b in self.buckets}  # padded size -> the size that runs it
        if capture:
            try:
                self._capture()
            except torch.OutOfMemoryError:
                self.graphs.clear()
                raise UsageError(
                    "capturing the decode CUDA graphs ran out of GPU memory; lower --max-batch or "
                    "--max-model-len, or pass --no-cuda-graphs"
                ) from None

    def bucket(self, n: int) -> int:
        return self.route[next(b for b in self.buckets if b >= n)]

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [len(batch.seqs), vocab] of a decode-only step (call under the step's kernel context)."""
        n = len(batch.seqs)
        bs = self.bucket(n)
        self._fill(batch.seqs, bs)
        graph = self.graphs.get(bs)
        if graph is None:
            self._forward(bs)
        else:
            graph.replay()
            self.replays += 1
        return self.logits[:n]

    def _fill(self, seqs: list[Sequence], bs: int) -> None:
        """Copy the step's inputs into the first `bs` rows of the static buffers; rows past the batch are dummies."""
        cache = self.cache
        ids, pos, slots, ctx = [], [], [], []
        for seq in seqs:
            p = seq.num_cached
            ids.append(seq.token_at(p))
            pos.append(p)
            slots.append(cache.slot(seq.block_table, p))
            ctx.append(p + 1)
        pad = bs - len(seqs)
        ids += [0] * pad
        pos += [0] * pad
        slots += [cache.dummy_slot] * pad
        ctx += [1] * pad
        for buf, values in (
            (self.input_ids, ids),
            (self.positions, pos),
            (self.slot_mapping, slots),
            (self.context_lens, ctx),
        ):
            buf[:bs].copy_(torch.tensor(values, dtype=buf.dtype), non_blocking=True)
        self.block_tables[:bs].copy_(cache.block_tables([s.block_table for s in seqs], bs), non_blocking=True)

    def _forward(self, bs: int) -> None:
        attention = AttentionInputs(self.block_tables[:bs], self.cu_seqlens_q[: bs + 1], self.context_lens[:bs])
        inp = StepInputs(positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs], attention=attention)
        self.logits[:bs] = self.model(self.input_ids[:bs], inp, self.kv_caches, self.attn_fn, None)

    def _capture(self) -> None:
        pool: GraphPool | None = None
        dev = self.device
        # The capture stream belongs to the current device: make that the engine's (e.g. cuda:1).
        with torch.cuda.device(dev), torch.inference_mode(), kernel_context(self.kernels):
            for bs in reversed(self.buckets):  # largest first: smaller graphs reuse its pool memory
                self._fill([], bs)
                self._forward(bs)  # warm-up: compiles, one-time device checks, nothing of it inside the capture
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(bs)
                pool = graph.pool() if pool is None else pool
                self.graphs[bs] = graph
            # Timed on the inputs the captures left: every row a dummy (context 1), as padding rows are.
            self.replay_ms = {bs: replay_ms([g]) for bs, g in self.graphs.items()}
        self.route = cheapest_route(self.replay_ms)
        self.pool = pool
