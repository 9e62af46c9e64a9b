"""``linear``: ``activation(input @ weight^T + bias)`` for llmkit's modules and swapped blocks.

An internal, composite dispatch point, not a custom op: it composes ATen's GEMM with llmkit's
GELU ops (which dispatch themselves, and which ``torch.compile`` sees):
:func:`llmkit.nn._fused.dense` calls it for the linears of ``llmkit.nn`` layers, llmkit's
models and swapped HuggingFace blocks. ``activation`` is None or
a GELU's ``approximate`` (``"none"`` / ``"tanh"``). The reference backend's implementation
(``llmkit/backends/reference/linear.py``) adds the bias inside the GELU kernel
(``bias_gelu``); its variants are the CPU speed choices: one oneDNN GEMM with the bias and
GELU in its epilogue for float32 inference, and the GEMM adding the bias on other CPU calls.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ..dispatch import DispatchPoint

__all__ = ["LinearCall", "linear_forward"]


class LinearCall(NamedTuple):
    input: Tensor
    weight: Tensor
    bias: Tensor | None
    activation: str | None


linear_forward = DispatchPoint("linear", "forward", LinearCall, composite=True)
