"""Tiny models of real architectures with random weights and an offline-trained tokenizer.

No weights can be downloaded on the project machines, so tests, benchmarks and the demo build their models here:
a byte-level BPE tokenizer trained on Python's own standard-library sources, a ChatML chat template, and a
transformers config of the requested architecture with seeded random weights, all saved with save_pretrained.
Random-init logits are near-uniform, so tiny numeric differences flip greedy tokens: a sensitive test subject.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from detaudit.engine.config import RANDOM_WEIGHTS, RANDOM_WEIGHTS_KEY
from detaudit.errors import UsageError

ARCHS = ("qwen3", "qwen2", "llama", "mistral", "qwen3-moe", "mixtral")
# Mixture-of-Experts architectures: --arch name -> transformers model_type, and the config key of the expert count.
MOE_ARCHS = {"qwen3-moe": ("qwen3_moe", "num_experts"), "mixtral": ("mixtral", "num_local_experts")}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Standard-library modules whose source trains the tokenizer: stable, offline, varied prose and code.
_CORPUS_MODULES = (
    "argparse", "ast", "calendar", "collections", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "functools", "gettext", "heapq", "html", "inspect", "json",
    "logging", "pathlib", "pprint", "random", "shlex", "statistics", "string", "textwrap", "typing", "zipfile",
)  # fmt: skip

# Presets: name -> config overrides. "tiny" is the CI size and "small" a mid size, both with the tokenizer's own
# vocabulary. A preset named after a model has that model's shapes, vocabulary size and embedding tying included:
# the lm_head and the log-softmax over the vocabulary are a real share of a decode step's work. The tokenizer stays
# small; the embedding is padded past it (real checkpoints pad theirs too), and ids past the tokenizer decode to "".
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64),
    "small": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=64),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    # Qwen3-30B-A3B (--arch qwen3-moe only): 128 experts, 8 active; ~61 GB in bf16, so --weights-at-load.
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[]),
}  # fmt: skip
# The experts a size preset gets with a MoE architecture (a model-named MoE preset carries its own).
MOE_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True),
    "small": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=512, norm_topk_prob=True),
}


def _corpus() -> list[str]:
    import importlib

    texts = []
    for name in _CORPUS_MODULES:
        try:
            texts.append(inspect.getsource(importlib.import_module(name)))
        except (OSError, TypeError, ImportError):  # frozen or source-less builds
            continue
    texts.append(" ".join(SPECIAL_TOKENS))
    return texts


def build_tokenizer(vocab_size: int = 4096):
    """A byte-level BPE tokenizer with ChatML specials, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _check_names(arch: str, preset: str) -> None:
    if arch not in ARCHS:
        raise UsageError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; supported: {', '.join(PRESETS)}")
    moe_preset = "num_experts" in PRESETS[preset]
    if moe_preset and arch != "qwen3-moe":
        raise UsageError(f"preset {preset!r} is a Qwen3-MoE shape: use --arch qwen3-moe")
    if arch in MOE_ARCHS and not moe_preset and preset not in MOE_SHAPES:
        raise UsageError(f"preset {preset!r} has no experts; with --arch {arch} use {', '.join(MOE_SHAPES)}")


def model_config(arch: str, preset: str, tokenizer: Any, max_position_embeddings: int = 4096) -> Any:
    """The transformers config of a preset: its shapes, and its vocabulary (at least the tokenizer's)."""
    from transformers import AutoConfig

    _check_names(arch, preset)
    shape = dict(PRESETS[preset])
    if arch in ("qwen2",):
        shape.pop("head_dim")  # Qwen2 derives head_dim from hidden_size / heads
    model_type = arch
    if arch in MOE_ARCHS:
        model_type, experts_key = MOE_ARCHS[arch]
        if "num_experts" not in shape:
            shape.update(MOE_SHAPES[preset])
        if arch == "mixtral":  # Mixtral's experts are intermediate_size wide and always renormalised
            shape["intermediate_size"] = shape.pop("moe_intermediate_size")
            shape.pop("norm_topk_prob")
        shape[experts_key] = shape.pop("num_experts")
    shape["vocab_size"] = max(shape.get("vocab_size", 0), len(tokenizer))
    shape.setdefault("tie_word_embeddings", False)
    return AutoConfig.for_model(
        model_type,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **{RANDOM_WEIGHTS_KEY: True},  # read by the engine (ModelSpec.random_weights): runs and reports say so
        **shape,
    )


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen3",
    *,
    preset: str = "tiny",
    vocab_size: int = 4096,
    seed: int = 0,
    dtype: str = "float32",
    max_position_embeddings: int = 4096,
    device: str = "cpu",
    weights_at_load: bool = False,
) -> Path:
    """Save a random-weight `arch` model with an offline tokenizer (of `vocab_size` tokens) to `out_dir`; returns the
    directory. `device` draws the weights there: on a GPU an 8B-shaped model takes seconds instead of minutes (the
    weights differ from a CPU build's with the same seed). `weights_at_load` writes no weights, only a marker
    (detaudit.engine.config.RANDOM_WEIGHTS) from which the local engine draws seeded random weights on its device
    as it loads: for shapes too big to write (a 30B MoE); transformers cannot load such a directory."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} already exists and is not empty")
    _check_names(arch, preset)  # before the tokenizer is trained
    tokenizer = build_tokenizer(vocab_size)
    config = model_config(arch, preset, tokenizer, max_position_embeddings)
    if weights_at_load:
        config.dtype = dtype
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / RANDOM_WEIGHTS).write_text(json.dumps({"seed": seed}) + "\n")
        return out
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
