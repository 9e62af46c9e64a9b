"""Triton's Philox 4x32-10 random numbers, reproduced bit for bit in PyTorch.

Dropout in llmkit (attention's, and the input dropout of ``add_layer_norm`` /
``add_rms_norm``) is a pure function of ``(seed, offset)``: an element at flat position
``offset`` is kept when ``uniform(seed, offset) > dropout_p`` (both as float32), where
``uniform`` is what ``triton.language.rand(seed, offset)`` returns for an int64 offset.
Because the reference backend computes the same numbers, a Triton forward can be checked
against the reference bit for bit, and a forward on
one backend can be followed by a backward on another.

All arithmetic is on int64 tensors holding uint32 values, so it runs on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # the largest s with (2**31 - 1) * s < 1 in float32


def _mulhi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of ``a * b`` for a uint32 constant and uint32 values."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi = a_hi * b  # < 2**48
    p_lo = a_lo * b  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox_randint(seed: int, offsets: Tensor, n_rounds: int = 10) -> Tensor:
    """First output word of Philox4x32 for counters ``(lo(offset), hi(offset), 0, 0)``.

    Args:
        seed: a 64-bit integer; its low and high 32 bits are the key.
        offsets: int64 tensor of counters, any shape.

    Returns:
        int64 tensor of the same shape holding uint32 values, equal to
        ``tl.randint(seed, offsets)`` reinterpreted as unsigned.
    """
    offsets = offsets.to(torch.int64)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mulhi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0


def philox_uniform(seed: int, offsets: Tensor) -> Tensor:
    """float32 uniforms in [0, 1), equal to ``tl.rand(seed, offsets)`` for int64 offsets."""
    x = philox_randint(seed, offsets)
    x = torch.where(x >= 2**31, x - 2**32, x)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def draw_seed() -> int:
    """A dropout seed from torch's default generator (reproducible under ``torch.manual_seed``)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def row_dropout_keep_mask(seed: int, shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """Boolean keep mask of the input dropout of ``add_*_norm`` for an input of ``shape``:
    element ``k`` in row-major order (row ``i`` of ``N`` elements: ``k = i * N + j``) is kept
    when its uniform is greater than ``p`` (compared in float32)."""
    n = 1
    for s in shape:
        n *= s
    u = philox_uniform(seed, torch.arange(n, dtype=torch.int64, device=device)).reshape(shape)
    return u > torch.tensor(p, dtype=torch.float32, device=device)


def dropout_keep_mask(
    seed: int, offset: int, batch: int, heads: int, q_len: int, k_len: int, p: float, device: torch.device
) -> Tensor:
    """Boolean keep mask ``(batch, heads, q_len, k_len)`` of attention dropout.

    Element ``(b, h, i, j)`` uses counter ``offset + ((b * heads + h) * q_len + i) * k_len + j``
    and is kept when its uniform is greater than ``p`` (compared in float32).
    """
    n = batch * heads * q_len * k_len
    counters = torch.arange(n, dtype=torch.int64, device=device) + int(offset)
    u = philox_uniform(seed, counters).reshape(batch, heads, q_len, k_len)
    return u > torch.tensor(p, dtype=torch.float32, device=device)
