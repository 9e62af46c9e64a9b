"""Functional ops, with signatures that mirror ``torch.nn.functional``.

Each op is a ``torch.library`` custom op in the ``llmkit`` namespace (so
``torch.compile(fullgraph=True)`` and ``torch.export`` see it as one node), with a
fake implementation, autograd where differentiable, and a dispatch point per stage
that picks a backend per call (see :mod:`llmkit.dispatch`). One file per op family, holding
what defines the ops (call classes, validation, custom ops, autograd, the functions):
``layer_norm.py`` (layer_norm, rms_norm, add_layer_norm, add_rms_norm), ``gelu.py`` (gelu,
bias_gelu), ``glu.py`` (geglu, swiglu), ``attention.py`` (scaled_dot_product_attention),
``decode_attention.py``, ``varlen_attention.py``, ``int8_matmul.py`` (quantize_int8, dequantize_int8, int8_matmul,
int8_linear), and the internal ``linear.py``. The implementations are in :mod:`llmkit.backends`.
"""

from .attention import scaled_dot_product_attention
from .decode_attention import decode_attention
from .gelu import bias_gelu, gelu
from .glu import geglu, swiglu
from .int8_matmul import dequantize_int8, int8_linear, int8_matmul, quantize_int8
from .layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .linear import linear_forward  # noqa: F401  (internal: the linears of llmkit.nn and swapped blocks)
from .varlen_attention import varlen_attention

__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "gelu",
    "bias_gelu",
    "geglu",
    "swiglu",
    "scaled_dot_product_attention",
    "decode_attention",
    "varlen_attention",
    "quantize_int8",
    "dequantize_int8",
    "int8_matmul",
    "int8_linear",
]

from .. import backends  # noqa: F401, E402  (registers every backend's implementations)
