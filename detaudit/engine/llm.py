"""The engine facade: model + tokenizer + scheduler + runner, driven one packed step at a time."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

from detaudit import __version__
from detaudit.engine.block_manager import BlockManager
from detaudit.engine.config import check_device_dtype, load_spec, resolve_model
from detaudit.engine.gguf_convert import first_load_note, gguf_source
from detaudit.engine.scheduler import ScheduledBatch, Scheduler, StepFit
from detaudit.engine.sequence import SamplingParams, Sequence
from detaudit.errors import UsageError


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "bfloat16"
    kernels: str = "stock"
    max_batch: int = 32
    max_batched_tokens: int = 2048
    max_model_len: int = 2048
    block_size: int = 16
    prefix_cache: bool = True  # share the K/V of full prompt blocks already computed (docs/engine.md)
    kv_blocks: int | None = None  # KV blocks in all; None: enough for max_batch sequences of max_model_len
    cuda_graphs: bool = True  # steps replay CUDA graphs (decode whole, prefill piecewise); only on a CUDA device
    # With piecewise graphs, hold back prompt tokens that would pad a step to a slower graph size (StepFit).
    fit_steps: bool = True

    def loading_message(self) -> str:
        """What a command shows while the engine starts: with graph capture a cold GPU start takes about a minute."""
        graphs = ", capturing CUDA graphs" if self.cuda_graphs and self.device.startswith("cuda") else ""
        return f"loading {self.model} ({self.kernels} kernels{graphs}{first_load_note(self.model)})"


class StepError(Exception):
    """A packed step raised. `failed`: the sequences that raise even alone (aborted, finish_reason "abort");
    `finished`: those of the others that finished in the step (they completed it one at a time)."""

    def __init__(self, failed: list[Sequence], finished: list[Sequence], cause: Exception) -> None:
        super().__init__(f"engine step failed: {type(cause).__name__}: {cause}")
        self.failed, self.finished, self.cause = failed, finished, cause


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE token characters back to raw bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class Engine:
    """Loads a checkpoint and serves requests with continuous batching; see docs/engine.md."""

    def __init__(self, cfg: EngineConfig) -> None:
        check_device_dtype(cfg.device, cfg.dtype, cfg.kernels)
        if cfg.max_batch < 1:
            raise UsageError(f"--max-batch must be at least 1, got {cfg.max_batch}")
        if cfg.max_model_len < 2:
            raise UsageError(f"--max-model-len must be at least 2, got {cfg.max_model_len}")
        if cfg.max_batched_tokens < cfg.max_batch:
            raise UsageError("--max-batched-tokens must be at least --max-batch (one decode token per sequence)")
        import torch

        path = resolve_model(cfg.model)
        self.spec = load_spec(path)
        self.cfg = cfg
        self.tokenizer = _load_tokenizer(path)
        limit = min(self.spec.max_position_embeddings, self.spec.sliding_window or 1 << 30)
        self.max_model_len = min(cfg.max_model_len, limit)
        blocks_per_seq = -(-self.max_model_len // cfg.block_size)
        num_blocks = cfg.max_batch * blocks_per_seq if cfg.kv_blocks is None else cfg.kv_blocks
        if num_blocks < blocks_per_seq:  # a sequence alone must always fit, or preemption could not make room
            raise UsageError(
                f"--kv-blocks {num_blocks} cannot hold one sequence of --max-model-len {self.max_model_len} "
                f"({blocks_per_seq} blocks of {cfg.block_size} tokens)"
            )
        from detaudit.engine.model_runner import ModelRunner

        self.runner = ModelRunner(
            self.spec,
            _hf_config(path, self.spec.head_dim),
            device=cfg.device,
            dtype=getattr(torch, cfg.dtype),
            kernels=cfg.kernels,
            num_blocks=num_blocks,
            block_size=cfg.block_size,
            max_blocks_per_seq=blocks_per_seq,
            max_batch=cfg.max_batch,
            max_batched_tokens=cfg.max_batched_tokens,
            cuda_graphs=cfg.cuda_graphs,
        )
        graphs = self.runner.prefill_graphs
        self.step_fit = (
            StepFit(graphs.buckets, graphs.cost_ms)
            if cfg.fit_steps and graphs is not None and graphs.replay_ms
            else None
        )
        self.scheduler = Scheduler(
            BlockManager(num_blocks, cfg.block_size, prefix_cache=cfg.prefix_cache),
            max_batch=cfg.max_batch,
            max_batched_tokens=cfg.max_batched_tokens,
            fit=self.step_fit,
        )
        self.eos_ids = set(self.spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._byte_dec = _byte_decoder()
        self.steps = 0
        self.last_batch = (0, 0)  # (sequences, tokens) of the latest step

    # ---------------------------------------------------------------- text <-> ids

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise UsageError(f"{self.spec.path} has no chat template; use the completions API")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (byte-level BPE and SentencePiece byte-fallback aware)."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if all(c in self._byte_dec for c in piece):
            return bytes(self._byte_dec[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def token_str(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # ---------------------------------------------------------------- requests

    def add(self, seq: Sequence) -> Sequence:
        """Admit a request, or refuse (UsageError) one that a step could not run: such a request would make the
        step raise and take down every other sequence packed with it."""
        if not seq.prompt_ids:
            raise UsageError("empty prompt: it tokenizes to no tokens")
        if not seq.score_only and seq.params.max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {seq.params.max_tokens}")
        if min(seq.prompt_ids) < 0 or max(seq.prompt_ids) >= self.spec.vocab_size:
            raise UsageError(f"prompt token id outside the model's vocabulary (0..{self.spec.vocab_size - 1})")
        if seq.max_len > self.max_model_len:
            raise UsageError(
                f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.params.max_tokens}) exceeds the engine's "
                f"max model length {self.max_model_len}"
            )
        self.scheduler.add(seq)
        return seq

    def step(self) -> list[Sequence]:
        """One packed forward over the current batch; returns the sequences that finished in it.

        If the forward raises, the step is run again one sequence at a time so that one bad request cannot fail
        the others packed with it: the sequences that still raise alone are aborted, the rest complete the step,
        and StepError reports both.
        """
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        marks = [len(s.output_ids) for s in batch.seqs]
        t0 = time.perf_counter()
        try:
            replay_ms = self.runner.step(batch, self.eos_ids)
        except Exception as e:
            raise self._isolate(batch, marks, e) from e
        if self.step_fit is not None and replay_ms is not None:
            self.step_fit.observe((time.perf_counter() - t0) * 1e3, replay_ms)
        self.steps += 1
        self.last_batch = (len(batch.seqs), batch.num_tokens)
        return self.scheduler.finish_step(batch)

    def _isolate(self, batch: ScheduledBatch, marks: list[int], cause: Exception) -> StepError:
        """Rerun each sequence of a failed step alone; abort the ones that fail alone too."""
        done: list[tuple[Sequence, int]] = []
        failed: list[Sequence] = []
        for seq, n, mark in zip(batch.seqs, batch.num_new, marks, strict=True):
            seq.truncate(mark)  # the failed step may have recorded a token for some sequences before it raised
            try:
                self.runner.step(ScheduledBatch([seq], [n]), self.eos_ids)
                done.append((seq, n))
            except Exception:
                seq.truncate(mark)
                failed.append(seq)
        for seq in failed:
            self.scheduler.abort(seq)
        self.steps += 1
        finished = self.scheduler.finish_step(ScheduledBatch([s for s, _ in done], [n for _, n in done]))
        return StepError(failed, finished, cause)

    def flush_prefix_cache(self) -> None:
        """Forget every cached prefix, so the next requests are computed cold (running ones keep their blocks)."""
        self.scheduler.blocks.flush()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """Run prompts to completion together (all admitted as seats free up); results in input order."""
        seqs = [self.add(Sequence(list(p), params)) for p in prompts]
        while self.scheduler.has_work():
            self.step()
        return seqs

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Teacher-forced logprob of every completion token given its prompt, one prefill per pair."""
        seqs = [
            self.add(Sequence(list(p) + list(c), SamplingParams(max_tokens=0), score_only=True, score_from=len(p)))
            for p, c in pairs
        ]
        while self.scheduler.has_work():
            self.step()
        return [s.logprobs for s in seqs]

    @property
    def graph_replays(self) -> int:
        """Steps replayed from CUDA graphs so far, decode-only and piecewise prefill (0 when the engine runs
        eagerly)."""
        return sum(g.replays for g in (self.runner.decode_graphs, self.runner.prefill_graphs) if g is not None)

    @property
    def fitted_steps(self) -> int:
        """Steps whose prompt tokens were held back to keep them at a faster graph size (StepFit)."""
        return self.step_fit.fitted if self.step_fit is not None else 0

    @property
    def prefill_graph_replays(self) -> int:
        """Of graph_replays, the steps with prefill (piecewise graphs with eager attention)."""
        graphs = self.runner.prefill_graphs
        return graphs.replays if graphs is not None else 0

    def info(self) -> dict[str, Any]:
        """Engine facts for the run manifest and the server's system_fingerprint."""
        import torch

        gpu = torch.cuda.get_device_name(self.runner.device) if self.runner.device.type == "cuda" else None
        decode, prefill = self.runner.decode_graphs, self.runner.prefill_graphs
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        return {
            "engine": f"detaudit-engine {__version__}",
            "kernels": self.cfg.kernels,
            "dtype": self.cfg.dtype,
            "device": self.cfg.device,
            "gpu": gpu,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "triton": triton_version,
            "transformers": _transformers_version(),
            "model_path": str(self.spec.path),
            "gguf": gguf_source(self.spec.path),  # the GGUF file a converted model came from, with its SHA-256
            "random_weights": self.spec.random_weights,
            "architecture": self.spec.model_type,
            "max_batch": self.cfg.max_batch,
            "max_batched_tokens": self.cfg.max_batched_tokens,
            "max_model_len": self.max_model_len,
            "block_size": self.cfg.block_size,
            "kv_blocks": self.scheduler.blocks.num_blocks,
            "prefix_cache": self.cfg.prefix_cache,
            "cuda_graphs": decode is not None,
            "cuda_graph_sizes": decode.buckets if decode is not None else [],
            "cuda_graph_token_sizes": prefill.buckets if prefill is not None else [],
            "cuda_graph_stats": self.runner.graph_stats,  # capture seconds, decode and prefill graphs
            # Measured replay ms per size, and the sizes that run on a larger one (graph_timing.cheapest_route).
            "cuda_graph_replay_ms": _rounded(decode.replay_ms if decode is not None else {}),
            "cuda_graph_rerouted": _rerouted(decode.route if decode is not None else {}),
            "cuda_graph_token_replay_ms": _rounded(prefill.replay_ms if prefill is not None else {}),
            "cuda_graph_token_rerouted": _rerouted(prefill.route if prefill is not None else {}),
            "fit_steps": self.step_fit is not None,
        }


def _rounded(times: dict[int, float]) -> dict[int, float]:
    return {size: round(ms, 3) for size, ms in times.items()}


def _rerouted(route: dict[int, int]) -> dict[int, int]:
    return {size: runs_as for size, runs_as in route.items() if runs_as != size}


def _hf_config(path, head_dim: int):
    """transformers' config object: it standardizes RoPE parameters across config.json vintages."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "head_dim", None) is None:
        config.head_dim = head_dim
    return config


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _load_tokenizer(path):
    """tokenizer.json through PreTrainedTokenizerFast when present: AutoTokenizer rebuilds a different
    pre-tokenizer for qwen2 directories (platform.md §4.1); otherwise whatever AutoTokenizer picks."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if (path / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # missing or corrupt tokenizer files: the model directory is the user's
        raise UsageError(f"{path}: cannot load its tokenizer ({' '.join(str(e).split())})") from None
