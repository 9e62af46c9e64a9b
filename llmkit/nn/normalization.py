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
    """``torch.nn.RMSNorm`` computed by :func:`llmkit.ops.rms_norm`, with the LLM options.

    Args: those of ``torch.nn.RMSNorm`` (``normalized_shape``, ``eps=None`` meaning
    ``torch.finfo(input.dtype).eps``, ``elementwise_affine=True``, ``device``, ``dtype``),
    and, keyword-only:

    * ``offset``: the scale is ``offset + weight`` (Gemma: ``offset=1.0``); the weight then
      starts at ``1 - offset`` (zeros for Gemma), so a fresh module is the identity scale.
    * ``cast_before_weight``: round the normalized value to the input dtype before the
      weight multiply (Llama's and T5's order) instead of once after it.

    Shapes: input ``(*, *normalized_shape)``; output the same shape and dtype.
    ``out = input * rsqrt(mean(input**2) + eps) * (offset + weight)``, accumulated in float32.
    """

    offset: float = 0.0
    cast_before_weight: bool = False

    def __init__(
        self,
        normalized_shape,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        offset: float = 0.0,
        cast_before_weight: bool = False,
    ) -> None:
        # set before torch.nn.RMSNorm's __init__, which calls reset_parameters
        self.offset, self.cast_before_weight = float(offset), bool(cast_before_weight)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.constant_(self.weight, 1.0 - self.offset)

    def extra_repr(self) -> str:
        extra = "".join(
            [
                f", offset={self.offset}" if self.offset else "",
                ", cast_before_weight=True" if self.cast_before_weight else "",
            ]
        )
        return super().extra_repr() + extra

    def forward(self, input: Tensor) -> Tensor:
        return ops.rms_norm(
            input,
            self.normalized_shape,
            self.weight,
            self.eps,
            offset=self.offset,
            cast_before_weight=self.cast_before_weight,
        )
