"""`detaudit tiny-model --preset`: a preset named after a model builds that model's real shapes, vocabulary included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from detaudit.tiny import PRESETS, model_config

# The published configs (hidden, intermediate, layers, heads, KV heads, head dim, vocabulary, tied embeddings).
REAL = {
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, 128, 151936, True),
    "qwen3-8b": (4096, 12288, 36, 32, 8, 128, 151936, False),
    "qwen3-30b-a3b": (2048, 6144, 48, 32, 4, 128, 151936, False),
}
# Mixture-of-Experts presets (--arch qwen3-moe): experts, active experts, expert width, renormalised top-k.
REAL_MOE = {"qwen3-30b-a3b": (128, 8, 768, True)}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_shapes(preset: str, tiny_model_dir: Path) -> None:
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    cfg = model_config("qwen3-moe" if preset in REAL_MOE else "qwen3", preset, tok)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert emb.shape == head.shape == (cfg.vocab_size, cfg.hidden_size)
    if preset in REAL:
        got = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.vocab_size,
            head is emb,
        )
        assert got == REAL[preset]
        if preset in REAL_MOE:
            moe = (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob)
            assert moe == REAL_MOE[preset] and cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1
        assert cfg.vocab_size > len(tok)  # the embedding is padded past the small tokenizer
    else:  # size presets keep the tokenizer's own vocabulary
        assert cfg.vocab_size == len(tok) and head is not emb


def test_every_model_named_preset_is_checked() -> None:
    assert {p for p in PRESETS if p not in ("tiny", "small")} == set(REAL)


def test_moe_presets_need_the_moe_architecture(tiny_model_dir: Path) -> None:
    from detaudit.errors import UsageError

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    with pytest.raises(UsageError, match="use --arch qwen3-moe"):
        model_config("qwen3", "qwen3-30b-a3b", tok)
    with pytest.raises(UsageError, match="has no experts"):
        model_config("mixtral", "qwen3-8b", tok)
    tiny = model_config("mixtral", "tiny", tok)
    assert (tiny.num_local_experts, tiny.num_experts_per_tok, tiny.intermediate_size) == (8, 2, 128)
