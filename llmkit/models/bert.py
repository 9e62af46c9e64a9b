"""A BERT-style bidirectional encoder built from :mod:`llmkit.nn`.

Embeddings (word + token type + position, then LayerNorm: the last add is fused into
the LayerNorm) followed by an :class:`llmkit.nn.TransformerEncoder` of post-norm
:class:`llmkit.nn.TransformerEncoderLayer` s (BERT's layer is exactly torch.nn's
post-norm layer with a GELU), and an optional tanh pooler on the first token.
:meth:`BERT.from_hf` loads HuggingFace BERT weights (q, k, v packed into
``in_proj_weight``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..nn import GELU, LayerNorm, TransformerEncoder, TransformerEncoderLayer
from ..nn._fused import add_norm

__all__ = ["BERTConfig", "BERT", "BERTOutput"]

_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclasses.dataclass
class BERTConfig:
    """Shape and options of a :class:`BERT`. The defaults are BERT-base."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    """``"gelu"`` (exact), ``"gelu_tanh"`` or ``"relu"``."""
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    add_pooling_layer: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BERTConfig: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ("gelu", "gelu_tanh", "relu"):
            raise ValueError(f"BERTConfig: hidden_act must be 'gelu', 'gelu_tanh' or 'relu', got {self.hidden_act!r}")


class BERTOutput(NamedTuple):
    """``last_hidden_state (B, S, H)`` and ``pooler_output (B, H)`` (None without a pooler)."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None


class BERTEmbeddings(nn.Module):
    """``LayerNorm(word + token_type + position)`` then dropout."""

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        s = input_ids.shape[1]
        if s > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"BERT: {s} tokens exceed max_position_embeddings ({self.position_embeddings.num_embeddings})"
            )
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)[None, :]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        pos = self.position_embeddings(position_ids).expand_as(x)
        return self.dropout(add_norm(x, pos, self.LayerNorm)[0])


class BERT(nn.Module):
    """BERT encoder: ``forward(input_ids, attention_mask=None, token_type_ids=None,
    position_ids=None) -> BERTOutput``.

    ``input_ids``: int64 ``(B, S)``; ``attention_mask``: ``(B, S)`` with 1 for tokens and
    0 for padding (HuggingFace's convention). Padded positions get hidden states too
    (computed from the unpadded keys), as in HuggingFace's BERT.
    """

    def __init__(self, config: BERTConfig | None = None):
        super().__init__()
        self.config = config = config or BERTConfig()
        self.embeddings = BERTEmbeddings(config)
        activation: Any = {"gelu": "gelu", "relu": "relu", "gelu_tanh": GELU(approximate="tanh")}[config.hidden_act]
        layer = TransformerEncoderLayer(
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            dropout=config.hidden_dropout_prob,
            activation=activation,
            layer_norm_eps=config.layer_norm_eps,
            batch_first=True,
            norm_first=False,
        )
        layer.self_attn.dropout = config.attention_probs_dropout_prob
        self.encoder = TransformerEncoder(layer, config.num_hidden_layers, enable_nested_tensor=False)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if config.add_pooling_layer else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialization: N(0, 0.02) weights and embeddings, zero biases, unit norms."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, self.config.initializer_range)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
        with torch.no_grad():
            self.embeddings.word_embeddings.weight[self.config.pad_token_id].zero_()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> BERTOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"BERT: input_ids must be (batch, tokens), got shape {list(input_ids.shape)}")
        padding = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"BERT: attention_mask has shape {list(attention_mask.shape)}; it must match input_ids "
                    f"{list(input_ids.shape)}"
                )
            padding = attention_mask == 0
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        hidden = self.encoder(x, src_key_padding_mask=padding, is_causal=False)
        pooled = torch.tanh(self.pooler(hidden[:, 0])) if self.pooler is not None else None
        return BERTOutput(hidden, pooled)

    @classmethod
    def from_hf(cls, model: Any, **config_overrides: Any) -> BERT:
        """A BERT with the weights of a HuggingFace ``BertModel`` (or ``BertFor*``).

        Args:
            model: a transformers BERT model instance, or a name or path for
                ``BertModel.from_pretrained`` (which may download).
            config_overrides: e.g. ``hidden_dropout_prob=0.0``.

        The result has the source's dtype and device and gives the same hidden states.
        """
        from ._hf import bert_to_llmkit

        return bert_to_llmkit(cls, model, **config_overrides)
