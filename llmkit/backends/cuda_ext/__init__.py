"""The cuda_ext backend's implementations: importing this package registers them."""

from __future__ import annotations

from . import attention, decode_attention, gelu, glu, int8_matmul, layer_norm, varlen_attention  # noqa: F401
