"""The sparse Mixture-of-Experts feed-forward of Qwen3-MoE and Mixtral layers, over packed [tokens, hidden] batches.

Experts are held stacked (``w13`` [E, 2I, H]: each expert's gate rows then up rows; ``w2`` [E, H, I]) and run by one
op, :func:`detaudit.kernels.moe.moe`, which takes its batch-invariant path under the step's ``batch_invariant()``
and the stock one (as servers run it) otherwise. Checkpoints keep one tensor per expert and projection;
:func:`checkpoint_names` says which, in the order :func:`detaudit.engine.model.load_model` stacks them.
"""

from __future__ import annotations

import torch
from torch import nn

from detaudit.engine.config import ModelSpec

# model_type -> the per-expert checkpoint projections of w13 (gate, up) and of w2 (down).
_EXPERT_PARTS = {
    "qwen3_moe": {"w13": ("gate_proj", "up_proj"), "w2": ("down_proj",)},
    "mixtral": {"w13": ("w1", "w3"), "w2": ("w2",)},
}
# model_type -> the checkpoint's name for a layer's MoE block (the engine calls it `mlp` for every architecture).
_BLOCK_NAME = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}


class SparseMoE(nn.Module):
    """Router (``gate``, as the checkpoint names it) and stacked SwiGLU experts; no shared expert."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        e, h, i = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.gate = nn.Linear(h, e, bias=False)
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        self.top_k = spec.num_experts_per_tok
        self.renormalize = spec.norm_topk_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from detaudit.kernels.moe import moe

        return moe(x, self.gate.weight, self.w13, self.w2, self.top_k, self.renormalize)


def checkpoint_names(spec: ModelSpec, param: str) -> list[str] | None:
    """The checkpoint tensors an engine MoE parameter is made of: the router's one tensor, or for ``w13``/``w2``
    each expert's parts in the order :func:`stack_experts` stacks them; None for a parameter outside an MoE block."""
    for leaf in ("gate.weight", "w13", "w2"):
        if spec.num_experts and param.endswith(f".mlp.{leaf}"):
            block = param[: -len(f"mlp.{leaf}")] + _BLOCK_NAME[spec.model_type]
            if leaf == "gate.weight":
                return [f"{block}.gate.weight"]
            parts = _EXPERT_PARTS[spec.model_type][leaf]
            return [f"{block}.experts.{e}.{part}.weight" for e in range(spec.num_experts) for part in parts]
    return None


def stack_experts(parts: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    """[E, ...]: the checkpoint tensors of :func:`checkpoint_names` stacked per expert."""
    per = len(parts) // num_experts
    return torch.stack([torch.cat(parts[e * per : (e + 1) * per], dim=0) for e in range(num_experts)])
