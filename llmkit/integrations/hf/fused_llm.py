"""Fused ``forward`` methods of the LLM families: Llama, Mistral, Qwen2, Gemma and T5.

* RMSNorms, each with its model's casting order and dtypes (``llmkit_rms_args`` tells
  :func:`llmkit.nn._fused.add_norm` how to fuse a residual add into it):
  ``LlamaRMSNorm`` / ``MistralRMSNorm`` / ``Qwen2RMSNorm`` compute ``weight * x_hat.to(dtype)``
  (``cast_before_weight``; a weight of another dtype promotes the product, as in the model),
  ``GemmaRMSNorm`` ``(x_hat * (1 + weight.float())).type_as(x)`` (``offset=1.0``),
  ``T5LayerNorm`` rounds ``x_hat`` to a half weight's dtype before the product.
* gated MLPs: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with the activation and
  product in one op (SwiGLU for a SiLU, GeGLU for a GELU), and T5's
  ``T5DenseGatedActDense`` (``wo(dropout(act(wi_0(h)) * wi_1(h)))``).
* decoder layers (Llama, Mistral, Qwen2, Gemma): the attention's residual add fused into
  ``post_attention_layernorm`` (:func:`llmkit.ops.add_rms_norm`).

An activation or norm llmkit does not know (or one with hooks) runs as the model wrote it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ... import ops
from ..._compat import cache_kwarg, pop_cache
from ...nn._fused import GluFlavor, _hooked, add_norm, gated_mlp, glu, glu_flavor, linear
from .fused import _TransformersModule

__all__ = ["LLM_FAMILIES"]

LLM_FAMILIES = ("llama", "mistral", "qwen2", "gemma")
"""The transformers model folders whose norms, MLPs and decoder layers swap fuses."""

_HALF = (torch.float16, torch.bfloat16)


def hf_glu_flavor(activation: object) -> GluFlavor | None:
    """:func:`llmkit.nn._fused.glu_flavor`, and transformers' own ``SiLUActivation``."""
    name = type(activation).__name__
    if (
        name == "SiLUActivation"
        and type(activation).__module__.startswith("transformers.")
        and isinstance(activation, nn.Module)
        and not _hooked(activation)
    ):
        return "swiglu", None
    return glu_flavor(activation)


class _FusedLlamaRMSNorm(_TransformersModule):
    """``LlamaRMSNorm`` (and Mistral's, Qwen2's): ``weight * x_hat.to(input_dtype)``."""

    weight: nn.Parameter
    variance_epsilon: float

    def llmkit_rms_args(self, dtype: torch.dtype) -> tuple[list[int], Tensor, float, float, bool] | None:
        w = self.weight
        return (list(w.shape), w, self.variance_epsilon, 0.0, True) if w.dtype == dtype else None

    def forward(self, hidden_states: Tensor) -> Tensor:
        args = self.llmkit_rms_args(hidden_states.dtype)
        if args is None:  # a weight of another dtype: the model's product promotes
            return self.weight * ops.rms_norm(hidden_states, list(self.weight.shape), None, self.variance_epsilon)
        ns, w, eps, offset, cast = args
        return ops.rms_norm(hidden_states, ns, w, eps, offset=offset, cast_before_weight=cast)


class _FusedGemmaRMSNorm(_TransformersModule):
    """``GemmaRMSNorm``: ``(x_hat * (1 + weight.float())).type_as(x)``, all in float32."""

    weight: nn.Parameter
    eps: float

    def llmkit_rms_args(self, dtype: torch.dtype) -> tuple[list[int], Tensor, float, float, bool]:
        w: Tensor = self.weight
        if w.dtype != dtype and not (dtype in _HALF and w.dtype == torch.float32):
            # the model multiplies by the float32 weight whatever its dtype (float64: computed in float64)
            w = w.to(torch.float64 if dtype == torch.float64 else torch.float32)
        return list(w.shape), w, self.eps, 1.0, False

    def forward(self, x: Tensor) -> Tensor:
        ns, w, eps, offset, cast = self.llmkit_rms_args(x.dtype)
        return ops.rms_norm(x, ns, w, eps, offset=offset, cast_before_weight=cast)


class _FusedT5LayerNorm(_TransformersModule):
    """``T5LayerNorm``: ``x_hat`` in float32, rounded to a half weight's dtype, times the weight."""

    weight: nn.Parameter
    variance_epsilon: float

    def llmkit_rms_args(self, dtype: torch.dtype) -> tuple[list[int], Tensor, float, float, bool] | None:
        w = self.weight
        return (list(w.shape), w, self.variance_epsilon, 0.0, dtype in _HALF) if w.dtype == dtype else None

    def forward(self, hidden_states: Tensor) -> Tensor:
        args = self.llmkit_rms_args(hidden_states.dtype)
        if args is not None:
            ns, w, eps, offset, cast = args
            return ops.rms_norm(hidden_states, ns, w, eps, offset=offset, cast_before_weight=cast)
        ns, eps = list(self.weight.shape), self.variance_epsilon
        if self.weight.dtype in _HALF:  # x_hat (float32 math) rounded to the weight's dtype, then the product
            return self.weight * ops.rms_norm(hidden_states.float(), ns, None, eps).to(self.weight.dtype)
        return ops.rms_norm(hidden_states.to(self.weight.dtype), ns, self.weight, eps)  # float32 x_hat and weight


class _FusedGatedMLP(_TransformersModule):
    """Llama / Mistral / Qwen2 / Gemma MLP: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act_fn: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, self.act_fn, hf_glu_flavor(self.act_fn))


class _FusedT5GatedFF(_TransformersModule):
    """T5's ``T5DenseGatedActDense``: ``wo(dropout(act(wi_0(h)) * wi_1(h)))``, ``wo``'s input
    cast to its weight's dtype as the model does (``wo`` kept in float32)."""

    wi_0: nn.Module
    wi_1: nn.Module
    wo: nn.Module
    dropout: nn.Module
    act: nn.Module

    def forward(self, hidden_states: Tensor) -> Tensor:
        flavor = hf_glu_flavor(self.act)
        gate, up = linear(hidden_states, self.wi_0), linear(hidden_states, self.wi_1)
        h = self.dropout(self.act(gate) * up if flavor is None else glu(gate, up, flavor))
        w = getattr(self.wo, "weight", None)
        if isinstance(w, Tensor) and h.dtype != w.dtype and w.dtype != torch.int8:
            h = h.to(w.dtype)
        return linear(h, self.wo)


class _FusedDecoderLayer(_TransformersModule):
    """Llama / Mistral / Qwen2 / Gemma decoder layer: the attention's residual add fused into
    ``post_attention_layernorm`` (``add_rms_norm``). The cache goes on to the attention under
    the name its forward takes (``cache`` or ``past_key_values``)."""

    self_attn: nn.Module
    mlp: nn.Module
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        cache = cache if cache is not None else pop_cache(kwargs)
        kwargs[cache_kwarg(type(self.self_attn).forward)] = cache
        residual = hidden_states
        h, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        h, hidden_states = add_norm(h, residual, self.post_attention_layernorm)
        return hidden_states + self.mlp(h)
