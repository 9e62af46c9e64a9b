"""Transformer layers and stacks: drop-in subclasses of the ``torch.nn`` ones.

``TransformerEncoderLayer``, ``TransformerDecoderLayer``, ``TransformerEncoder``,
``TransformerDecoder`` and ``Transformer`` take torch.nn's constructor arguments, build
the same submodules in the same order (so a seeded construction gives the same
weights as torch.nn's), and have the same parameter names and ``state_dict`` keys.
Their attention modules are :class:`llmkit.nn.MultiheadAttention`. ``forward`` has
torch.nn's signature and semantics and runs:

* ``norm(x + sublayer(x))`` (post-norm) and ``x + sublayer(norm(x))`` (pre-norm) with
  the residual add fused into the next LayerNorm (:func:`llmkit.ops.add_layer_norm`);
* the feed-forward ``linear2(dropout(activation(linear1(x))))`` with the bias of
  ``linear1`` fused into a GELU activation (:func:`llmkit.ops.bias_gelu`); ReLU and
  other callables run as given;
* attention through :func:`llmkit.ops.scaled_dot_product_attention`.

torch.nn's inference fast paths (``torch._transformer_encoder_layer_fwd``, NestedTensor
conversion) are not used; where torch.nn's ``TransformerEncoder`` would have converted
a padded batch to a NestedTensor (eval mode, no autograd, ``src_key_padding_mask``,
``enable_nested_tensor``), the output rows of padded positions are zeroed before the
final norm just as its NestedTensor round trip does, so outputs agree everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._fused import add_norm, is_causal_hint_mask, linear, linear_act, norm
from .activation import GELU
from .attention import MultiheadAttention
from .normalization import LayerNorm, RMSNorm

__all__ = [
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "Transformer",
    "TORCH_TO_LLMKIT",
    "convert_",
]


def _seq_len(src: Tensor, batch_first: bool) -> int | None:
    if src.is_nested:
        return None
    if src.dim() == 2:
        return src.shape[0]
    return src.shape[1 if batch_first else 0]


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` with fused add + LayerNorm, bias + GELU and attention.

    Args: exactly torch.nn's (``d_model``, ``nhead``, ``dim_feedforward=2048``,
    ``dropout=0.1``, ``activation=F.relu`` ("relu", "gelu" or a callable),
    ``layer_norm_eps=1e-5``, ``batch_first=False``, ``norm_first=False``, ``bias=True``,
    ``device``, ``dtype``). ``forward(src, src_mask=None, src_key_padding_mask=None,
    is_causal=False)``: ``src`` is ``(S, E)``, ``(S, B, E)`` or ``(B, S, E)`` with
    ``batch_first``; masks as in :class:`llmkit.nn.MultiheadAttention`.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            device=device,
            dtype=dtype,
        )
        convert_(self)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = src
        if self.norm_first:
            sa = self._sa_block(norm(x, self.norm1), src_mask, src_key_padding_mask, is_causal=is_causal)
            h, x = add_norm(sa, x, self.norm2)
            return x + self._ff_block(h)
        sa = self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal)
        x, _ = add_norm(sa, x, self.norm1)
        x, _ = add_norm(self._ff_block(x), x, self.norm2)
        return x

    def _ff_block(self, x: Tensor) -> Tensor:
        x = linear(self.dropout(linear_act(x, self.linear1, self.activation)), self.linear2)
        return self.dropout2(x)


class TransformerDecoderLayer(nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` with fused add + LayerNorm, bias + GELU and attention.

    Args: exactly torch.nn's (as :class:`TransformerEncoderLayer`). ``forward(tgt,
    memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False)``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            device=device,
            dtype=dtype,
        )
        convert_(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        x = tgt
        if self.norm_first:
            sa = self._sa_block(norm(x, self.norm1), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            h, x = add_norm(sa, x, self.norm2)
            ca = self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            h, x = add_norm(ca, x, self.norm3)
            return x + self._ff_block(h)
        sa = self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x, _ = add_norm(sa, x, self.norm1)
        ca = self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x, _ = add_norm(ca, x, self.norm2)
        x, _ = add_norm(self._ff_block(x), x, self.norm3)
        return x

    def _ff_block(self, x: Tensor) -> Tensor:
        x = linear(self.dropout(linear_act(x, self.linear1, self.activation)), self.linear2)
        return self.dropout3(x)


class TransformerEncoder(nn.TransformerEncoder):
    """``torch.nn.TransformerEncoder``: a stack of copies of ``encoder_layer``.

    Args: exactly torch.nn's (``encoder_layer``, ``num_layers``, ``norm=None``,
    ``enable_nested_tensor=True``, ``mask_check=True``). The copies are llmkit layers
    even when ``encoder_layer`` is a ``torch.nn.TransformerEncoderLayer`` (the argument
    itself is left unchanged). ``forward(src, mask=None, src_key_padding_mask=None,
    is_causal=None)``; ``is_causal=None`` detects a causal ``mask``, as torch.nn does.
    """

    def __init__(
        self,
        encoder_layer: nn.TransformerEncoderLayer,
        num_layers: int,
        norm: nn.Module | None = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ) -> None:
        super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor, mask_check)
        convert_(self.layers)

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        first = self.layers[0]
        batch_first = first.self_attn.batch_first
        is_causal = is_causal_hint_mask(mask, is_causal, _seq_len(src, batch_first))
        zero_padding = self._torch_would_nest(src, mask, src_key_padding_mask)
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if zero_padding and src_key_padding_mask is not None:  # (nesting needs a padding mask)
            output = output.masked_fill(_padding_positions(src_key_padding_mask)[..., None], 0.0)
        if self.norm is not None:
            output = norm(output, self.norm)
        return output

    def _torch_would_nest(self, src: Tensor, mask: Tensor | None, kpm: Tensor | None) -> bool:
        """Whether torch.nn's forward would run this batch as a NestedTensor.

        Mirrors the conditions of ``torch.nn.TransformerEncoder.forward``; in that case
        torch.nn returns zeros at padded positions (before the final norm).
        """
        first = self.layers[0]
        if (
            kpm is None
            or mask is not None
            or not getattr(self, "use_nested_tensor", False)
            or not torch.backends.mha.get_fastpath_enabled()
            or first.training
            or src.dim() != 3
            or src.is_nested
            or torch.is_autocast_enabled()
            or src.device.type not in ("cpu", "cuda", "xpu")
        ):
            return False
        if getattr(self, "mask_check", True):
            if torch.compiler.is_compiling():
                return False
            valid = ~_padding_positions(kpm)
            # left aligned: no valid position after a padded one in any row
            if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
                return False
        if torch.is_grad_enabled():
            params = (
                first.self_attn.in_proj_weight,
                first.self_attn.in_proj_bias,
                first.self_attn.out_proj.weight,
                first.self_attn.out_proj.bias,
                first.norm1.weight,
                first.norm1.bias,
                first.norm2.weight,
                first.norm2.bias,
                first.linear1.weight,
                first.linear1.bias,
                first.linear2.weight,
                first.linear2.bias,
            )
            if src.requires_grad or any(p is not None and p.requires_grad for p in params):
                return False
        return True


def _padding_positions(kpm: Tensor) -> Tensor:
    """Boolean ``(B, S)``: True where a key padding mask marks padding."""
    if kpm.dtype == torch.bool:
        return kpm
    return kpm != 0


class TransformerDecoder(nn.TransformerDecoder):
    """``torch.nn.TransformerDecoder``: a stack of copies of ``decoder_layer``.

    Args: exactly torch.nn's (``decoder_layer``, ``num_layers``, ``norm=None``).
    ``forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False)``.
    """

    def __init__(
        self, decoder_layer: nn.TransformerDecoderLayer, num_layers: int, norm: nn.Module | None = None
    ) -> None:
        super().__init__(decoder_layer, num_layers, norm)
        convert_(self.layers)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        batch_first = self.layers[0].self_attn.batch_first
        tgt_is_causal = is_causal_hint_mask(tgt_mask, tgt_is_causal, _seq_len(tgt, batch_first))
        output = tgt
        for layer in self.layers:
            output = layer(
                output,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=tgt_is_causal,
                memory_is_causal=memory_is_causal,
            )
        if self.norm is not None:
            output = norm(output, self.norm)
        return output


class Transformer(nn.Transformer):
    """``torch.nn.Transformer`` built from llmkit's encoder and decoder.

    Args: exactly torch.nn's (``d_model=512``, ``nhead=8``, ``num_encoder_layers=6``,
    ``num_decoder_layers=6``, ``dim_feedforward=2048``, ``dropout=0.1``,
    ``activation=F.relu``, ``custom_encoder=None``, ``custom_decoder=None``,
    ``layer_norm_eps=1e-5``, ``batch_first=False``, ``norm_first=False``, ``bias=True``,
    ``device``, ``dtype``). A ``custom_encoder`` / ``custom_decoder`` is used as given.
    ``forward`` is torch.nn's (it calls the llmkit encoder and decoder).
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        custom_encoder: Any | None = None,
        custom_decoder: Any | None = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            d_model,
            nhead,
            num_encoder_layers,
            num_decoder_layers,
            dim_feedforward,
            dropout,
            activation,
            custom_encoder,
            custom_decoder,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            device=device,
            dtype=dtype,
        )
        if custom_encoder is None:
            convert_(self.encoder)
        if custom_decoder is None:
            convert_(self.decoder)


TORCH_TO_LLMKIT: dict[type, type] = {
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    nn.GELU: GELU,
    nn.MultiheadAttention: MultiheadAttention,
    nn.TransformerEncoderLayer: TransformerEncoderLayer,
    nn.TransformerDecoderLayer: TransformerDecoderLayer,
    nn.TransformerEncoder: TransformerEncoder,
    nn.TransformerDecoder: TransformerDecoder,
    nn.Transformer: Transformer,
}
"""Each torch.nn class and its llmkit subclass (same attributes, only ``forward`` differs)."""


def convert_(
    module: nn.Module,
    classes: dict[type, type] = TORCH_TO_LLMKIT,
    on_convert: Callable[[str, nn.Module, type], None] | None = None,
) -> nn.Module:
    """Turn every submodule whose exact type is a key of ``classes`` into the mapped class.

    The objects stay the same (their class is reassigned), so parameters, buffers,
    hooks and references to them are untouched; subclasses of the torch.nn classes
    (with their own ``forward``) are left alone. ``on_convert(name, module, old_class)``
    is called for each conversion. Returns ``module``.
    """
    for name, m in module.named_modules():
        new = classes.get(type(m))
        if new is not None:
            old = type(m)
            m.__class__ = new
            if on_convert is not None:
                on_convert(name, m, old)
    return module
