"""Fused ``forward`` methods for transformers blocks, and the classes ``swap`` reassigns.

Each mixin (``_Fused*``) replaces one transformers class's ``forward`` with the same
computation on llmkit's fused ops (residual add + LayerNorm / RMSNorm, bias + GELU, SwiGLU /
GeGLU, projections on llmkit's GEMM path). :func:`_fused_class` makes ``Llmkit<Original>``
from (mixin, original) at swap time; such classes pickle as (original class, mixin), so
swapped models pickle and deep-copy. The LLM families' norms and MLPs are in :mod:`.fused_llm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard, cast

from torch import Tensor, nn

from ..._compat import attn_implementation, cache_kwarg, pop_cache
from ...nn._fused import _hooked, add_norm, add_norm_into, dense, gelu_approximate, linear, linear_act, norm
from .attention import NAME, attention_function

if TYPE_CHECKING:  # transformers is never imported by llmkit itself
    from transformers.pytorch_utils import Conv1D

__all__ = ["conv1d_act", "fused_original", "from_transformers"]


def from_transformers(cls: type, *families: str) -> bool:
    """``cls`` is a transformers class (of one of ``families``, the model folders, if given)."""
    mod = cls.__module__
    if not mod.startswith("transformers."):
        return False
    return not families or any(mod.startswith(f"transformers.models.{f}.") for f in families)


def conv1d_act(x: Tensor, conv: nn.Module, activation: Callable[[Tensor], Tensor]) -> Tensor:
    """``activation(conv(x))`` for transformers' ``Conv1D`` (weight ``(in, out)``), the bias fused
    into a GELU (:func:`llmkit.nn._fused.dense` on the transposed weight, a view)."""
    approx = gelu_approximate(activation)
    if approx is None or not _plain_conv1d(conv):
        return activation(conv(x))
    return dense(x, conv.weight.t(), conv.bias, approx)


def _plain_conv1d(conv: nn.Module) -> TypeGuard[Conv1D]:
    return type(conv).__name__ == "Conv1D" and from_transformers(type(conv)) and not _hooked(conv)


# Each mixin is combined with a transformers class at swap time (_fused_class), which gives it
# its submodules, its config and the original forward: to the type checker its base is Any,
# with the submodules it reads declared (the plans check them before a class is reassigned).
_TransformersModule: Any = object


class _FusedDenseAddNorm(_TransformersModule):
    """BERT-family ``*SelfOutput`` / ``*Output``: ``LayerNorm(dropout(dense(h)) + input)``."""

    dense: nn.Linear
    dropout: nn.Dropout
    LayerNorm: nn.LayerNorm

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        h = self.dropout(linear(hidden_states, self.dense))
        if _plain(self.dense, nn.Linear) and _plain(self.dropout, nn.Dropout):
            # h is a fresh GEMM output (or dropout's fresh output): the sum may go into it
            return add_norm_into(h, input_tensor, self.LayerNorm)[0]
        return add_norm(h, input_tensor, self.LayerNorm)[0]


def _plain(module: nn.Module, cls: type) -> bool:
    """``module`` is exactly a ``cls`` without hooks (its output is a fresh tensor)."""
    return type(module) is cls and not _hooked(module)


class _FusedSelfAttention(_TransformersModule):
    """BERT-family ``*SelfAttention`` (transformers >= 5): the query / key / value
    projections through :func:`llmkit.nn._fused.linear` (oneDNN on float32 CPU inference),
    then the model's attention function. Caches (decoder BERT) take the original forward.

    The cache is the third positional argument in every tested transformers; by keyword it
    is ``cache`` or ``past_key_values`` (renamed in 5.2x) and is passed on under the name the
    original forward takes."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    dropout: nn.Dropout
    attention_head_size: int
    scaling: float

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, cache: Any = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor | None]:
        cache = cache if cache is not None else pop_cache(kwargs)
        if cache is not None or attn_implementation(self.config) != NAME:
            kwargs[cache_kwarg(super().forward.__func__)] = cache
            return super().forward(hidden_states, attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        heads = (*input_shape, -1, self.attention_head_size)
        query = linear(hidden_states, self.query).view(heads).transpose(1, 2)
        key = linear(hidden_states, self.key).view(heads).transpose(1, 2)
        value = linear(hidden_states, self.value).view(heads).transpose(1, 2)
        out, weights = attention_function(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return out.reshape(*input_shape, -1).contiguous(), weights


class _FusedIntermediate(_TransformersModule):
    """BERT-family ``*Intermediate``: ``act(dense(h))`` with the bias inside the GELU."""

    dense: nn.Linear
    intermediate_act_fn: Callable[[Tensor], Tensor]

    def forward(self, hidden_states: Tensor) -> Tensor:
        return linear_act(hidden_states, self.dense, self.intermediate_act_fn)


class _FusedGPT2MLP(_TransformersModule):
    """GPT-2 MLP: ``dropout(c_proj(act(c_fc(h))))`` with c_fc's bias inside the GELU."""

    c_fc: nn.Module  # transformers' Conv1D
    c_proj: nn.Module
    act: Callable[[Tensor], Tensor]
    dropout: nn.Dropout

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.dropout(self.c_proj(conv1d_act(hidden_states, self.c_fc, self.act)))


class _FusedGPT2Block(_TransformersModule):
    """GPT-2 block (transformers >= 5) with the attention residual fused into ``ln_2``.

    The cache is the second positional argument in every tested transformers; by keyword it is
    ``cache`` or ``past_key_values`` and goes on to the attention under the name it takes."""

    attn: nn.Module
    ln_1: nn.LayerNorm
    ln_2: nn.LayerNorm
    mlp: nn.Module

    def forward(
        self,
        hidden_states: Tensor,
        cache: Any = None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        use_cache=False,
        **kwargs,
    ):
        cache = cache if cache is not None else pop_cache(kwargs)
        if encoder_hidden_states is not None:  # cross-attention blocks: the original forward
            kwargs[cache_kwarg(super().forward.__func__)] = cache
            return super().forward(
                hidden_states,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                use_cache=use_cache,
                **kwargs,
            )
        kwargs[cache_kwarg(type(self.attn).forward)] = cache
        attn_output, _ = self.attn(
            norm(hidden_states, self.ln_1), attention_mask=attention_mask, use_cache=use_cache, **kwargs
        )
        h, hidden_states = add_norm(attn_output, hidden_states, self.ln_2)
        return hidden_states + self.mlp(h)


_fused_classes: dict[tuple[type, type], type[nn.Module]] = {}


def _reduce_fused(self: nn.Module, protocol: int) -> tuple:
    """Pickle / deepcopy a fused module as (original class, mixin) and its state: the class
    itself is made at swap time and cannot be found by name, so unpickling remakes it."""
    cls = type(self)
    return _new_fused, (cls.__dict__["_llmkit_original"], cls.__dict__["_llmkit_mixin"]), self.__getstate__()


def _new_fused(original: type, mixin: type) -> nn.Module:
    """An empty instance of ``_fused_class(original, mixin)`` (its state is set by pickle)."""
    cls = _fused_class(original, mixin)
    return cls.__new__(cls)


def _fused_class(original: type, mixin: type) -> type[nn.Module]:
    """``Llmkit<Original>``: the original class (a transformers module) with the mixin's fused
    ``forward``."""
    key = (original, mixin)
    if key not in _fused_classes:
        cls = type(
            f"Llmkit{original.__name__}",
            (mixin, original),
            {
                "__module__": __name__,
                "__qualname__": f"Llmkit{original.__name__}",
                "__doc__": mixin.__doc__,
                "_llmkit_original": original,
                "_llmkit_mixin": mixin,
                "__reduce_ex__": _reduce_fused,
            },
        )
        _fused_classes[key] = cast("type[nn.Module]", cls)
    return _fused_classes[key]


def fused_original(cls: type) -> type | None:
    """The transformers class a fused class was made from (None for other classes)."""
    return cls.__dict__.get("_llmkit_original")
