"""Batch-invariance sweep for `detaudit probe kernels`, the kernel tests and the GPU log.

For each op, stock torch and ours (inside ``batch_invariant()``, so the aten overrides are what runs): compute each
probed row alone (M=1), then inside batches of many sizes that cross kernel-heuristic boundaries, starting at random
offsets of a larger input, and compare the probed rows bitwise. Attention is probed as a token computed in a
prefill vs. alone as a decode step, beside 0..n other sequences. The Mixture-of-Experts op (router, top-k, grouped
expert GEMMs, combine) is a row op too: the batch changes how many rows each expert gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

GPU_SIZES = (
    1,
    2,
    3,
    4,
    7,
    8,
    15,
    16,
    17,
    31,
    32,
    33,
    63,
    64,
    65,
    127,
    128,
    129,
    255,
    256,
    257,
    511,
    512,
    513,
    1023,
    1024,
    1025,
    2047,
    2048,
    4095,
    4096,
    8191,
    8192,
)
CPU_SIZES = (1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 64, 127, 128, 255, 256, 257)


@dataclass
class ProbeRow:
    """One op under one implementation: invariant iff every probed row matched its M=1 result bitwise."""

    op: str
    impl: str
    invariant: bool
    max_abs_diff: float
    worst_batch: int | None
    checked: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class ProbeConfig:
    """Problem sizes for one sweep."""

    hidden: int
    vocab: int
    sizes: Sequence[int]
    attn_batches: Sequence[int]
    attn_ctx: int


def default_config(device: str, quick: bool = False) -> ProbeConfig:
    """GPU: Llama-8B-like widths and 1..8192 rows; CPU: narrower widths and up to 257 rows (the CPU path is slow)."""
    if device == "cuda":
        return ProbeConfig(
            hidden=4096,
            vocab=32000,
            sizes=GPU_SIZES[:20] if quick else GPU_SIZES,
            attn_batches=(1, 2, 5, 16, 64),
            attn_ctx=600,
        )
    if quick:
        return ProbeConfig(hidden=128, vocab=1000, sizes=CPU_SIZES[:9], attn_batches=(1, 3), attn_ctx=80)
    return ProbeConfig(hidden=256, vocab=2000, sizes=CPU_SIZES, attn_batches=(1, 2, 5), attn_ctx=150)


def _row_ops(
    hidden: int, vocab: int, dtype: torch.dtype, device: str, g: torch.Generator
) -> dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]]:
    """op name -> (input width, function of a [M, width] input)."""
    from detaudit.kernels.moe import moe

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cpu").to(device=device, dtype=dtype)

    w = rnd(hidden, hidden) / math.sqrt(hidden)
    w_mlp = rnd(2 * hidden, hidden) / math.sqrt(hidden)
    b_row = rnd(hidden, 2 * hidden) / math.sqrt(hidden)
    bias = rnd(2 * hidden)
    norm_w = rnd(hidden)
    experts, inter = 8, hidden // 4
    router = rnd(experts, hidden) / math.sqrt(hidden)
    w13 = rnd(experts, 2 * inter, hidden) / math.sqrt(hidden)
    w2 = rnd(experts, hidden, inter) / math.sqrt(inter)
    return {
        "linear (nn.Linear W^T)": (hidden, lambda x: F.linear(x, w)),
        "linear + bias": (hidden, lambda x: F.linear(x, w_mlp, bias)),
        "mm (row-major B)": (hidden, lambda x: x @ b_row),
        "addmm beta=0.5 alpha=2": (hidden, lambda x: torch.addmm(bias, x, b_row, beta=0.5, alpha=2.0)),
        "bmm (heads)": (
            hidden,
            lambda x: (
                torch.bmm(
                    x.reshape(-1, 8, hidden // 8).transpose(0, 1), w[: hidden // 8, : hidden // 8].expand(8, -1, -1)
                )
                .transpose(0, 1)
                .reshape(x.shape[0], hidden)
            ),
        ),
        "F.rms_norm": (hidden, lambda x: F.rms_norm(x, (hidden,), norm_w, 1e-6)),
        "rmsnorm x.pow(2).mean(-1)": (
            hidden,
            lambda x: x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype),
        ),
        "log_softmax (vocab)": (vocab, lambda x: torch.log_softmax(x.float(), -1)),
        "softmax (vocab)": (vocab, lambda x: torch.softmax(x, -1)),
        "sum (vocab)": (vocab, lambda x: x.float().sum(-1)),
        "mean (hidden)": (hidden, lambda x: x.mean(-1)),
        "moe (8 experts, top-2)": (hidden, lambda x: moe(x, router, w13, w2, 2, True)),
    }


def _probe_rows(
    fn: Callable[[torch.Tensor], torch.Tensor], x_all: torch.Tensor, sizes: Sequence[int], g: torch.Generator
) -> tuple[bool, float, int | None, int]:
    """Compare rows of fn(x_all[o:o+M]) with fn of each row alone, for every M in sizes at random offsets."""
    n_all = x_all.shape[0]
    worst, worst_m, checked = 0.0, None, 0
    invariant = True
    alone: dict[int, torch.Tensor] = {}
    for m in sizes:
        off = int(torch.randint(0, n_all - m + 1, (1,), generator=g, device="cpu"))
        picks = sorted({0, m - 1, *torch.randint(0, m, (3,), generator=g, device="cpu").tolist()})
        out = fn(x_all[off : off + m])
        for p in picks:
            r = off + p
            if r not in alone:
                alone[r] = fn(x_all[r : r + 1])
            a, b = out[p : p + 1], alone[r]
            checked += 1
            if not torch.equal(a, b):
                invariant = False
                d = float((a.double() - b.double()).abs().max())
                d = d if math.isfinite(d) else float("inf")
                if d >= worst:
                    worst, worst_m = d, m
    return invariant, worst, worst_m, checked


def _attention_probe(
    impl_invariant: bool, cfg: ProbeConfig, dtype: torch.dtype, device: str, g: torch.Generator
) -> tuple[bool, float, int | None, int]:
    """Target sequence's tokens as one prefill beside n-1 others vs. each token as a decode step alone."""
    from detaudit.kernels.attention import paged_attention

    hq, hkv, d, page = 8, 2, 64, 16
    ctx_t = cfg.attn_ctx
    max_b = max(cfg.attn_batches)
    lens = [ctx_t] + torch.randint(1, ctx_t, (max_b - 1,), generator=g, device="cpu").tolist()
    n_pages = sum(-(-c // page) for c in lens) + 1
    kc = torch.randn(n_pages, page, hkv, d, generator=g, device="cpu").to(device=device, dtype=dtype)
    vc = torch.randn(n_pages, page, hkv, d, generator=g, device="cpu").to(device=device, dtype=dtype)
    perm = torch.randperm(n_pages, generator=g, device="cpu")
    bt = torch.zeros(max_b, -(-max(lens) // page), dtype=torch.int32, device="cpu")
    i = 0
    for b, c in enumerate(lens):
        for j in range(-(-c // page)):
            bt[b, j] = perm[i]
            i += 1
    bt = bt.to(device)
    scale = 1 / math.sqrt(d)
    q_t = torch.randn(ctx_t, hq, d, generator=g, device="cpu").to(device=device, dtype=dtype)

    def call(q: torch.Tensor, tables: torch.Tensor, qlens: list[int], ctx: list[int]) -> torch.Tensor:
        cu = torch.tensor([0, *torch.tensor(qlens, device="cpu").cumsum(0).tolist()], dtype=torch.int32, device=device)
        return paged_attention(
            q,
            kc,
            vc,
            tables,
            cu,
            torch.tensor(ctx, dtype=torch.int32, device=device),
            scale,
            batch_invariant=impl_invariant,
        )

    probe_pos = sorted({0, ctx_t - 1, *torch.randint(0, ctx_t, (4,), generator=g, device="cpu").tolist()})
    alone = {p: call(q_t[p : p + 1], bt[:1], [1], [p + 1]) for p in probe_pos}
    worst, worst_b, checked, invariant = 0.0, None, 0, True
    for nb in cfg.attn_batches:
        # others: decode rows (q_len 1) and short prefills, at their own context lengths
        qlens = [ctx_t] + [1 if k % 2 else min(lens[k], 7) for k in range(1, nb)]
        qs = [q_t] + [
            torch.randn(ql, hq, d, generator=g, device="cpu").to(device=device, dtype=dtype) for ql in qlens[1:]
        ]
        out = call(torch.cat(qs), bt[:nb], qlens, lens[:nb])
        for p in probe_pos:
            checked += 1
            if not torch.equal(out[p : p + 1], alone[p]):
                invariant = False
                dd = float((out[p : p + 1].double() - alone[p].double()).abs().max())
                if dd >= worst:
                    worst, worst_b = dd, nb
    return invariant, worst, worst_b, checked


def run_sweep(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    impls: Sequence[str] = ("stock", "ours"),
    cfg: ProbeConfig | None = None,
    seed: int = 0,
    ops: Sequence[str] | None = None,
) -> list[ProbeRow]:
    """Sweep every op for each implementation; ``ops`` filters by name (``attention`` is one of them)."""
    from detaudit.kernels import batch_invariant

    cfg = cfg or default_config(device)
    rows: list[ProbeRow] = []
    for impl in impls:
        g = torch.Generator(device="cpu").manual_seed(seed)
        table = _row_ops(cfg.hidden, cfg.vocab, dtype, device, g)
        max_m = max(cfg.sizes)
        inputs: dict[int, torch.Tensor] = {}
        for name, (width, fn) in table.items():
            if ops is not None and name not in ops:
                continue
            if width not in inputs:
                inputs[width] = torch.randn(max_m + 64, width, generator=g, device="cpu").to(device=device, dtype=dtype)
            with torch.inference_mode():
                if impl == "ours":
                    with batch_invariant():
                        res = _probe_rows(fn, inputs[width], cfg.sizes, g)
                else:
                    res = _probe_rows(fn, inputs[width], cfg.sizes, g)
            rows.append(ProbeRow(name, impl, *res))
        if ops is None or "attention" in ops:
            with torch.inference_mode():
                res = _attention_probe(impl == "ours", cfg, dtype, device, g)
            rows.append(ProbeRow("attention (prefill vs decode, n seqs)", impl, *res))
    return rows
