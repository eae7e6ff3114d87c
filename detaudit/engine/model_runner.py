"""Turns a scheduled batch into packed tensors, runs the model over the paged KV cache and samples."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch

from detaudit.engine.config import ModelSpec, kernel_context, pin_kernels
from detaudit.engine.graphs import DecodeGraphs, is_decode_only
from detaudit.engine.kv_cache import allocate_kv_cache
from detaudit.engine.model import AttentionInputs, PagedModel, StepInputs, load_model
from detaudit.engine.piecewise import PiecewiseGraphs
from detaudit.engine.sampler import sample
from detaudit.engine.scheduler import ScheduledBatch
from detaudit.engine.sequence import Sequence

# Per sequence of a step: (sequence, its first row among the logits rows, how many rows it has).
Span = tuple[Sequence, int, int]


class ModelRunner:
    """Owns the model, its KV cache and the CUDA graphs; runs one scheduled step at a time."""

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
        pin_kernels(self, kernels)
        cache = allocate_kv_cache(
            spec,
            num_blocks=num_blocks,
            block_size=block_size,
            max_blocks_per_seq=max_blocks_per_seq,
            device=device,
            dtype=dtype,
        )
        attn_fn = partial(paged_attention, batch_invariant=kernels == "batch-invariant")
        self.paged_model = PagedModel(load_model(spec, config, device, dtype), cache, attn_fn, kernels, self.device)
        # Decode-only steps replay whole-step CUDA graphs (detaudit.engine.graphs), steps with prefill piecewise ones
        # (detaudit.engine.piecewise), in one shared graph pool; None runs those steps eagerly, unpadded.
        self.decode_graphs: DecodeGraphs | None = None
        self.prefill_graphs: PiecewiseGraphs | None = None
        self.graph_stats: dict[str, float] | None = None  # capture seconds (start-up cost), for the manifest
        if cuda_graphs and self.device.type == "cuda":
            t0 = time.perf_counter()
            self.decode_graphs = DecodeGraphs(self.paged_model, max_batch, capture=True)
            t1 = time.perf_counter()
            self.prefill_graphs = PiecewiseGraphs(
                self.paged_model, max_batched_tokens, capture=True, pool=self.decode_graphs.pool
            )
            self.graph_stats = {
                "decode_capture_s": round(t1 - t0, 2),
                "prefill_capture_s": round(time.perf_counter() - t1, 2),
            }

    def _host_inputs(
        self, batch: ScheduledBatch
    ) -> tuple[list[int], list[int], list[int], AttentionInputs, list[int], list[Span]]:
        """Token ids, positions and cache slots (host lists), attention's inputs (device), the token rows whose
        logits are needed, and per sequence its span of those rows."""
        cache = self.paged_model.cache
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        spans: list[Span] = []
        cu, ctx, tables = [0], [], []
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            start = seq.num_cached
            ids.extend(seq.tokens[start : start + n])
            for p in range(start, start + n):
                positions.append(p)
                slots.append(cache.slot(seq.block_table, p))
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
            tables.append(seq.block_table)
        attention = AttentionInputs(
            cache.block_tables(tables, len(tables)).to(self.device, non_blocking=True),
            self._tensor(cu, torch.int32),
            self._tensor(ctx, torch.int32),
        )
        return ids, positions, slots, attention, rows, spans

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A host list as a tensor on the engine's device (copied without waiting)."""
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch, eos_ids: set[int]) -> float | None:
        """Run one packed step and record its results on the sequences (scheduler.finish_step does the rest).
        Returns the replay milliseconds measured at capture of the piecewise graphs it ran on, if it did."""
        replay = None
        with kernel_context(self.paged_model.kernels):
            decode = self.decode_graphs if self.decode_graphs is not None and is_decode_only(batch) else None
            spans: list[Span]
            if decode is not None:
                logits = decode.run(batch)  # row i: sequence i's next token
                spans = [(s, i, 1) for i, s in enumerate(batch.seqs)]
            else:
                ids, positions, slots, attention, rows, spans = self._host_inputs(batch)
                rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
                if self.prefill_graphs is not None and self.prefill_graphs.fits(len(ids)):
                    logits = self.prefill_graphs.run(ids, positions, slots, attention, rows_t)
                    replay = self.prefill_graphs.cost_ms(len(ids)) if self.prefill_graphs.replay_ms else None
                else:
                    pm = self.paged_model
                    inp = StepInputs(self._tensor(positions, torch.int64), self._tensor(slots, torch.int64), attention)
                    logits = pm.model(self._tensor(ids, torch.int64), inp, pm.cache.layers, pm.attn_fn, rows_t)
            gen = [(s, o) for s, o, k in spans if not s.score_only and k]
            if gen:
                picked = logits if decode is not None else logits[torch.tensor([o for _, o in gen], device=self.device)]
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
        return replay
