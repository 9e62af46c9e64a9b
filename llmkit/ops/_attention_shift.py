"""Exact column shifts that make the attention backward well conditioned.

Softmax is invariant under a per-row constant added to the scores, so subtracting a vector
``c`` from every key (``k_j - c``: the scores of row ``i`` move by ``scale * q_i . c``) leaves
the probabilities, ``dS`` and ``dK`` unchanged, and ``dQ = scale * sum_j dS_ij (k_j - c)``
is the same sum, since each row of ``dS`` sums to zero. Likewise ``dP_ij - delta_i =
dO_i . (v_j - O_i)`` is unchanged by ``v_j - c`` when each row's probabilities sum to one
(no dropout). When the keys or values of a head share a large common part (e.g. a mean of
1e4 in float16), computing with the shifted tensors avoids cancelling terms of that size:
without it, ``sum_j dS_ij`` rounds to ~1e-7 of ``|dO| |v|`` and multiplies ``|k|``, which
can overflow a half-precision ``dQ`` whose true value is ~1e-4.

The shift never costs accuracy: a column (one ``(b, h, d)`` over the sequence) is shifted
only when every entry lies within a quarter of the column's mean rounded to the tensor's
dtype, so each difference is exact (Sterbenz). Softcapping is not shift-invariant (the
keys are then left alone), and with dropout the values are not.
"""

from __future__ import annotations

import torch
from torch import Tensor


def column_shift(t: Tensor) -> Tensor:
    """The per-column shift of ``t`` (..., S, D): ``(..., 1, D)`` in ``t``'s dtype, the
    column's mean where every entry of the column lies within a quarter of it, else 0."""
    if t.shape[-2] == 0 or t.numel() == 0:
        return t.new_zeros(t.shape[:-2] + (1, t.shape[-1]))
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    c = t.mean(dim=-2, keepdim=True, dtype=wide).to(t.dtype)
    lo, hi = torch.aminmax(t, dim=-2, keepdim=True)  # max |t - c| from two small tensors
    cw = c.to(wide)
    spread = torch.maximum(hi.to(wide) - cw, cw - lo.to(wide))
    ok = torch.isfinite(c) & (spread <= 0.25 * cw.abs())  # NaN spread: False
    return torch.where(ok, c, torch.zeros_like(c))


def shift_for_backward(
    key: Tensor, value: Tensor, softcap: float, dropout_p: float, *, sync: bool = False
) -> tuple[Tensor, Tensor]:
    """``(key - c_k, value - c_v)`` with :func:`column_shift`'s exact shifts, each only
    where the backward's result is invariant under it (keys: no softcap; values: no
    dropout). The shifted tensors give the same ``dq`` / ``dk`` / ``dv`` in exact
    arithmetic and smaller rounding errors in finite precision.

    With ``sync`` (a host sync: for the reference backend), a tensor none of whose columns
    moves is returned as it is, so the caller can tell whether anything was shifted."""

    def shifted(t: Tensor) -> Tensor:
        c = column_shift(t)
        return t if sync and not bool(c.any()) else t - c

    if softcap == 0.0:
        key = shifted(key)
    if dropout_p == 0.0:
        value = shifted(value)
    return key, value
