"""Triton GeGLU and SwiGLU, forward and backward: ``act(gate) * up``.

Elementwise over two (forward) or three (backward) tensors of one shape, seen as ``M`` rows
of ``N`` elements (``N`` = the last dim; when every tensor is contiguous, one row of
``numel``). Each tensor has its own row strides (:func:`llmkit.kernels._common.row_layout`),
so the two halves of one ``(*, 2N)`` projection are read in place; outputs are contiguous.
Math is float32 whatever the dtype, rounded once on store; the backward recomputes the
activation instead of reading a stored one.

* SwiGLU (``ACT == 0``): ``silu(g) = g s`` with ``s = 1 / (1 + exp(-g))``;
  ``silu'(g) = s (1 + g (1 - s))``.
* GeGLU exact (``ACT == 1``) and tanh (``ACT == 2``): the GELU and its derivative as in
  :mod:`llmkit.kernels.gelu` (the tanh form as ``z / (1 + e)``, ``e = exp(-2u)``, clamped so
  that nothing overflows to inf).

``d gate = dy * up * act'(gate)``, ``d up = dy * act(gate)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import device_guard, flat_or_rows, program_slots, round_to
from ._common import empty as _empty  # the allocation tests poison
from ._compile import CompileSpec
from ._launch import launch
from .gelu import gelu_config

SILU, GELU_ERF, GELU_TANH = 0, 1, 2
"""Values of the kernels' ``ACT`` constexpr."""


def act_code(activation: str, approximate: str = "none") -> int:
    """``ACT`` for ``"silu"`` or ``"gelu"`` with GELU's ``approximate``."""
    if activation == "silu":
        return SILU
    return GELU_TANH if approximate == "tanh" else GELU_ERF


# Kernels keep their helpers inline: see the note in kernels/_common.py.


@triton.jit
def _glu_fwd_kernel(
    g_ptr, u_ptr, out_ptr,
    M, N, inner_rows, g_stride_outer, g_stride_inner, u_stride_outer, u_stride_inner, col_blocks,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = act(gate) * up on one ``BLOCK_M x BLOCK_N`` tile."""
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    outer = (rows // inner_rows).to(tl.int64)
    inner = (rows % inner_rows).to(tl.int64)
    g_row = outer * g_stride_outer + inner * g_stride_inner
    u_row = outer * u_stride_outer + inner * u_stride_inner
    g = tl.load(g_ptr + g_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + u_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        act = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        u2 = 1.5957691216057308 * (g + 0.044715 * g * g * g)  # 2u
        # g * sigmoid(2u); 0 below 2u = -80, where g / (1 + exp(80)) is not once g^3 overflows
        act = tl.where(u2 < -80.0, 0.0 * g, g / (1.0 + tl.exp(tl.minimum(-u2, 80.0))))
    out_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptr + out_offs, round_to(act * u, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr,
    M, N, inner_rows, dy_stride_outer, dy_stride_inner, g_stride_outer, g_stride_inner,
    u_stride_outer, u_stride_inner, col_blocks,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """d gate = dy * up * act'(gate), d up = dy * act(gate) on one tile."""
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    outer = (rows // inner_rows).to(tl.int64)
    inner = (rows % inner_rows).to(tl.int64)
    dy_row = outer * dy_stride_outer + inner * dy_stride_inner
    g_row = outer * g_stride_outer + inner * g_stride_inner
    u_row = outer * u_stride_outer + inner * u_stride_inner
    dy = tl.load(dy_ptr + dy_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + g_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + u_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        act = g * s
        grad = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        grad = cdf + g * (0.3989422804014327 * tl.exp(-0.5 * g * g))
    else:
        u2 = 1.5957691216057308 * (g + 0.044715 * g * g * g)
        e = tl.exp(tl.minimum(-u2, 80.0))
        s = 1.0 / (1.0 + e)
        act = tl.where(u2 < -80.0, 0.0 * g, g * s)
        grad = s + g * (e * s) * s * (1.5957691216057308 * (1.0 + 0.134145 * g * g))
        # the tails (see kernels/gelu.py): 0 below 2u = -80, 1 above 80; NaN at g = +-inf
        grad = tl.where(u2 < -80.0, 0.0, tl.where(u2 > 80.0, 1.0, grad)) + 0.0 * g
    out_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(dg_ptr + out_offs, round_to(dy * u * grad, dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + out_offs, round_to(dy * act, du_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def glu_forward(gate: Tensor, up: Tensor, act: int) -> Tensor:
    """``act(gate) * up`` (``act``: :data:`SILU`, :data:`GELU_ERF` or :data:`GELU_TANH`).

    ``gate``, ``up``: one shape (any strides) and dtype, float16 / bfloat16 / float32.
    Returns a contiguous tensor of that shape and dtype.
    """
    out = _empty(gate.shape, gate.dtype, gate.device)
    if gate.numel() == 0:
        return out
    (gs, us), m, n, inner_rows, ((g_so, g_si), (u_so, u_si)) = flat_or_rows([gate, up], flat_ok=True)
    cfg = gelu_config(m, n, program_slots(gate.device))
    col_blocks = triton.cdiv(n, cfg.block_n)
    with device_guard(gate):
        launch(
            _glu_fwd_kernel, (triton.cdiv(m, cfg.block_m) * col_blocks,),
            gs, us, out, m, n, inner_rows, g_so, g_si, u_so, u_si, col_blocks,
            ACT=act, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )
    return out


def glu_backward(grad_out: Tensor, gate: Tensor, up: Tensor, act: int) -> tuple[Tensor, Tensor]:
    """``(d gate, d up)`` of ``act(gate) * up``: contiguous, in the inputs' dtype.

    ``grad_out``, ``gate``, ``up``: one shape, any strides; the activation is recomputed.
    """
    dgate = _empty(gate.shape, gate.dtype, gate.device)
    dup = _empty(gate.shape, gate.dtype, gate.device)
    if gate.numel() == 0:
        return dgate, dup
    (dys, gs, us), m, n, inner_rows, strides = flat_or_rows([grad_out, gate, up], flat_ok=True)
    (dy_so, dy_si), (g_so, g_si), (u_so, u_si) = strides
    cfg = gelu_config(m, n, program_slots(gate.device))
    col_blocks = triton.cdiv(n, cfg.block_n)
    with device_guard(gate):
        launch(
            _glu_bwd_kernel, (triton.cdiv(m, cfg.block_m) * col_blocks,),
            dys, gs, us, dgate, dup, m, n, inner_rows, dy_so, dy_si, g_so, g_si, u_so, u_si, col_blocks,
            ACT=act, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )
    return dgate, dup


# --------------------------------------------------------------------------------------
# compile report
# --------------------------------------------------------------------------------------


def _glu_call(backward: bool, m: int, n: int, dtype: torch.dtype, halves: bool, act: int):
    def call():
        if halves:  # the two halves of one (m, 2n) projection: strided rows
            h = torch.empty(m, 2 * n, dtype=dtype, device="meta")
            gate, up = h[:, :n], h[:, n:]
        else:
            gate, up = (torch.empty(m, n, dtype=dtype, device="meta") for _ in range(2))
        if backward:
            return glu_backward(torch.empty(m, n, dtype=dtype, device="meta"), gate, up, act)
        return glu_forward(gate, up, act)
    return call


def compile_specs() -> list[CompileSpec]:
    """Both kernels as launched on an A100 / H100, per activation: contiguous gate and up
    (one flat row), and the two halves of a ``(8192, 2 x 11008)`` projection (strided rows)."""
    specs: list[CompileSpec] = []
    shapes = [("flat", 4096, 11008, False), ("halves_n11008", 8192, 11008, True)]
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for name, m, n, halves in shapes:
        for act, act_name in ((SILU, "silu"), (GELU_ERF, "gelu"), (GELU_TANH, "gelu_tanh")):
            for dt in (("bf16", "fp32") if name == "flat" else ("bf16",)):
                tag = f"{name}_{act_name}_{dt}"
                for backward, kernel in ((False, _glu_fwd_kernel), (True, _glu_bwd_kernel)):
                    specs.append(CompileSpec(f"glu_{'bwd' if backward else 'fwd'}_{tag}", kernel,
                                             _glu_call(backward, m, n, dtypes[dt], halves, act)))
    return specs
