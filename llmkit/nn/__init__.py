"""Drop-in ``torch.nn`` modules that run on llmkit's fused ops.

Every class subclasses its ``torch.nn`` counterpart and keeps its constructor, defaults,
parameter names and ``state_dict`` keys, so a ``torch.nn`` state dict loads with
``strict=True`` and ``isinstance`` checks keep working; only ``forward`` changes:

* :class:`LayerNorm`, :class:`RMSNorm` (with LLMs' ``offset`` and casting order),
  :class:`GELU`: the single fused op;
* :class:`GatedMLP`: the SwiGLU / GeGLU feed-forward of LLMs (no torch.nn counterpart;
  HuggingFace ``LlamaMLP``'s parameter names);
* :class:`MultiheadAttention`: fused attention on strided head views
  (``need_weights=True`` takes torch.nn's reference path and logs that once);
* :class:`TransformerEncoderLayer`, :class:`TransformerDecoderLayer`,
  :class:`TransformerEncoder`, :class:`TransformerDecoder`, :class:`Transformer`:
  residual add fused into LayerNorm, bias fused into GELU, fused attention.

``llmkit.swap(model)`` converts the torch.nn modules of an existing model to these in
place; see :mod:`llmkit.swap`.
"""

from importlib.util import find_spec as _find_spec

from .activation import GELU
from .attention import MultiheadAttention
from .mlp import GatedMLP
from .normalization import LayerNorm, RMSNorm
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "GELU",
    "GatedMLP",
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "Transformer",
]

# Int8Linear lives in llmkit/nn/int8_linear.py (the int8 work); export it once it exists.
# (A plain existence check, so that an error inside that module is not hidden.)
if _find_spec(__name__ + ".int8_linear") is not None:
    from .int8_linear import Int8Linear  # noqa: F401

    __all__.append("Int8Linear")
