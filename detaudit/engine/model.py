"""Compact decoder-only model code for Llama / Mistral / Qwen2 / Qwen3 checkpoints, and the Mixture-of-Experts
Qwen3-MoE and Mixtral (their sparse blocks: detaudit.engine.moe), over packed batches.

The math follows the transformers modules op for op (RMSNorm in fp32, RoPE cos/sin cast to the model dtype) so
logits match HF's, with q/k/v and gate/up fused into one matmul each as vLLM does. The batch layout differs: hidden
states are [tokens, hidden] for all sequences of a step packed end to end, and attention reads a paged KV cache
that the step's new keys/values are written into first.

The forward is one sequence of pieces cut at the attention calls (``CausalLM.piece``: the embedding and layer 0's
pre-attention, each layer's post-attention with the next one's pre-attention, the last post-attention), with
attention (``CausalLM.attend``) between them and the final norm and lm_head (``CausalLM.logits``) after.
``CausalLM.forward`` strings them together; the piecewise CUDA graphs capture the same pieces one by one, so the
eager and the graph-replayed step cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from detaudit.engine.config import ModelSpec
from detaudit.engine.kv_cache import KVCache
from detaudit.engine.moe import SparseMoE, checkpoint_names, stack_experts
from detaudit.errors import UsageError

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [T, 1, head_dim] of the step's positions
KVLayers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V) of the paged cache
# detaudit.kernels.attention.paged_attention with its kernels mode bound:
# (q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale) -> [T, Hq, D]
AttentionFn = Callable[..., torch.Tensor]


class AttentionInputs(NamedTuple):
    """Where attention finds each sequence of the packed step in the paged cache."""

    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    context_lens: torch.Tensor  # [B] int32, cached tokens of each sequence including this step's


@dataclass
class StepInputs:
    """Everything the forward needs about the packed batch of one step besides its token ids (built by the runner)."""

    positions: torch.Tensor  # [T] int64, absolute position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot each new token's K/V goes to
    attention: AttentionInputs


@dataclass
class Carry:
    """What one piece of the forward hands the next across an attention call."""

    hidden: torch.Tensor  # [T, hidden]: the residual stream
    rope: Rope  # gathered once, in piece 0, and used by every layer
    q: torch.Tensor | None  # [T, Hq, D]: queries of the attention call after this piece; None after the last piece
    attn_out: torch.Tensor | None = None  # [T, Hq, D]: that call's output, which the next piece starts from


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            # One fused kernel, as serving engines run it: torch's with stock kernels, the bundled row-wise Triton
            # kernel (an aten::rms_norm override) under batch_invariant(). Eight launches fewer per norm, four
            # norms a layer: that is most of a decode step's small kernels.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(nn.Module):
    """A cos/sin table over all positions, computed exactly as HF computes it per position."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, spec: ModelSpec, config: Any) -> None:
        super().__init__()
        rope = config.rope_parameters  # transformers' standardized form, whatever the checkpoint's config.json says
        if rope["rope_type"] == "default":
            theta = rope["rope_theta"]
            inv_freq = 1.0 / (theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float) / spec.head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
        pos = torch.arange(spec.max_position_embeddings, dtype=torch.float)
        freqs = pos[:, None] * inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim] of the step's positions in the model dtype: gathered once per step, used by
        every layer (index_select reads no index on the host, so this can sit inside a CUDA graph)."""
        cos = self.cos.index_select(0, positions).to(dtype).unsqueeze(1)
        sin = self.sin.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, sin


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's `x * cos + rotate_half(x) * sin` on q and k side by side: elementwise, so the same bits as one at a
    time, in half the launches."""
    cos, sin = rope
    qk = torch.cat((q, k), dim=1)
    qk = qk * cos + _rotate_half(qk) * sin
    return qk[:, : q.shape[1]], qk[:, q.shape[1] :]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        d, hq, hkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        self.split = [hq * d, hkv * d, hkv * d]
        self.qkv_proj = nn.Linear(spec.hidden_size, sum(self.split), bias=spec.qkv_bias)  # q_proj|k_proj|v_proj
        self.o_proj = nn.Linear(hq * d, spec.hidden_size, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.scale = d**-0.5

    def project(
        self, x: torch.Tensor, rope: Rope, slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """Everything before attention: q [T, Hq, D] returned, this step's K/V written into the cache at
        `slot_mapping`."""
        t, d = x.shape[0], self.spec.head_dim
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(t, self.spec.num_heads, d)
        k = k.view(t, self.spec.num_kv_heads, d)
        v = v.view(t, self.spec.num_kv_heads, d)
        if self.spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, rope)
        # Write this step's keys/values first, then attend over the cache: prefill and decode read the same layout.
        # index_copy_ never reads the indices on the host, so the write can sit inside a CUDA graph.
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)
        return q


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)  # gate|up
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp: nn.Module = SparseMoE(spec) if index in spec.moe_layers else MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def pre_attention(
        self, x: torch.Tensor, rope: Rope, slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """The layer's first half up to attention (input norm, qkv, q/k norm, RoPE, K/V write): its queries."""
        return self.self_attn.project(self.input_layernorm(x), rope, slot_mapping, k_cache, v_cache)

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The rest of the layer from attention's output: o_proj and residual add, post-attention norm, MLP and
        residual add."""
        x = x + self.self_attn.o_proj(attn_out.reshape(x.shape[0], -1))
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class CausalLM(nn.Module):
    """HF parameter names (model.layers.N.self_attn.q_proj.weight, lm_head.weight) so checkpoints load as saved."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = Body(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary: Rotary | None = None  # built by load_model on the real device (not the meta one)

    @property
    def num_pieces(self) -> int:
        """Pieces of the forward: one before each layer's attention call, and one after the last."""
        return self.spec.num_layers + 1

    def layer(self, i: int) -> DecoderLayer:
        return cast(DecoderLayer, self.model.layers[i])

    def forward(
        self,
        input_ids: torch.Tensor,
        inp: StepInputs,
        kv_caches: KVLayers,
        attn_fn: AttentionFn,
        logits_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits (model dtype) of the rows in `logits_rows` only (None: every row, as in a decode step): the
        lm_head runs on just those rows. The pieces and the attention calls between them, in the order the
        piecewise CUDA graphs (detaudit.engine.piecewise) replay them."""
        carry = self.piece(0, None, input_ids, inp.positions, inp.slot_mapping, kv_caches)
        for i in range(1, self.num_pieces):
            assert carry.q is not None  # every piece but the last ends at an attention call
            carry.attn_out = self.attend(i - 1, carry.q, kv_caches, inp.attention, attn_fn)
            carry = self.piece(i, carry, input_ids, inp.positions, inp.slot_mapping, kv_caches)
        return self.logits(carry.hidden, logits_rows)

    def piece(
        self,
        i: int,
        carry: Carry | None,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_caches: KVLayers,
    ) -> Carry:
        """Piece i, between attention calls i-1 and i: the embedding and RoPE's cos/sin (i = 0, from `input_ids`
        and `positions`) or layer i-1's post-attention (from `carry`), then layer i's pre-attention (none after
        the last layer). Nothing in it reads a device value on the host, so a CUDA graph can hold it."""
        if carry is None:
            x = self.model.embed_tokens(input_ids)
            assert self.rotary is not None  # load_model builds it
            rope = self.rotary(positions, x.dtype)
        else:
            assert carry.attn_out is not None
            x, rope = self.layer(i - 1).post_attention(carry.hidden, carry.attn_out), carry.rope
        if i == self.spec.num_layers:
            return Carry(x, rope, None)
        k_cache, v_cache = kv_caches[i]
        return Carry(x, rope, self.layer(i).pre_attention(x, rope, slot_mapping, k_cache, v_cache))

    def attend(
        self, i: int, q: torch.Tensor, kv_caches: KVLayers, inp: AttentionInputs, attn_fn: AttentionFn
    ) -> torch.Tensor:
        """Layer i's attention of `q` over the paged cache: [T, Hq, D]."""
        k_cache, v_cache = kv_caches[i]
        return attn_fn(q, k_cache, v_cache, *inp, self.layer(i).self_attn.scale)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Final norm and lm_head on the rows of `hidden` whose logits are needed (None: every row)."""
        return self.lm_head(self.model.norm(hidden if rows is None else hidden[rows]))


@dataclass(frozen=True)
class PagedModel:
    """The model with its paged KV cache, the attention over it and the kernels mode: what a step's forward runs
    on, eager or replayed from CUDA graphs."""

    model: CausalLM
    cache: KVCache
    attn_fn: AttentionFn
    kernels: str  # config.KERNELS; every forward runs under config.kernel_context(kernels)
    device: torch.device


# Engine parameters that hold several checkpoint tensors, concatenated along the output dim in this order.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _checkpoint_names(spec: ModelSpec, param: str) -> list[str]:
    """The checkpoint tensors (HF names) an engine parameter is made of."""
    moe = checkpoint_names(spec, param)
    if moe is not None:
        return moe
    for fused, parts in _FUSED.items():
        if f".{fused}." in param:
            return [param.replace(f".{fused}.", f".{part}.") for part in parts]
    return [param]


def load_model(spec: ModelSpec, config: Any, device: str, dtype: torch.dtype) -> CausalLM:
    """Build the module on the meta device and fill it straight from the safetensors shards on `device`.

    q/k/v and gate/up projections are one matmul each (as in vLLM): fewer launches, and more output columns to
    spread over the GPU in small decode batches. Their checkpoint tensors are concatenated here.
    `config` is the transformers config object (AutoConfig), used for RoPE's parameters. A model directory marked
    for random weights (config.RANDOM_WEIGHTS) gets them drawn on `device` instead (:func:`_random_state`)."""
    with torch.device("meta"):
        model = CausalLM(spec)
    params = dict(model.named_parameters())
    if spec.random_weights_seed is not None:
        model.load_state_dict(_random_state(model, spec.random_weights_seed, device, dtype), strict=False, assign=True)
        model.rotary = Rotary(spec, config).to(device)
        return model.eval()
    wanted = {name for param in params for name in _checkpoint_names(spec, param)}
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(spec.path.glob("*.safetensors")):
        try:
            f = safe_open(shard, framework="pt", device="cpu")
        except (OSError, SafetensorError) as e:
            raise UsageError(f"{shard}: unreadable safetensors file ({e})") from None
        with f:
            for name in f.keys():
                if name in wanted:
                    tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    if spec.tie_word_embeddings and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing = sorted(wanted - set(tensors))
    if missing:
        raise UsageError(f"{spec.path}: checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    state = {}
    for param in params:
        parts = [tensors.pop(name) for name in _checkpoint_names(spec, param)]
        if param.endswith((".w13", ".w2")):
            state[param] = stack_experts(parts, spec.num_experts)
        else:
            state[param] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    model.load_state_dict(state, strict=False, assign=True)
    model.rotary = Rotary(spec, config).to(device)
    return model.eval()


def _random_state(model: CausalLM, seed: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded random weights drawn on `device`, parameter by parameter in name order: norms 1, every other weight
    normal with std 0.02 (transformers' initializer_range). A 30B-parameter MoE takes seconds on a GPU, where
    writing it to disk and reading it back would take minutes and more disk than a benchmark machine has."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, device=device, dtype=dtype)
        state[name] = t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0.0, 0.02, generator=gen)
    if model.spec.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state
