"""What ``llmkit.swap`` does with each HuggingFace module: :func:`plan_module`.

A GELU variant becomes :class:`llmkit.nn.GELU`; the RMSNorms of T5, Llama, Mistral, Qwen2 and
Gemma, the BERT-family and GPT-2 blocks, the gated MLPs and decoder layers of the LLM families
and T5's gated feed-forward get a fused ``forward`` (their class is reassigned to a subclass
made by :mod:`.fused` / :mod:`.fused_llm`); anything else is left, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeGuard

import torch
from torch import nn

from ...nn import GELU
from .fused import (
    _fused_class,
    _FusedDenseAddNorm,
    _FusedGPT2Block,
    _FusedGPT2MLP,
    _FusedIntermediate,
    _FusedSelfAttention,
    from_transformers,
)
from .fused_llm import (
    LLM_FAMILIES,
    _FusedDecoderLayer,
    _FusedGatedMLP,
    _FusedGemmaRMSNorm,
    _FusedLlamaRMSNorm,
    _FusedT5GatedFF,
    _FusedT5LayerNorm,
)
from .registration import MODELING

if TYPE_CHECKING:  # transformers is imported only when the model is already one of its
    from transformers import PreTrainedModel

__all__ = ["Plan", "plan_module", "is_pretrained_model"]


def is_pretrained_model(model: nn.Module) -> TypeGuard[PreTrainedModel]:
    """A transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__ == MODELING for c in type(model).__mro__)


def _gelu_flavor(module: nn.Module) -> tuple[str | None, str]:
    """(approximate, why not) for a transformers activation module."""
    name = type(module).__name__
    if name == "GELUActivation":
        act = getattr(module, "act", None)
        if act is torch.nn.functional.gelu or getattr(act, "__name__", "") == "_gelu_python":
            return "none", ""
        return None, "its act is not the exact GELU"
    if name in ("NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation"):
        return "tanh", ""  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    if name == "GELUTanh":
        return "tanh", ""
    if name == "QuickGELUActivation":
        return None, "x * sigmoid(1.702 x) is not GELU"
    if name == "ClippedGELUActivation":
        return None, "clipped GELU has no llmkit op"
    if "GELU" in name:
        return None, f"no llmkit mapping for {name}"
    return None, ""


_T5_NORMS = ("T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm", "LongT5LayerNorm")
_T5_FAMILIES = ("t5", "mt5", "umt5", "longt5")
_LLAMA_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
_BERT_FAMILIES = ("bert", "roberta", "xlm_roberta", "camembert", "electra", "data2vec")


class Plan:
    """What ``swap`` does with one module.

    ``action`` is ``"replace"`` (``make()`` builds the new module, sharing parameters),
    ``"reclass"`` (``new_class`` is assigned to the object) or ``"left"`` (``note`` says
    why). ``kind`` is the swap kind it belongs to.
    """

    def __init__(
        self,
        kind: str,
        action: str,
        note: str,
        make: Callable[[], nn.Module] | None = None,
        new_class: type | None = None,
        needs: tuple[str, ...] = (),
    ):
        self.kind, self.action, self.note = kind, action, note
        self.make, self.new_class, self.needs = make, new_class, needs


def plan_module(module: nn.Module) -> Plan | None:
    """The swap plan for a transformers module, or None when it is not one llmkit knows."""
    cls = type(module)
    if not from_transformers(cls):
        return None
    name = cls.__name__
    approx, why = _gelu_flavor(module)
    if approx is not None:
        return Plan("gelu", "replace", f"llmkit.nn.GELU(approximate={approx!r})", make=lambda: GELU(approximate=approx))
    if why:
        return Plan("gelu", "left", why)
    if name in _T5_NORMS and from_transformers(cls, *_T5_FAMILIES):
        return Plan(
            "norm",
            "reclass",
            "llmkit rms_norm (x_hat rounded to a half weight's dtype first)",
            new_class=_fused_class(cls, _FusedT5LayerNorm),
        )
    if name in _LLAMA_NORMS and from_transformers(cls, *LLM_FAMILIES):
        return Plan(
            "norm",
            "reclass",
            "llmkit rms_norm (weight * x_hat.to(dtype))",
            new_class=_fused_class(cls, _FusedLlamaRMSNorm),
        )
    if name == "GemmaRMSNorm" and from_transformers(cls, "gemma"):
        return Plan(
            "norm",
            "reclass",
            "llmkit rms_norm (offset 1: x_hat * (1 + weight) in float32)",
            new_class=_fused_class(cls, _FusedGemmaRMSNorm),
        )
    if from_transformers(cls, *LLM_FAMILIES) and name.endswith("MLP") and _gated_mlp_shape(module):
        return Plan(
            "fused",
            "reclass",
            "gate / up projections, activation * up fused (SwiGLU / GeGLU)",
            new_class=_fused_class(cls, _FusedGatedMLP),
        )
    if from_transformers(cls, *LLM_FAMILIES) and name.endswith("DecoderLayer") and _decoder_layer_shape(module):
        return Plan(
            "fused",
            "reclass",
            "attention residual fused into post_attention_layernorm",
            new_class=_fused_class(cls, _FusedDecoderLayer),
        )
    if name == "T5DenseGatedActDense" and from_transformers(cls, *_T5_FAMILIES):
        return Plan(
            "fused",
            "reclass",
            "wi_0 / wi_1 projections, activation * wi_1 fused (GeGLU / SwiGLU)",
            new_class=_fused_class(cls, _FusedT5GatedFF),
        )
    bert_family = from_transformers(cls, *_BERT_FAMILIES)
    if bert_family and name.endswith(("SelfOutput", "Output")) and _dense_add_norm_shape(module):
        return Plan(
            "fused",
            "reclass",
            "dense, dropout, fused residual add + LayerNorm",
            new_class=_fused_class(cls, _FusedDenseAddNorm),
        )
    if bert_family and name.endswith("SelfAttention") and _qkv_shape(module):
        return Plan(
            "fused",
            "reclass",
            "query / key / value projections on llmkit's GEMM path",
            new_class=_fused_class(cls, _FusedSelfAttention),
        )
    if bert_family and name.endswith("Intermediate") and isinstance(getattr(module, "dense", None), nn.Linear):
        return Plan(
            "fused",
            "reclass",
            "dense with bias fused into GELU",
            new_class=_fused_class(cls, _FusedIntermediate),
            needs=("intermediate_act_fn",),
        )
    if name == "GPT2MLP" and from_transformers(cls, "gpt2"):
        return Plan(
            "fused",
            "reclass",
            "c_fc with bias fused into GELU",
            new_class=_fused_class(cls, _FusedGPT2MLP),
            needs=("act",),
        )
    if name == "GPT2Block" and from_transformers(cls, "gpt2"):
        return Plan(
            "fused", "reclass", "attention residual fused into ln_2", new_class=_fused_class(cls, _FusedGPT2Block)
        )
    if name.endswith(("LayerNorm", "RMSNorm")) and not isinstance(module, nn.LayerNorm):
        return Plan("norm", "left", f"no llmkit mapping for {name}")
    return None


def _gated_mlp_shape(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, p, None), nn.Module) for p in ("gate_proj", "up_proj", "down_proj")
    ) and hasattr(module, "act_fn")


def _decoder_layer_shape(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, p, None), nn.Module)
        for p in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    )


def _dense_add_norm_shape(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "dense", None), nn.Linear)
        and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm)
        and isinstance(getattr(module, "dropout", None), nn.Dropout)
    )


def _qkv_shape(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in ("query", "key", "value")) and all(
        hasattr(module, a) for a in ("attention_head_size", "scaling", "config", "dropout")
    )
