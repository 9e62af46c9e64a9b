"""``LayerNorm`` and ``RMSNorm``: drop-in subclasses of their ``torch.nn`` counterparts.

Same constructor, parameters (``weight``, ``bias``), ``state_dict`` keys, ``repr`` and
initialization as ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm``; ``isinstance(m,
torch.nn.LayerNorm)`` stays true. Only ``forward`` differs: it runs the fused
``llmkit.ops`` kernel (one read of the input and one write of the output, statistics
in float32) chosen per call by llmkit's dispatch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by :func:`llmkit.ops.layer_norm`.

    Args: exactly those of ``torch.nn.LayerNorm`` (``normalized_shape``, ``eps=1e-5``,
    ``elementwise_affine=True``, ``bias=True``, ``device``, ``dtype``).

    Shapes: input ``(*, *normalized_shape)``; output the same shape and the input's
    dtype. float16 / bfloat16 inputs are normalized in float32 and rounded once.
    """

    def forward(self, input: Tensor) -> Tensor:
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by :func:`llmkit.ops.rms_norm`.

    Args: exactly those of ``torch.nn.RMSNorm`` (``normalized_shape``, ``eps=None``
    meaning ``torch.finfo(input.dtype).eps``, ``elementwise_affine=True``, ``device``,
    ``dtype``).

    Shapes: input ``(*, *normalized_shape)``; output the same shape and dtype.
    ``out = input * rsqrt(mean(input**2) + eps) * weight``, accumulated in float32.
    """

    def forward(self, input: Tensor) -> Tensor:
        return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps)
