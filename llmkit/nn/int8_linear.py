"""``Int8Linear``: a linear layer with an int8 weight, for inference.

The weight is stored as int8 ``(out_features, in_features)`` (the ``nn.Linear`` layout)
with one float32 scale per output channel; ``forward`` runs ``llmkit.ops.int8_linear``:

* ``mode="w8a8"``: the activations are quantized per token on the fly and multiplied in
  int8 with int32 accumulation (tensor cores on the GPU, ``torch._int_mm`` on the CPU);
* ``mode="w8a16"``: the activations stay in their dtype and the weight is dequantized
  inside the GEMM (on the CPU: a multi-term int8 split of the activations, see
  :func:`llmkit.backends.reference.int8_matmul.w8a16_cpu`).
"""

from __future__ import annotations

import sys
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..ops.int8_matmul import ACTIVATIONS, MODES, dequantize_int8, int8_linear, quantize_int8

__all__ = ["Int8Linear"]


def hf_conv1d_class() -> type | None:
    """HuggingFace's ``Conv1D`` (GPT-2's transposed linear) if transformers is loaded."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_conv1d(module: nn.Module) -> bool:
    """True for HuggingFace ``Conv1D`` modules (weight stored ``(in, out)``)."""
    cls = hf_conv1d_class()
    return cls is not None and isinstance(module, cls)


def _check_mode(mode: str, activation: str) -> None:
    if mode not in MODES:
        raise ValueError(f"Int8Linear: mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"Int8Linear: activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}"
        )


class Int8Linear(nn.Module):
    """``y = activation(x @ (weight * weight_scale[:, None]).T + bias)`` with an int8 weight.

    Args:
        in_features: K, the size of each input sample.
        out_features: N, the size of each output sample.
        bias: whether the layer has a bias (a float ``(N,)`` parameter, ``requires_grad=False``).
        mode: ``"w8a8"`` (int8 activations, int8 GEMM) or ``"w8a16"`` (weight-only int8).
        activation: ``"none"``, ``"gelu"`` or ``"gelu_tanh"``, fused into the GEMM epilogue.
        device, dtype: of the bias (the weight is int8 and the scales float32 always).

    State dict: ``weight`` int8 ``(N, K)``, ``weight_scale`` float32 ``(N,)``, ``bias``
    ``(N,)``. A float ``nn.Linear`` state dict (``weight`` floating, no ``weight_scale``)
    also loads: its weight is quantized on load.

    Input ``(*, K)`` float16 / bfloat16 / float32; output ``(*, N)`` in the input dtype.
    Inference only: the ops have no autograd.
    """

    __constants__ = ["in_features", "out_features", "mode", "activation"]
    weight: Tensor  # int8 buffer
    weight_scale: Tensor  # float32 buffer
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "w8a8",
        activation: str = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_mode(mode, activation)
        if in_features < 0 or out_features < 0:
            raise ValueError(
                f"Int8Linear: in_features and out_features must be >= 0, got {in_features} and {out_features}"
            )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.mode = mode
        self.activation = activation
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            b = torch.zeros(out_features, dtype=dtype or torch.get_default_dtype(), device=device)
            self.bias = nn.Parameter(b, requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_float(cls, module: nn.Module, mode: str = "w8a8", activation: str = "none") -> Int8Linear:
        """Quantize an ``nn.Linear`` or a HuggingFace ``Conv1D`` (per output channel).

        The result lives on the module's device; the bias keeps its dtype. Raises
        ``TypeError`` for other modules and ``ValueError`` for an unsupported mode or a
        weight holding NaN / inf.
        """
        _check_mode(mode, activation)
        if is_conv1d(module):
            weight = cast(Tensor, module.weight).detach().t()  # (in, out) -> (out, in)
        elif isinstance(module, nn.Linear):
            weight = module.weight.detach()
        else:
            raise TypeError(
                f"Int8Linear.from_float: expected torch.nn.Linear or transformers Conv1D, got {type(module).__name__}"
            )
        if not weight.dtype.is_floating_point:
            raise TypeError(f"Int8Linear.from_float: the weight has dtype {weight.dtype}; it must be floating point")
        if weight.device.type == "meta":
            raise ValueError("Int8Linear.from_float: the weight is on the meta device (not materialized)")
        out_features, in_features = weight.shape
        bias = cast("Tensor | None", module.bias)
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            mode=mode,
            activation=activation,
            device=weight.device,
            dtype=bias.dtype if bias is not None else None,
        )
        layer.set_float_weight(weight)
        if bias is not None and layer.bias is not None:  # (the layer has a bias when the module has)
            layer.bias.data.copy_(bias.detach())
        return layer

    @torch.no_grad()
    def set_float_weight(self, weight: Tensor) -> None:
        """Quantize a float ``(out_features, in_features)`` weight into this layer."""
        if list(weight.shape) != [self.out_features, self.in_features]:
            raise ValueError(
                f"Int8Linear: weight has shape {list(weight.shape)}; it must be "
                f"[{self.out_features}, {self.in_features}] (out_features, in_features)"
            )
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("Int8Linear: the weight holds NaN or inf; it cannot be quantized")
        if weight.dtype == torch.float64:
            weight = weight.to(torch.float32)
        q, scale = quantize_int8(weight, -1)
        self.weight.copy_(q.to(self.weight.device))
        self.weight_scale.copy_(scale.to(self.weight_scale.device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``weight * weight_scale[:, None]``, ``(out_features, in_features)``."""
        return dequantize_int8(self.weight, self.weight_scale, -1, dtype)

    # -- forward ------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        bias = self.bias
        if bias is not None and bias.dtype not in (input.dtype, torch.float32):
            bias = bias.to(input.dtype)
        return int8_linear(input, self.weight, self.weight_scale, bias, self.mode, self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"mode={self.mode!r}"
            + (f", activation={self.activation!r}" if self.activation != "none" else "")
            + f", weight=int8{list(self.weight.shape)}, weight_scale=float32{list(self.weight_scale.shape)}"
        )

    # -- dtype / device moves and loading -------------------------------------------------

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        # model.half() / .to(bfloat16) would cast the float32 scales; move them, keep float32.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device=self.weight_scale.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, Tensor) and weight.dtype.is_floating_point and prefix + "weight_scale" not in state_dict:
            # A float nn.Linear state dict: quantize its weight.
            state_dict = dict(state_dict)
            try:
                self.set_float_weight(weight.to(self.weight.device))
            except ValueError as exc:
                error_msgs.append(f"While loading {prefix}weight: {exc}")
                return
            state_dict[prefix + "weight"] = self.weight.detach().clone()
            state_dict[prefix + "weight_scale"] = self.weight_scale.detach().clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
