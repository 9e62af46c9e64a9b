"""Helpers shared by the Triton kernel modules: output allocation, row layouts of strided
tensors, launch sizing, the bfloat16 rounding the interpreter needs, and the deterministic
sum of per-program partial rows (the parameter gradients of the norm and GELU backwards).

Importing this module (every kernel module does) makes Triton's interpreter usable with
the installed numpy where it needs a fix (see :func:`llmkit._compat.fix_triton_interpreter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._compat import fix_triton_interpreter, triton_interpreting
from ._launch import device_target, launch

INTERPRETING = triton_interpreting()
"""True under ``TRITON_INTERPRET=1``: kernels run in Triton's interpreter on CPU tensors."""

if INTERPRETING:
    fix_triton_interpreter()


ROW_ELEMENTS = 4096
"""Elements a program handles per step when several short rows share one program."""
CPU_PROGRAM_SLOTS = 2
"""Stand-in for the SM count when the kernels run in the interpreter: few programs (the
interpreter runs them one after the other), still several row groups and rows per program."""


def program_slots(device: torch.device) -> int:
    """Number of SMs launches on ``device`` plan for (see
    :func:`~llmkit.kernels._launch.device_target`); the interpreter gets a small fixed stand-in."""
    target = device_target(device)
    return target.sms if target is not None else CPU_PROGRAM_SLOTS


def num_warps_for(elements: int) -> int:
    """Warps for a program that touches ``elements`` values per step: about 8 per thread
    (one 128-bit load of 16-bit values), so few registers per thread and many warps per SM."""
    return max(1, min(32, triton.next_power_of_2(max(elements, 1)) // 256))


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocation of every kernel output and scratch buffer. Kernel modules bind it as their
    ``_empty``, which tests replace to poison what a kernel must write."""
    return torch.empty(shape, dtype=dtype, device=device)


def device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s CUDA device current for the launch (a no-op on the CPU)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# row layouts (strided rows without a copy)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class RowLayout:
    """How the kernels address the rows of several same-shape tensors.

    Row ``r`` of tensor ``i`` starts at element
    ``(r // inner_rows) * strides[i][0] + (r % inner_rows) * strides[i][1]`` of
    ``tensors[i]``; its ``n`` elements follow with unit stride.
    """

    tensors: list[Tensor]
    inner_rows: int
    strides: list[tuple[int, int]]
    m: int
    n: int


def _tail_packed(t: Tensor, k: int) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[t.dim() - k:]), reversed(t.stride()[t.dim() - k:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _lead_breaks(t: Tensor, dims: Sequence[int]) -> set[int]:
    return {
        j for j in range(len(dims) - 1)
        if t.stride(dims[j]) != t.stride(dims[j + 1]) * t.shape[dims[j + 1]]
    }


def row_layout(tensors: Sequence[Tensor], k: int) -> RowLayout:
    """Rows of ``tensors`` (same shape ``(*lead, *tail)``, ``len(tail) == k``) without copies.

    A tensor is copied (``.contiguous()``) only when its ``k`` trailing dims are not
    packed with unit stride, or when the leading dims of all tensors together cannot be
    described by two strides per tensor.
    """
    shape = tensors[0].shape
    lead = list(shape[: len(shape) - k])
    n = math.prod(shape[len(shape) - k:])
    m = math.prod(lead)
    ts = [t if _tail_packed(t, k) else t.contiguous() for t in tensors]
    dims = [d for d, s in enumerate(lead) if s != 1]
    breaks = [_lead_breaks(t, dims) for t in ts]
    union = set().union(*breaks)
    if len(union) > 1:
        ts = [t.contiguous() if b else t for t, b in zip(ts, breaks, strict=True)]
        union = set()
    if not dims:
        return RowLayout(ts, 1, [(n, 0)] * len(ts), m, n)
    if not union:
        return RowLayout(ts, 1, [(t.stride(dims[-1]), 0) for t in ts], m, n)
    (j,) = union
    inner_rows = math.prod(lead[d] for d in dims[j + 1:])
    return RowLayout(ts, inner_rows, [(t.stride(dims[j]), t.stride(dims[-1])) for t in ts], m, n)


def flat_or_rows(tensors: list[Tensor], flat_ok: bool):
    """For elementwise kernels: ``(tensors, M, N, inner_rows, strides)``, one flat row of
    ``numel`` when ``flat_ok`` and every tensor is contiguous, else their :func:`row_layout`
    over the last dim."""
    if flat_ok and all(t.is_contiguous() for t in tensors):
        n = tensors[0].numel()
        return tensors, 1, n, 1, [(0, 0)] * len(tensors)
    if tensors[0].dim() == 0:
        tensors = [t.reshape(1) for t in tensors]
    layout = row_layout(tensors, 1)
    return layout.tensors, layout.m, layout.n, layout.inner_rows, layout.strides


# --------------------------------------------------------------------------------------
# kernel helpers
#
# Kernels keep small helpers inline rather than as nested @triton.jit functions where they
# run per element in a hot loop: the Triton interpreter re-patches triton.language on every
# nested call, which costs as much as several block operations in the CPU tests.
# --------------------------------------------------------------------------------------

BF16_ROUND_BY_BITS = tl.constexpr(INTERPRETING)
"""True under TRITON_INTERPRET: Triton 3.x's interpreter converts float32 -> bfloat16 by
truncation, where the GPU rounds to nearest even; the interpreted kernels then round the
bits themselves so CPU results match the GPU's. Compiled kernels use the native cvt.rn."""


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to nearest even in ``dtype``."""
    if BF16_ROUND_BY_BITS and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        x = tl.where(x != x, x, (bits & 0xFFFF0000).to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def sum_partials_kernel(part_ptr, out_ptr, G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[j] = sum over g of part[g, j], always in the same order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        mask = (gs < G)[:, None] & col_ok[None, :]
        acc += tl.load(part_ptr + gs.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, round_to(tl.sum(acc, axis=0), out_ptr.dtype.element_ty), mask=col_ok)


def sum_partials_config(g: int, n: int, slots: int) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_N, num_warps) for summing ``g`` partial rows of ``n``: ~1 program per SM."""
    block_n = max(128, min(ROW_ELEMENTS, triton.next_power_of_2(triton.cdiv(n, slots))))
    block_g = max(1, min(triton.next_power_of_2(g), ROW_ELEMENTS // block_n))
    return block_g, block_n, num_warps_for(block_g * block_n)


def sum_partials(partials: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum a ``(G, N)`` float32 tensor of partial sums over ``G`` into a new ``(N,)`` tensor."""
    g, n = partials.shape
    out = empty((n,), dtype, partials.device)
    block_g, block_n, warps = sum_partials_config(g, n, program_slots(partials.device))
    launch(
        sum_partials_kernel, (triton.cdiv(n, block_n),),
        partials, out, g, n, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=warps
    )
    return out
