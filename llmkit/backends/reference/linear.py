"""``linear`` on the reference backend: ATen's GEMM and llmkit's GELU ops, with two CPU variants.

* variant ``onednn``: float32 CPU inference (no autograd, compile, export, tensor modes or
  autocast; two rows or more): one oneDNN GEMM (``mkldnn._linear_pointwise``, the op
  ``torch.compile``'s CPU backend uses) adds the bias and applies the GELU in its epilogue.
  ``F.linear`` calls MKL's sgemm, which ran its AVX2 code on the AMD CPUs this was measured on
  (docs/benchmarks.md); results agree with ``F.linear`` to float32 rounding. On an Intel CPU
  with an MKL build (:data:`MKL_NATIVE`) MKL runs its own AVX-512 kernels and was as fast or
  faster than oneDNN for a plain GEMM, so there the variant takes only calls with a GELU.
* variant ``bias_in_gemm``: other CPU calls: the GEMM adds the bias as it writes its output (no
  extra pass), then the GELU, in place into that fresh output where the op would run its
  reference anyway.
* the implementation (other devices): ``bias_gelu(input @ weight^T, bias)``, the bias added in
  float32 inside the fused GELU kernel, the pre-activation never rounded.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import ops
from ..._compat import ONEDNN_LINEAR
from ...ops import _fastpath as FP
from ...ops.linear import LinearCall, linear_forward


def _gelu_after(out: Tensor, approximate: str) -> Tensor:
    from ...nn._fused import gelu_after  # the nn layer owns the in-place rule

    return gelu_after(out, approximate)


def _cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), or "" when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    proc = platform.processor()  # Windows: "Intel64 Family 6 Model ..., GenuineIntel"
    return "GenuineIntel" if "GenuineIntel" in proc else ""


def _mkl_native() -> bool:
    return torch.backends.mkl.is_available() and _cpu_vendor() == "GenuineIntel"


MKL_NATIVE: bool = _mkl_native()
"""Whether ``F.linear``'s float32 GEMM is MKL on an Intel CPU, where it runs its own best
kernels: then a GEMM without a GELU stays on ``F.linear`` (measurements in docs/benchmarks.md)."""


def onednn_applies(c: LinearCall) -> bool:
    """Whether the oneDNN variant takes the call (see the module docstring)."""
    x, weight, bias = c.input, c.weight, c.bias
    return (
        ONEDNN_LINEAR is not None
        # on MKL's own CPUs oneDNN pays only for the GELU it fuses into its epilogue
        and (c.activation is not None or not MKL_NATIVE)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.dim() >= 2
        # two rows or more: for one row (a decode step) MKL's GEMV is as fast, and faster
        # against a transposed (Conv1D) weight
        and x.numel() >= 2 * x.shape[-1] > 0
        and weight.dim() == 2
        and FP.eager_ok(x, weight, optional=(bias,))
        # under autocast F.linear runs in the autocast dtype; the oneDNN op would stay float32
        and not torch.is_autocast_enabled(x.device.type)
    )


@linear_forward.register("reference", variant="onednn", prefer=onednn_applies)
def linear_onednn(c: LinearCall) -> Tensor:
    """One oneDNN GEMM: bias and GELU in its epilogue."""
    assert ONEDNN_LINEAR is not None
    if c.activation is None:
        return ONEDNN_LINEAR(c.input, c.weight, c.bias, "none", [], "")
    return ONEDNN_LINEAR(c.input, c.weight, c.bias, "gelu", [], c.activation)


@linear_forward.register("reference", variant="bias_in_gemm", prefer=lambda c: c.input.device.type == "cpu")
def linear_bias_in_gemm(c: LinearCall) -> Tensor:
    """``F.linear`` with the bias, then the GELU on its fresh output."""
    out = F.linear(c.input, c.weight, c.bias)
    return out if c.activation is None else _gelu_after(out, c.activation)


@linear_forward.register("reference")
def linear_reference(c: LinearCall) -> Tensor:
    """``F.linear``; with a GELU and a bias, ``bias_gelu`` adds the bias inside the GELU."""
    if c.activation is None:
        return F.linear(c.input, c.weight, c.bias)
    if c.bias is None:
        return _gelu_after(F.linear(c.input, c.weight), c.activation)
    return ops.bias_gelu(F.linear(c.input, c.weight), c.bias, c.activation)
