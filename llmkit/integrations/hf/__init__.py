"""HuggingFace transformers integration, by concern:

* :mod:`.attention`: the ``"llmkit"`` attention function (transformers' ``AttentionInterface``
  signature) on :func:`llmkit.ops.scaled_dot_product_attention`;
* :mod:`.registration`: registering it, with its mask function, whichever of llmkit and
  transformers is imported first;
* :mod:`.plans`: what ``llmkit.swap`` does with each transformers module;
* :mod:`.fused`: the fused ``forward`` methods of swapped blocks and the classes made for them.
"""

from __future__ import annotations

from .attention import NAME, attention_function
from .fused import conv1d_act, fused_original
from .plans import Plan, is_pretrained_model, plan_module
from .registration import ensure_registered, install, is_registered

__all__ = [
    "NAME",
    "attention_function",
    "install",
    "ensure_registered",
    "is_registered",
    "is_pretrained_model",
    "plan_module",
    "Plan",
    "conv1d_act",
    "fused_original",
]
