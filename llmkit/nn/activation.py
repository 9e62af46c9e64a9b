"""``GELU``: a drop-in subclass of ``torch.nn.GELU`` computed by :func:`llmkit.ops.gelu`."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops

__all__ = ["GELU"]


class GELU(torch.nn.GELU):
    """``torch.nn.GELU(approximate="none" | "tanh")`` through the fused llmkit op.

    Any shape and dtype (float16 / bfloat16 computed in float32); output has the
    input's shape and dtype. When a ``GELU`` follows a ``Linear`` with a bias inside
    llmkit's Transformer layers, the bias add is fused into it
    (:func:`llmkit.ops.bias_gelu`).
    """

    def forward(self, input: Tensor) -> Tensor:
        return ops.gelu(input, self.approximate)
