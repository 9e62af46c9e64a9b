"""Loading HuggingFace GPT-2 and BERT weights into :mod:`llmkit.models` (``from_hf``).

transformers is imported only here, when a conversion is asked for.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["gpt2_to_llmkit", "bert_to_llmkit"]

M = TypeVar("M", bound=nn.Module)


def _load(model: Any, class_name: str) -> nn.Module:
    if isinstance(model, nn.Module):
        from ..nn import Int8Linear

        for name, module in model.named_modules():
            if isinstance(module, Int8Linear):
                raise ValueError(
                    f"from_hf: {name} is an llmkit.nn.Int8Linear (the model was quantized); from_hf needs the "
                    "float weights: load the float model, then call llmkit.quantize on the llmkit model"
                )
        return model
    if not isinstance(model, str):
        raise TypeError(
            f"from_hf: expected a transformers model or a model name/path string, got {type(model).__name__}"
        )
    import transformers

    return getattr(transformers, class_name).from_pretrained(model)


def _inner(model: nn.Module, attr: str, class_suffix: str) -> Any:
    """The base model inside a head model (``GPT2LMHeadModel.transformer``, ``BertFor*.bert``);
    typed ``Any``: a transformers model, read by attribute (its config, its submodules)."""
    if type(model).__name__.endswith(class_suffix):
        return model
    inner = getattr(model, attr, None)
    if inner is None or not type(inner).__name__.endswith(class_suffix):
        raise TypeError(f"from_hf: {type(model).__name__} is not a {class_suffix} (nor holds one as .{attr})")
    return inner


def _unsupported(config: Any, checks: dict[str, tuple[Any, str]]) -> None:
    for attr, (expected, what) in checks.items():
        value = getattr(config, attr, expected)
        if value != expected:
            raise ValueError(f"from_hf: {what} ({attr}={value!r}) is not supported")


def _copy_(dst: Tensor, src: Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"from_hf: shape mismatch {list(dst.shape)} <- {list(src.shape)}")
    dst.copy_(src)


@torch.no_grad()
def gpt2_to_llmkit(gpt_cls: type[M], model: Any, **overrides: Any) -> M:
    """Build ``gpt_cls`` (llmkit GPT) from a HuggingFace GPT-2 model, name or path."""
    from .gpt import GPTConfig

    src = _load(model, "GPT2LMHeadModel")
    base = _inner(src, "transformer", "GPT2Model")
    c = base.config
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
    if c.activation_function not in acts:
        raise ValueError(f"from_hf: GPT-2 activation_function={c.activation_function!r} is not supported")
    _unsupported(
        c,
        {
            "scale_attn_by_inverse_layer_idx": (False, "attention scaled by the inverse layer index"),
            "scale_attn_weights": (True, "unscaled attention"),
            "add_cross_attention": (False, "cross-attention"),
        },
    )
    head = getattr(src, "lm_head", None)
    tied = head is None or head.weight is base.wte.weight or bool(getattr(c, "tie_word_embeddings", True))
    config = GPTConfig(
        **{
            "vocab_size": c.vocab_size,
            "n_positions": c.n_positions,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": c.n_inner,
            "activation": acts[c.activation_function],
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "embd_pdrop": c.embd_pdrop,
            "resid_pdrop": c.resid_pdrop,
            "attn_pdrop": c.attn_pdrop,
            "tie_word_embeddings": tied,
            **overrides,
        }
    )
    p = base.wte.weight
    with torch.device("meta"):
        out: Any = gpt_cls(config)  # llmkit's GPT, its blocks read by attribute below
    out = out.to_empty(device=p.device).to(p.dtype)
    if tied:
        out.lm_head.weight = out.wte.weight
    _copy_(out.wte.weight, base.wte.weight)
    _copy_(out.wpe.weight, base.wpe.weight)
    for ours, theirs in zip(out.h, base.h, strict=True):
        for name in ("ln_1", "ln_2"):
            _copy_(getattr(ours, name).weight, getattr(theirs, name).weight)
            _copy_(getattr(ours, name).bias, getattr(theirs, name).bias)
        for ours_lin, theirs_conv in (
            (ours.attn.c_attn, theirs.attn.c_attn),
            (ours.attn.c_proj, theirs.attn.c_proj),
            (ours.mlp.c_fc, theirs.mlp.c_fc),
            (ours.mlp.c_proj, theirs.mlp.c_proj),
        ):
            _copy_(ours_lin.weight, theirs_conv.weight.t())  # Conv1D (in, out) -> Linear (out, in)
            _copy_(ours_lin.bias, theirs_conv.bias)
    _copy_(out.ln_f.weight, base.ln_f.weight)
    _copy_(out.ln_f.bias, base.ln_f.bias)
    if head is not None and not tied:  # (untied means there is a head)
        _copy_(out.lm_head.weight, head.weight)
    return out.train(src.training)


@torch.no_grad()
def bert_to_llmkit(bert_cls: type[M], model: Any, **overrides: Any) -> M:
    """Build ``bert_cls`` (llmkit BERT) from a HuggingFace BERT model, name or path."""
    from .bert import _ACTIVATIONS, BERTConfig

    src = _load(model, "BertModel")
    base = _inner(src, "bert", "BertModel")
    c = base.config
    if not isinstance(c.hidden_act, str) or c.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"from_hf: BERT hidden_act={c.hidden_act!r} is not supported")
    _unsupported(
        c,
        {
            "position_embedding_type": ("absolute", "relative position embeddings"),
            "is_decoder": (False, "a BERT decoder"),
        },
    )
    config = BERTConfig(
        **{
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "hidden_act": _ACTIVATIONS[c.hidden_act],
            "hidden_dropout_prob": c.hidden_dropout_prob,
            "attention_probs_dropout_prob": c.attention_probs_dropout_prob,
            "max_position_embeddings": c.max_position_embeddings,
            "type_vocab_size": c.type_vocab_size,
            "layer_norm_eps": c.layer_norm_eps,
            "pad_token_id": c.pad_token_id if c.pad_token_id is not None else 0,
            "add_pooling_layer": base.pooler is not None,
            **overrides,
        }
    )
    p = base.embeddings.word_embeddings.weight
    with torch.device("meta"):
        out = bert_cls(config)
    out = out.to_empty(device=p.device).to(p.dtype)
    state = {}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        state[f"embeddings.{name}.weight"] = getattr(base.embeddings, name).weight
    state["embeddings.LayerNorm.weight"] = base.embeddings.LayerNorm.weight
    state["embeddings.LayerNorm.bias"] = base.embeddings.LayerNorm.bias
    for i, layer in enumerate(base.encoder.layer):
        pre = f"encoder.layers.{i}."
        attn = layer.attention.self
        state[pre + "self_attn.in_proj_weight"] = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
        state[pre + "self_attn.in_proj_bias"] = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])
        pairs = {
            "self_attn.out_proj": layer.attention.output.dense,
            "norm1": layer.attention.output.LayerNorm,
            "linear1": layer.intermediate.dense,
            "linear2": layer.output.dense,
            "norm2": layer.output.LayerNorm,
        }
        for ours, theirs in pairs.items():
            state[pre + ours + ".weight"] = theirs.weight
            state[pre + ours + ".bias"] = theirs.bias
    if base.pooler is not None:
        state["pooler.weight"] = base.pooler.dense.weight
        state["pooler.bias"] = base.pooler.dense.bias
    out.load_state_dict(state, strict=True)
    return out.train(src.training)
