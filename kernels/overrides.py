"""The aten kernels ``batch_invariant()`` installs, with aten's exact signatures.

CUDA key: functional and ``.out`` overloads, all computed by our Triton kernels. CPU key: functional overloads,
computed on fixed 16-row blocks by :mod:`detaudit.kernels.cpu`, which calls the stock ``.out`` kernels (left in
place on CPU for that reason). Every call is counted for :func:`detaudit.kernels.coverage`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from detaudit.kernels import cpu
from detaudit.kernels.coverage import note_protected

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _to_out(out: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    if out.shape != res.shape:
        out.resize_(res.shape)
    out.copy_(res)
    return out


def _check_cuda_float(name: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype not in _FLOATS:
            raise TypeError(f"detaudit batch-invariant {name}: dtype {t.dtype} is not supported on CUDA")


# ---- CUDA (Triton) ------------------------------------------------------------------------------------------


def _tm():  # noqa: ANN202 - module import deferred until a CUDA tensor shows up
    from detaudit.kernels import triton_matmul

    return triton_matmul


def _tr():  # noqa: ANN202
    from detaudit.kernels import triton_rowwise

    return triton_rowwise


def cuda_mm(self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    note_protected("aten::mm")
    _check_cuda_float("mm", self, mat2)
    return _tm().matmul(self, mat2)


def cuda_mm_out(self: torch.Tensor, mat2: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    note_protected("aten::mm.out")
    _check_cuda_float("mm", self, mat2)
    return _to_out(out, _tm().matmul(self, mat2))


def cuda_addmm(
    self: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta: float = 1, alpha: float = 1
) -> torch.Tensor:
    note_protected("aten::addmm")
    _check_cuda_float("addmm", self, mat1, mat2)
    return _tm().matmul(mat1, mat2, self, alpha=float(alpha), beta=float(beta))


def cuda_addmm_out(
    self: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta: float = 1, alpha: float = 1, out: torch.Tensor
) -> torch.Tensor:
    note_protected("aten::addmm.out")
    _check_cuda_float("addmm", self, mat1, mat2)
    return _to_out(out, _tm().matmul(mat1, mat2, self, alpha=float(alpha), beta=float(beta)))


def cuda_bmm(self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    note_protected("aten::bmm")
    _check_cuda_float("bmm", self, mat2)
    return _tm().bmm(self, mat2)


def cuda_bmm_out(self: torch.Tensor, mat2: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    note_protected("aten::bmm.out")
    _check_cuda_float("bmm", self, mat2)
    return _to_out(out, _tm().bmm(self, mat2))


def _cuda_softmax(name: str, log: bool) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    def fn(self: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
        note_protected(f"aten::{name}")
        _check_cuda_float(name, self)
        return _tr().softmax(self, dim, log, torch.float32 if half_to_float else self.dtype)

    def fn_out(self: torch.Tensor, dim: int, half_to_float: bool, *, out: torch.Tensor) -> torch.Tensor:
        note_protected(f"aten::{name}.out")
        _check_cuda_float(name, self)
        return _to_out(out, _tr().softmax(self, dim, log, torch.float32 if half_to_float else self.dtype))

    return fn, fn_out


cuda_softmax, cuda_softmax_out = _cuda_softmax("_softmax", False)
cuda_log_softmax, cuda_log_softmax_out = _cuda_softmax("_log_softmax", True)


def _sum_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return x.dtype if (x.is_floating_point() or x.is_complex()) else torch.int64


def _cuda_reduce(
    x: torch.Tensor, dim: Sequence[int] | None, keepdim: bool, dtype: torch.dtype | None, mean: bool
) -> torch.Tensor:
    if x.is_complex():
        # Sum real and imaginary parts as an extra trailing kept dim.
        xr = torch.view_as_real(x)
        dims = list(range(x.dim())) if not dim else [d % x.dim() for d in dim]
        res = _cuda_reduce(xr, dims, keepdim, None if dtype is None else dtype.to_real(), mean)
        return torch.view_as_complex(res.contiguous())
    out_dtype = (dtype or x.dtype) if mean else _sum_dtype(x, dtype)
    return _tr().reduce_sum(x, list(dim) if dim else None, keepdim, out_dtype, mean=mean)


def cuda_mean_dim(
    self: torch.Tensor, dim: Sequence[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    note_protected("aten::mean.dim")
    return _cuda_reduce(self, dim, keepdim, dtype, mean=True)


def cuda_mean_out(
    self: torch.Tensor,
    dim: Sequence[int] | None,
    keepdim: bool = False,
    *,
    dtype: torch.dtype | None = None,
    out: torch.Tensor,
) -> torch.Tensor:
    note_protected("aten::mean.out")
    return _to_out(out, _cuda_reduce(self, dim, keepdim, dtype or out.dtype, mean=True))


def cuda_sum_dim(
    self: torch.Tensor, dim: Sequence[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    note_protected("aten::sum.dim_IntList")
    return _cuda_reduce(self, dim, keepdim, dtype, mean=False)


def cuda_sum_out(
    self: torch.Tensor,
    dim: Sequence[int] | None,
    keepdim: bool = False,
    *,
    dtype: torch.dtype | None = None,
    out: torch.Tensor,
) -> torch.Tensor:
    note_protected("aten::sum.IntList_out")
    return _to_out(out, _cuda_reduce(self, dim, keepdim, dtype or out.dtype, mean=False))


def cuda_rms_norm(
    input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None, eps: float | None = None
) -> torch.Tensor:
    note_protected("aten::rms_norm")
    _check_cuda_float("rms_norm", input)
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    return _tr().rms_norm(input, weight, eps, normalized_numel=math.prod(normalized_shape))[0]


# ---- CPU (fixed 16-row blocks) ------------------------------------------------------------------------------


def cpu_mm(self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    note_protected("aten::mm")
    return cpu.mm(self, mat2)


def cpu_addmm(
    self: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta: float = 1, alpha: float = 1
) -> torch.Tensor:
    note_protected("aten::addmm")
    return cpu.addmm(self, mat1, mat2, beta=beta, alpha=alpha)


def cpu_bmm(self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    note_protected("aten::bmm")
    return cpu.bmm(self, mat2)


def cpu_softmax(self: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    note_protected("aten::_softmax")
    return cpu.softmax(self, dim, half_to_float)


def cpu_log_softmax(self: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    note_protected("aten::_log_softmax")
    return cpu.log_softmax(self, dim, half_to_float)


def cpu_mean_dim(
    self: torch.Tensor, dim: Sequence[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    note_protected("aten::mean.dim")
    return cpu.mean_dim(self, dim, keepdim, dtype)


def cpu_sum_dim(
    self: torch.Tensor, dim: Sequence[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    note_protected("aten::sum.dim_IntList")
    return cpu.sum_dim(self, dim, keepdim, dtype)


def cpu_rms_norm(
    input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None, eps: float | None = None
) -> torch.Tensor:
    note_protected("aten::rms_norm")
    return cpu.rms_norm(input, weight, eps, normalized_ndim=len(normalized_shape))


# Custom ops that switch themselves: they read detaudit.kernels.is_enabled() and count themselves as protected, so
# coverage() treats them as ours inside a block (at both keys) and as order-sensitive stock outside one.
SELF_SWITCHED = ("detaudit::moe",)

# (aten op name incl. overload, kernel) per dispatch key.
CUDA_TABLE: list[tuple[str, Callable[..., torch.Tensor]]] = [
    ("mm", cuda_mm),
    ("mm.out", cuda_mm_out),
    ("addmm", cuda_addmm),
    ("addmm.out", cuda_addmm_out),
    ("bmm", cuda_bmm),
    ("bmm.out", cuda_bmm_out),
    ("_softmax", cuda_softmax),
    ("_softmax.out", cuda_softmax_out),
    ("_log_softmax", cuda_log_softmax),
    ("_log_softmax.out", cuda_log_softmax_out),
    ("mean.dim", cuda_mean_dim),
    ("mean.out", cuda_mean_out),
    ("sum.dim_IntList", cuda_sum_dim),
    ("sum.IntList_out", cuda_sum_out),
    ("rms_norm", cuda_rms_norm),
]
CPU_TABLE: list[tuple[str, Callable[..., torch.Tensor]]] = [
    ("mm", cpu_mm),
    ("addmm", cpu_addmm),
    ("bmm", cpu_bmm),
    ("_softmax", cpu_softmax),
    ("_log_softmax", cpu_log_softmax),
    ("mean.dim", cpu_mean_dim),
    ("sum.dim_IntList", cpu_sum_dim),
    ("rms_norm", cpu_rms_norm),
]
