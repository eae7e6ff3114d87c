"""Which checkpoints the engine runs, read from the HF config.json before any torch is imported."""

from __future__ import annotations

import contextlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

from detaudit.errors import UsageError

# model_type -> whether q/k get a per-head RMSNorm (Qwen3) and whether q/k/v carry a bias by default (Qwen2).
SUPPORTED = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (False, True),
    "qwen3": (True, False),
    "qwen3_moe": (True, False),
    "mixtral": (False, False),
}
# A model directory holding this file instead of weights: the engine draws seeded random weights on the device at
# load time (`detaudit tiny-model --weights-at-load`), for benchmark shapes too large to write to disk.
RANDOM_WEIGHTS = "detaudit_random_weights.json"
DTYPES = ("bfloat16", "float16", "float32")
KERNELS = ("stock", "batch-invariant")
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
RANDOM_WEIGHTS_KEY = "detaudit_random_weights"  # in config.json of a model whose weights were drawn, not trained


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qk_norm: bool
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    # Mixture-of-Experts (qwen3_moe, mixtral); num_experts 0: dense. moe_layers: the layers with a sparse block.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: frozenset[int] = frozenset()
    random_weights_seed: int | None = None  # RANDOM_WEIGHTS: draw weights at load with this seed
    # A test model (detaudit.tiny marks its config.json, or its weights are drawn at load): its text means nothing.
    random_weights: bool = False


def resolve_model(model: str) -> Path:
    """A local directory (made absolute, so a run's manifest names it from any working directory); a GGUF file or
    a packaged GGUF model's short name (`smollm2`), converted once into the user's cache (engine.gguf_convert); a
    hub id ("org/name") through the hub cache/download. Unknown paths are exit 2."""
    if not model.strip():
        raise UsageError("--model is empty: give a model directory, a .gguf file or a hub id")
    from detaudit.engine.gguf_convert import is_gguf_model, resolve_gguf

    if is_gguf_model(model) and not Path(model).expanduser().is_dir():
        return resolve_gguf(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    looks_like_id = model.count("/") == 1 and not model.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_id:
        raise UsageError(f"model directory {model} {'is not a directory' if path.exists() else 'does not exist'}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model"]))
    except Exception as e:  # offline, gated, no such repo: all the user's to fix
        why = type(e).__name__
        raise UsageError(f"model {model!r} is not a local directory and cannot be downloaded ({why})") from None


def load_spec(model_dir: Path) -> ModelSpec:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = {**cfg.get("text_config", {}), **cfg}
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED:
        raise UsageError(f"unsupported architecture {mtype!r}; supported: {', '.join(SUPPORTED)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UsageError(f"unsupported activation {cfg['hidden_act']!r}; only silu models are supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in _ROPE_TYPES:
        raise UsageError(f"unsupported rope type {rope.get('rope_type')!r}; supported: {', '.join(_ROPE_TYPES)}")
    random_seed = _random_weights_seed(model_dir)
    if random_seed is None and not any(model_dir.glob("*.safetensors")):
        raise UsageError(f"{model_dir} holds no *.safetensors weights")
    qk_norm, qkv_bias = SUPPORTED[mtype]
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
    use_window = cfg.get("use_sliding_window", mtype in ("mistral", "mixtral"))
    return ModelSpec(
        path=model_dir,
        model_type=mtype,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        qk_norm=qk_norm,
        qkv_bias=cfg.get("attention_bias", qkv_bias),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        sliding_window=cfg.get("sliding_window") if use_window else None,
        eos_token_ids=eos_ids,
        random_weights_seed=random_seed,
        random_weights=bool(cfg.get(RANDOM_WEIGHTS_KEY, False)) or random_seed is not None,
        **_moe_fields(mtype, cfg),
    )


def _moe_fields(mtype: str, cfg: dict) -> dict:
    """ModelSpec's MoE fields from config.json: Qwen3-MoE puts a sparse block in layer i unless i is in
    mlp_only_layers or (i + 1) is not a multiple of decoder_sparse_step; Mixtral in every layer, its experts
    intermediate_size wide, top-k weights always renormalised."""
    if mtype == "qwen3_moe":
        experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
        step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
        layers = {i for i in range(cfg["num_hidden_layers"]) if i not in dense and experts and (i + 1) % step == 0}
        inter, renorm = cfg["moe_intermediate_size"], cfg.get("norm_topk_prob", False)
    elif mtype == "mixtral":
        experts, layers = cfg["num_local_experts"], set(range(cfg["num_hidden_layers"]))
        inter, renorm = cfg["intermediate_size"], True
    else:
        return {}
    if layers and not 1 <= cfg["num_experts_per_tok"] <= experts:
        raise UsageError(f"num_experts_per_tok {cfg['num_experts_per_tok']} must be 1..num_experts ({experts})")
    return dict(
        num_experts=experts,
        num_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=inter,
        norm_topk_prob=renorm,
        moe_layers=frozenset(layers),
    )


def _random_weights_seed(model_dir: Path) -> int | None:
    path = model_dir / RANDOM_WEIGHTS
    if not path.is_file():
        return None
    try:
        seed = json.loads(path.read_text())["seed"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a detaudit random-weights marker ({e})") from None
    if not isinstance(seed, int):
        raise UsageError(f"{path}: seed must be an integer")
    return seed


def check_device_dtype(device: str, dtype: str, kernels: str) -> None:
    """Refuse a device or dtype the engine and kernels cannot run, before loading anything (exit 2)."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unsupported device {device!r}; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked but this machine has no CUDA device (torch sees none)")
    if kernels not in KERNELS:
        raise UsageError(f"unknown kernels {kernels!r}; use one of {', '.join(KERNELS)}")
    if device == "cpu" and dtype == "float16":
        raise UsageError("float16 is not supported on CPU; use bfloat16 or float32")


def kernel_context(kernels: str) -> contextlib.AbstractContextManager:
    """What a step runs under: `batch-invariant` installs detaudit.kernels' aten overrides, `stock` plain torch ops."""
    if kernels == "batch-invariant":
        from detaudit.kernels import batch_invariant

        return batch_invariant()
    return contextlib.nullcontext()


def pin_kernels(owner: object, kernels: str) -> None:
    """Keep the batch-invariant overrides registered while ``owner`` lives, so each step's kernel_context is a flag
    flip rather than a re-registration (about 1 ms a step, measured on the H200's host and on CPU)."""
    if kernels == "batch-invariant":
        from detaudit.kernels import pin, unpin

        pin()
        weakref.finalize(owner, unpin)
