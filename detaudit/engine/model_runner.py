"""Turns a scheduled batch into packed tensors, runs the model over the paged KV cache and samples."""

from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import Any

import torch

from detaudit.engine.config import ModelSpec
from detaudit.engine.graphs import DecodeGraphs, is_decode_only
from detaudit.engine.model import StepInputs, load_model
from detaudit.engine.piecewise import PiecewiseGraphs
from detaudit.engine.sampler import sample
from detaudit.engine.scheduler import ScheduledBatch
from detaudit.errors import UsageError


def kernel_context(kernels: str) -> contextlib.AbstractContextManager:
    """`batch-invariant` runs the whole step under detaudit.kernels' aten overrides; `stock` uses plain torch ops."""
    if kernels == "batch-invariant":
        from detaudit.kernels import batch_invariant

        return batch_invariant()
    return contextlib.nullcontext()


class ModelRunner:
    def __init__(
        self,
        spec: ModelSpec,
        config: Any,
        *,
        device: str,
        dtype: torch.dtype,
        kernels: str,
        num_blocks: int,
        block_size: int,
        max_blocks_per_seq: int,
        max_batch: int,
        max_batched_tokens: int,
        cuda_graphs: bool,
    ) -> None:
        from detaudit.kernels.attention import paged_attention

        self.device = torch.device(device)
        self.kernels = kernels
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.model = load_model(spec, config, device, dtype)
        # One block past the block manager's: padding rows of graph-replayed decode steps write and read only it.
        self.dummy_block = num_blocks
        shape = (num_blocks + 1, block_size, spec.num_kv_heads, spec.head_dim)
        try:
            self.kv_caches = [
                (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(spec.num_layers)
            ]
        except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; on CPU only the message tells
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            raise UsageError(
                f"the KV cache ({num_blocks} blocks of {block_size} tokens per layer) does not fit in {device} memory; "
                "lower --max-batch or --max-model-len"
            ) from None
        self.attn_fn = partial(paged_attention, batch_invariant=kernels == "batch-invariant")
        # Decode-only steps replay whole-step CUDA graphs (detaudit.engine.graphs), steps with prefill piecewise ones
        # (detaudit.engine.piecewise), in one shared graph pool; None runs those steps eagerly, unpadded.
        self.decode_graphs: DecodeGraphs | None = None
        self.prefill_graphs: PiecewiseGraphs | None = None
        self.graph_stats: dict[str, float] | None = None  # capture seconds (start-up cost), for the manifest
        if cuda_graphs and self.device.type == "cuda":
            t0 = time.perf_counter()
            self.decode_graphs = DecodeGraphs(self, max_batch, capture=True)
            t1 = time.perf_counter()
            self.prefill_graphs = PiecewiseGraphs(self, max_batched_tokens, capture=True,
                                                  pool=self.decode_graphs.pool)  # fmt: skip
            self.graph_stats = {
                "decode_capture_s": round(t1 - t0, 2),
                "prefill_capture_s": round(time.perf_counter() - t1, 2),
            }

    def _host_inputs(
        self, batch: ScheduledBatch
    ) -> tuple[list[int], list[int], list[int], tuple, list[int], list[tuple]]:
        """Token ids, positions and cache slots (host lists), attention's block tables, cu_seqlens_q and context
        lengths (device), the token rows whose logits are needed, and per sequence (seq, first logit row, count)."""
        ids, positions, slots, cu, ctx, tables, rows, spans = [], [], [], [0], [], [], [], []
        bs = self.block_size
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            start = seq.num_cached
            ids.extend(seq.tokens[start : start + n])
            for p in range(start, start + n):
                positions.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
            # A scored sequence needs the rows predicting each token after its context; a generating one its last
            # row, once its prompt is complete (a chunk in the middle of a prompt samples nothing).
            end = cu[-1] + n
            if seq.score_only:
                first, end = end - (len(seq) - seq.score_from) - 1, end - 1
            else:
                first = end - 1 if start + n == len(seq) else end
            spans.append((seq, len(rows), end - first))
            rows.extend(range(first, end))
            cu.append(cu[-1] + n)
            ctx.append(start + n)
            tables.append(seq.block_table + [0] * (self.max_blocks_per_seq - len(seq.block_table)))
        attn = (self._t(tables, torch.int32), self._t(cu, torch.int32), self._t(ctx, torch.int32))
        return ids, positions, slots, attn, rows, spans

    def _t(self, x: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch, eos_ids: set[int]) -> None:
        """Run one packed step and record its results on the sequences (scheduler.finish_step does the rest)."""
        with kernel_context(self.kernels):
            decode = self.decode_graphs is not None and is_decode_only(batch)
            if decode:
                logits = self.decode_graphs.run(batch)  # row i: sequence i's next token
                spans = [(s, i, 1) for i, s in enumerate(batch.seqs)]
            else:
                ids, positions, slots, attn, rows, spans = self._host_inputs(batch)
                rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
                if self.prefill_graphs is not None and self.prefill_graphs.fits(len(ids)):
                    logits = self.prefill_graphs.run(ids, positions, slots, attn, rows_t)
                else:
                    inp = StepInputs(self._t(positions, torch.int64), self._t(slots, torch.int64), *attn)
                    logits = self.model(self._t(ids, torch.int64), inp, self.kv_caches, self.attn_fn, rows_t)
            gen = [(s, o) for s, o, k in spans if not s.score_only and k]
            if gen:
                picked = logits if decode else logits[torch.tensor([o for _, o in gen], device=self.device)]
                seqs = [s for s, _ in gen]
                out = sample(picked, [s.params for s in seqs], [len(s.output_ids) for s in seqs])
                for s, tok, lp, top_ids, top_lps in zip(seqs, *out, strict=True):
                    s.append(tok, lp, top_ids, top_lps, eos_ids)
            scored = [(s, o, k) for s, o, k in spans if s.score_only]
            if scored:
                idx = torch.tensor([r for _, o, k in scored for r in range(o, o + k)], device=self.device)
                targets = torch.tensor([t for s, _, _ in scored for t in s.tokens[s.score_from :]], device=self.device)
                flat = torch.log_softmax(logits[idx].float(), dim=-1).gather(1, targets[:, None])[:, 0].tolist()
                for s, _, k in scored:
                    s.logprobs, flat = flat[:k], flat[k:]
