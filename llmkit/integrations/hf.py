"""HuggingFace transformers integration: the ``"llmkit"`` attention and module swaps.

Attention registration
----------------------
``attention_forward`` has the signature of transformers' attention functions
(``AttentionInterface``) and runs :func:`llmkit.ops.scaled_dot_product_attention`.
It is registered under the name ``"llmkit"`` together with a mask function (the boolean
masks of transformers' ``sdpa``; without one, transformers would build no mask at all
for an unknown implementation and ignore padding). After that,
``AutoModel.from_pretrained(..., attn_implementation="llmkit")`` and
``model.set_attn_implementation("llmkit")`` work.

``import llmkit`` must not import transformers (that costs seconds), and registration
must work whichever of the two is imported first. So :func:`install` (called by
``import llmkit``) does this:

* the attention is registered in ``transformers.modeling_utils`` and the mask in
  ``transformers.masking_utils``, each as soon as that module exists: at once when it
  is already imported, otherwise right after the module has executed
  (:func:`llmkit._import_hook.after_import`: a ``sys.meta_path`` finder that imports
  nothing and removes itself when nothing is pending);
* :func:`ensure_registered`, called by ``llmkit.swap`` and ``from_hf``, imports the two
  modules and registers; it is idempotent.

Set ``LLMKIT_NO_HF_HOOK=1`` to skip the import hook (``ensure_registered`` still works).

Module swaps
------------
:func:`plan_module` tells ``llmkit.swap`` what to do with one HuggingFace module: replace
a GELU variant with :class:`llmkit.nn.GELU`, a T5-style norm with
:class:`llmkit.nn.RMSNorm` (sharing the parameter), or give BERT-family / GPT-2 blocks a
fused ``forward`` (residual add + LayerNorm, bias + GELU, projections on llmkit's GEMM
path) by reassigning their class to a subclass made here (pickled as the original class and
the mixin, so swapped models pickle and deep-copy); or it says why a module is left as it is.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from .._compat import attn_implementation, cache_kwarg, pop_cache
from .._import_hook import after_import
from ..nn import GELU, RMSNorm
from ..nn import _fused
from ..nn._fused import _hooked, add_norm, add_norm_into, dense, gelu_approximate, linear, linear_act, norm

__all__ = [
    "NAME",
    "attention_forward",
    "install",
    "ensure_registered",
    "is_registered",
    "is_pretrained_model",
    "plan_module",
    "Plan",
]

NAME = "llmkit"
"""The ``attn_implementation`` name llmkit registers."""

logger = logging.getLogger("llmkit")

_MODELING = "transformers.modeling_utils"
_MASKING = "transformers.masking_utils"
_registered: set[str] = set()
_lock = threading.RLock()
_said: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        logger.warning(msg)


# --------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------


def _position_bias_mask(
    position_bias: Tensor, attention_mask: Tensor | None, is_causal: bool, query: Tensor, key: Tensor
) -> Tensor:
    """One additive mask from a relative-position bias and the attention mask (T5 style)."""
    min_value = torch.finfo(key.dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = torch.arange(q_len, device=key.device)[:, None] >= torch.arange(kv_len, device=key.device)[None, :]
        return torch.where(causal.view(1, 1, q_len, kv_len), position_bias, min_value)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, min_value)
    return position_bias + attention_mask


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function on llmkit's fused attention.

    Args:
        module: the calling attention module (``is_causal``, ``num_key_value_groups``,
            ``layer_idx`` are read from it as transformers' ``sdpa`` does).
        query: ``(B, Hq, Sq, D)``; key / value: ``(B, Hkv, Sk, D)`` (grouped-query
            attention runs without repeating the key/value heads).
        attention_mask: None, boolean ``(B, 1, Sq, Sk)`` (True = attend, from the mask
            function registered with it) or additive float.
        dropout: attention dropout probability (training).
        scaling: softmax scale; None means ``1 / sqrt(D)`` (T5 passes 1.0).
        is_causal: None reads ``module.is_causal``; causal masking is used only for
            ``Sq > 1`` without an explicit mask, as transformers' ``sdpa`` does.
        position_bias: T5's relative-position bias ``(1 | B, H, Sq, Sk)``, added to the
            scores (combined with the mask into one additive mask; differentiable).

    Returns:
        ``(out, None)``, ``out`` of shape ``(B, Sq, Hq, D)``; no attention weights.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError(
            "llmkit attention does not support softcap; use attn_implementation='eager' for this model"
        )
    if kwargs.get("output_attentions", False):
        _say_once(
            "llmkit attention does not return attention weights (output_attentions=True); "
            "use attn_implementation='eager' to get them"
        )
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:
        # prefill into an empty static cache: the extra key slots are unused (as in sdpa)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    mask = attention_mask
    if position_bias is not None:
        mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if mask is not None and mask.dtype != torch.bool and mask.dtype not in (query.dtype, torch.float32):
        mask = mask.to(query.dtype)
    out = ops.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
        scale=scaling, enable_gqa=groups > 1,
    )
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------


def _register_attention() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    _registered.add(_MODELING)


def _register_mask() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered.add(_MASKING)


_REGISTER: dict[str, Callable[[], None]] = {_MODELING: _register_attention, _MASKING: _register_mask}


def _on_loaded(name: str) -> None:
    """Run after ``name`` executed: register (idempotent; never breaks the user's import)."""
    with _lock:
        if name in _registered:
            return
        try:
            _REGISTER[name]()
        except Exception as exc:  # an incompatible transformers: say so, do not fail its import
            logger.warning(
                "llmkit could not register its attention with %s (%r); "
                "attn_implementation='llmkit' will not be available", name, exc,
            )


def is_registered() -> bool:
    """True once both the attention and its mask function are registered."""
    return _registered >= set(_REGISTER)


def ensure_registered() -> None:
    """Import transformers' modeling and masking utilities and register ``"llmkit"``.

    Raises ImportError with a clear message when transformers is not installed.
    """
    try:
        import transformers.masking_utils  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"this needs HuggingFace transformers (pip install transformers): {exc}"
        ) from exc
    with _lock:
        for name, fn in _REGISTER.items():
            if name not in _registered:
                fn()


def install() -> None:
    """Register now what transformers has loaded; hook the rest (imports nothing)."""
    if os.environ.get("LLMKIT_NO_HF_HOOK", "0") == "1":
        return
    for name in _REGISTER:
        if name not in _registered:
            after_import(name, functools.partial(_on_loaded, name))


# --------------------------------------------------------------------------------------
# module swaps
# --------------------------------------------------------------------------------------


def is_pretrained_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__ == _MODELING for c in type(model).__mro__
    )


def _from_transformers(cls: type, *families: str) -> bool:
    mod = cls.__module__
    if not mod.startswith("transformers."):
        return False
    return not families or any(mod.startswith(f"transformers.models.{f}.") for f in families)


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
_BERT_FAMILIES = ("bert", "roberta", "xlm_roberta", "camembert", "electra", "data2vec")


class Plan:
    """What ``swap`` does with one module.

    ``action`` is ``"replace"`` (``make()`` builds the new module, sharing parameters),
    ``"reclass"`` (``new_class`` is assigned to the object) or ``"left"`` (``note`` says
    why). ``kind`` is the swap kind it belongs to.
    """

    def __init__(self, kind: str, action: str, note: str, make: Callable[[], nn.Module] | None = None,
                 new_class: type | None = None, needs: tuple[str, ...] = ()):
        self.kind, self.action, self.note = kind, action, note
        self.make, self.new_class, self.needs = make, new_class, needs


def plan_module(module: nn.Module) -> Plan | None:
    """The swap plan for a transformers module, or None when it is not one llmkit knows."""
    cls = type(module)
    if not _from_transformers(cls):
        return None
    name = cls.__name__
    approx, why = _gelu_flavor(module)
    if approx is not None:
        return Plan("gelu", "replace", f"llmkit.nn.GELU(approximate={approx!r})",
                    make=lambda: GELU(approximate=approx))
    if why:
        return Plan("gelu", "left", why)
    if name in _T5_NORMS:
        return Plan("norm", "replace", "llmkit.nn.RMSNorm (shares weight)", make=lambda: _rms_from_t5(module))
    if _from_transformers(cls, *_BERT_FAMILIES) and name.endswith(("SelfOutput", "Output")) and _dense_add_norm_shape(module):
        return Plan("fused", "reclass", "dense, dropout, fused residual add + LayerNorm",
                    new_class=_fused_class(cls, _FusedDenseAddNorm))
    if _from_transformers(cls, *_BERT_FAMILIES) and name.endswith("SelfAttention") and _qkv_shape(module):
        if _transformers_major() < 5:
            return Plan("fused", "left", f"{name} projections are written for transformers >= 5")
        return Plan("fused", "reclass", "query / key / value projections on llmkit's GEMM path",
                    new_class=_fused_class(cls, _FusedSelfAttention))
    if _from_transformers(cls, *_BERT_FAMILIES) and name.endswith("Intermediate") and isinstance(getattr(module, "dense", None), nn.Linear):
        return Plan("fused", "reclass", "dense with bias fused into GELU",
                    new_class=_fused_class(cls, _FusedIntermediate), needs=("intermediate_act_fn",))
    if name == "GPT2MLP" and _from_transformers(cls, "gpt2"):
        return Plan("fused", "reclass", "c_fc with bias fused into GELU", new_class=_fused_class(cls, _FusedGPT2MLP),
                    needs=("act",))
    if name == "GPT2Block" and _from_transformers(cls, "gpt2"):
        if _transformers_major() < 5:
            return Plan("fused", "left", "GPT2Block fusion is written for transformers >= 5")
        return Plan("fused", "reclass", "attention residual fused into ln_2", new_class=_fused_class(cls, _FusedGPT2Block))
    if name.endswith(("LayerNorm", "RMSNorm")) and not isinstance(module, nn.LayerNorm):
        return Plan("norm", "left", f"no llmkit mapping for {name}")
    return None


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _rms_from_t5(module: nn.Module) -> RMSNorm:
    weight = module.weight
    new = RMSNorm(weight.shape[0], eps=module.variance_epsilon, device="meta")
    new.weight = weight  # the same Parameter: optimizers and tied references keep working
    return new


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


def conv1d_act(x: Tensor, conv: nn.Module, activation: Callable[[Tensor], Tensor]) -> Tensor:
    """``activation(conv(x))`` for transformers' ``Conv1D`` (weight ``(in, out)``), bias fused into a GELU.

    On the CPU the GEMM adds the bias (see ``llmkit.nn._fused.BIAS_IN_GEMM_ON_CPU``).
    """
    approx = gelu_approximate(activation)
    if approx is None or not _plain_conv1d(conv):
        return activation(conv(x))
    if _fused.BIAS_IN_GEMM_ON_CPU and x.device.type == "cpu":
        return dense(x, conv.weight.t(), conv.bias, approx)
    return ops.bias_gelu(torch.matmul(x, conv.weight), conv.bias, approx)


def _plain_conv1d(conv: nn.Module) -> bool:
    return type(conv).__name__ == "Conv1D" and _from_transformers(type(conv)) and not _hooked(conv)


class _FusedDenseAddNorm:
    """BERT-family ``*SelfOutput`` / ``*Output``: ``LayerNorm(dropout(dense(h)) + input)``."""

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        h = self.dropout(linear(hidden_states, self.dense))
        if _plain(self.dense, nn.Linear) and _plain(self.dropout, nn.Dropout):
            # h is a fresh GEMM output (or dropout's fresh output): the sum may go into it
            return add_norm_into(h, input_tensor, self.LayerNorm)[0]
        return add_norm(h, input_tensor, self.LayerNorm)[0]


def _plain(module: nn.Module, cls: type) -> bool:
    """``module`` is exactly a ``cls`` without hooks (its output is a fresh tensor)."""
    return type(module) is cls and not _hooked(module)


class _FusedSelfAttention:
    """BERT-family ``*SelfAttention`` (transformers >= 5): the query / key / value
    projections through :func:`llmkit.nn._fused.linear` (oneDNN on float32 CPU inference),
    then the model's attention function. Caches (decoder BERT) take the original forward.

    The cache is the third positional argument in every tested transformers; by keyword it
    is ``cache`` or ``past_key_values`` (renamed in 5.2x) and is passed on under the name the
    original forward takes."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, cache: Any = None,
                **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        cache = cache if cache is not None else pop_cache(kwargs)
        if cache is not None or attn_implementation(self.config) != NAME:
            kwargs[cache_kwarg(super().forward.__func__)] = cache
            return super().forward(hidden_states, attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        heads = (*input_shape, -1, self.attention_head_size)
        query = linear(hidden_states, self.query).view(heads).transpose(1, 2)
        key = linear(hidden_states, self.key).view(heads).transpose(1, 2)
        value = linear(hidden_states, self.value).view(heads).transpose(1, 2)
        out, weights = attention_forward(
            self, query, key, value, attention_mask,
            dropout=self.dropout.p if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return out.reshape(*input_shape, -1).contiguous(), weights


class _FusedIntermediate:
    """BERT-family ``*Intermediate``: ``act(dense(h))`` with the bias inside the GELU."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return linear_act(hidden_states, self.dense, self.intermediate_act_fn)


class _FusedGPT2MLP:
    """GPT-2 MLP: ``dropout(c_proj(act(c_fc(h))))`` with c_fc's bias inside the GELU."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.dropout(self.c_proj(conv1d_act(hidden_states, self.c_fc, self.act)))


class _FusedGPT2Block:
    """GPT-2 block (transformers >= 5) with the attention residual fused into ``ln_2``.

    The cache is the second positional argument in every tested transformers; by keyword it is
    ``cache`` or ``past_key_values`` and goes on to the attention under the name it takes."""

    def forward(self, hidden_states: Tensor, cache: Any = None, attention_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False, **kwargs):
        cache = cache if cache is not None else pop_cache(kwargs)
        if encoder_hidden_states is not None:  # cross-attention blocks: the original forward
            kwargs[cache_kwarg(super().forward.__func__)] = cache
            return super().forward(hidden_states, attention_mask=attention_mask,
                                   encoder_hidden_states=encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, use_cache=use_cache, **kwargs)
        kwargs[cache_kwarg(type(self.attn).forward)] = cache
        attn_output, _ = self.attn(
            norm(hidden_states, self.ln_1), attention_mask=attention_mask, use_cache=use_cache, **kwargs,
        )
        h, hidden_states = add_norm(attn_output, hidden_states, self.ln_2)
        return hidden_states + self.mlp(h)


_fused_classes: dict[tuple[type, type], type] = {}


def _reduce_fused(self: nn.Module, protocol: int) -> tuple:
    """Pickle / deepcopy a fused module as (original class, mixin) and its state: the class
    itself is made at swap time and cannot be found by name, so unpickling remakes it."""
    cls = type(self)
    return _new_fused, (cls.__dict__["_llmkit_original"], cls.__dict__["_llmkit_mixin"]), self.__getstate__()


def _new_fused(original: type, mixin: type) -> nn.Module:
    """An empty instance of ``_fused_class(original, mixin)`` (its state is set by pickle)."""
    cls = _fused_class(original, mixin)
    return cls.__new__(cls)


def _fused_class(original: type, mixin: type) -> type:
    """``Llmkit<Original>``: the original class with the mixin's fused ``forward``."""
    key = (original, mixin)
    if key not in _fused_classes:
        _fused_classes[key] = type(
            f"Llmkit{original.__name__}", (mixin, original),
            {"__module__": __name__, "__qualname__": f"Llmkit{original.__name__}", "__doc__": mixin.__doc__,
             "_llmkit_original": original, "_llmkit_mixin": mixin, "__reduce_ex__": _reduce_fused},
        )
    return _fused_classes[key]


def fused_original(cls: type) -> type | None:
    """The transformers class a fused class was made from (None for other classes)."""
    return cls.__dict__.get("_llmkit_original")
