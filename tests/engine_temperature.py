"""The local engine sampling at known temperatures, for the background-temperature validation (issue #18).

The engine's sampler draws a token at temperature T by Gumbel-max over the raw logits / T, seeded per (seed,
position) (detaudit/engine/sampler.py), and records the raw log-softmax top-k: exactly what the estimator assumes
of an endpoint. Each of the N samples gets its own seed, so they are independent draws; with batch-invariant
kernels the samples that share a prefix see the same logits whatever the batch, as an ideal sampler's would.

A random-weight tiny model's logits are nearly flat (std ~0.3 over the vocabulary): at T = 0.05 most draws fall
outside any top-k. `sharpen` scales its output layer so the logits spread like a trained model's (top-1 - top-2
margins of order 1, a log-uniform-ish tail down to near-ties). Shared by tests/test_background_engine.py and
benchmarks/background_temperature_engine.py.
"""

from __future__ import annotations

from pathlib import Path

from detaudit.analysis.background_temperature import BackgroundTemperature, background_temperature
from detaudit.engine.llm import Engine, EngineConfig
from detaudit.engine.sequence import SamplingParams, Sequence

TOPICS = (
    "the history of the printing press", "how bees find flowers", "why the sky is blue", "a recipe for bread",
    "the rules of chess", "how a compiler works", "the water cycle", "the life of a star", "how vaccines work",
    "the French revolution", "a day at the beach", "how to tie a knot", "the game of go", "volcanoes",
    "the number pi", "how trains run", "a letter to a friend", "the moon landing", "how paper is made", "tides",
)  # fmt: skip


def sharpen(model_dir: Path, scale: float) -> Path:
    """Multiply the output layer of a saved model by `scale` (its logits too), in place; returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        head = model.get_output_embeddings()
        if model.config.tie_word_embeddings:
            raise ValueError("sharpen needs an untied output layer (scaling a tied one scales the inputs too)")
        head.weight.mul_(scale)
    model.save_pretrained(model_dir)
    return model_dir


def engine(model_dir: Path | str, max_batch: int = 64, device: str = "cpu", kernels: str = "batch-invariant") -> Engine:
    """The engine the validation samples with: fp32, batch-invariant kernels by default. Stock kernels serve too
    when all N samples of a trial fit one batch (max_batch >= N): they then decode in lockstep, every step one batch
    of the same N rows, so the samples that share a prefix get the same logits."""
    return Engine(
        EngineConfig(
            str(model_dir),
            device=device,
            dtype="float32",
            kernels=kernels,
            max_batch=max_batch,
            max_batched_tokens=max(2048, max_batch),
        )
    )


def prompt_ids(eng: Engine, index: int) -> list[int]:
    """Prompt number `index`: one of TOPICS, numbered so no two trials share a prompt."""
    text = f"Tell me about {TOPICS[index % len(TOPICS)]} (part {index // len(TOPICS) + 1})."
    if eng.tokenizer.chat_template:
        return eng.encode_chat([{"role": "user", "content": text}])
    return eng.encode_text(text)


def draw(
    eng: Engine, prompt: list[int], n: int, temperature: float, seed: int, max_tokens: int, top_k: int
) -> tuple[list[list[int]], list[list[list[int]]], list[list[list[float]]]]:
    """n samples of one prompt at `temperature`, sample i seeded seed + i: tokens, top-k ids, top-k logprobs."""
    seqs = [
        eng.add(
            Sequence(
                list(prompt),
                SamplingParams(
                    max_tokens=max_tokens, temperature=temperature, seed=seed + i, top_logprobs=top_k, ignore_eos=True
                ),
            )
        )
        for i in range(n)
    ]
    while eng.scheduler.has_work():
        eng.step()
    return [s.output_ids for s in seqs], [s.top_ids for s in seqs], [s.top_logprobs for s in seqs]


def trial(
    eng: Engine, index: int, n: int, temperature: float, max_tokens: int = 24, top_k: int = 20
) -> BackgroundTemperature:
    """T_bg of one trial: n samples of prompt `index` at `temperature`, seeds unique to the trial."""
    data = draw(eng, prompt_ids(eng, index), n, temperature, seed=1_000_003 * (index + 1), max_tokens=max_tokens,
                top_k=top_k)  # fmt: skip
    return background_temperature(*data)


def covers(result: BackgroundTemperature, temperature: float) -> bool:
    """Whether the 95 % interval (for an upper bound: [0, upper]) holds the true temperature."""
    assert result.lower is not None and result.upper is not None
    return result.lower <= temperature <= result.upper
