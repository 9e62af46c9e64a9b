"""``GatedMLP``: the gated feed-forward block of LLMs (SwiGLU / GeGLU) on llmkit's fused ops."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._fused import GluFlavor, gated_mlp

__all__ = ["GatedMLP"]

_FLAVORS: dict[str, GluFlavor] = {"silu": ("swiglu", None), "gelu": ("geglu", "none"), "gelu_tanh": ("geglu", "tanh")}


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``, the activation and product fused.

    Args:
        hidden_size: input and output features.
        intermediate_size: features of the gated hidden layer.
        activation: ``"silu"`` (SwiGLU: Llama, Mistral, Qwen2), ``"gelu"`` (GeGLU, exact) or
            ``"gelu_tanh"`` (GeGLU, tanh form: Gemma, T5 v1.1).
        bias: whether the three linears have biases.
        device, dtype: of the parameters.

    Parameters and ``state_dict`` keys are ``gate_proj``, ``up_proj``, ``down_proj`` (each an
    ``nn.Linear``), as in HuggingFace's ``LlamaMLP``. Shapes: ``(*, hidden_size)`` in and out.
    The backward recomputes the activation from ``gate`` and ``up`` instead of storing it.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in _FLAVORS:
            raise ValueError(
                f"GatedMLP: activation must be one of {', '.join(map(repr, _FLAVORS))}, got {activation!r}"
            )
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias, device, dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias, device, dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias, device, dtype)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, x: Tensor) -> Tensor:
        return gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, None, _FLAVORS[self.activation])
