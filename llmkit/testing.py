"""llmkit's correctness rule, as code shared by the tests and ``llmkit check``.

A result passes when its error against a float64 reference is at most twice the
error that PyTorch's own implementation makes in the same dtype, plus a small
absolute floor:

    max|out - ref64| <= 2 * max|torch_out - ref64| + ATOL_FLOOR[dtype] + eps(dtype) * max|ref64|

The last term is one unit of rounding at the reference's largest magnitude: the
correctly rounded result always passes, even where PyTorch happened to round luckily.

Errors are measured with non-finite values matched: a NaN or inf where the
reference has a finite number (or the other way round) is an infinite error.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

ATOL_FLOOR: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
"""Absolute floor added to the tolerance, per dtype of the result."""


def max_abs_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| in float64; inf if finiteness differs anywhere; 0 for empty tensors."""
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: result {list(out.shape)} vs reference {list(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    o = out.detach().to(torch.float64)
    r = ref.detach().to(torch.float64).to(o.device)
    fin_o, fin_r = torch.isfinite(o), torch.isfinite(r)
    if not torch.equal(fin_o, fin_r):
        return float("inf")
    same = (o == r) | (o.isnan() & r.isnan())
    if bool((~fin_o & ~same).any()):
        return float("inf")
    if not bool(fin_o.any()):
        return 0.0
    return float((o[fin_o] - r[fin_o]).abs().max())


def max_rel_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref| (a scale-free summary for tables)."""
    err = max_abs_error(out, ref)
    if out.numel() == 0:
        return 0.0
    r = ref.detach().to(torch.float64)
    fin = r[torch.isfinite(r)]
    denom = float(fin.abs().max()) if fin.numel() else 0.0
    return err / denom if denom > 0 else err


@dataclasses.dataclass
class Comparison:
    """One output compared against the float64 reference."""

    name: str
    max_abs_err: float
    max_rel_err: float
    baseline_err: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.tolerance


def tolerance(baseline_err: float, dtype: torch.dtype, floor: float | None = None, ref_max: float = 0.0) -> float:
    """2 x the baseline's error, plus the floor for ``dtype``, plus one unit of rounding.

    ``ref_max`` is the largest magnitude in the reference: ``eps(dtype) * ref_max`` bounds
    the error of the correctly rounded result, which must always pass even where PyTorch
    happened to round luckily (a short reduction whose few sums all rounded well).
    """
    f = ATOL_FLOOR.get(dtype, 1e-5) if floor is None else floor
    rounding = torch.finfo(dtype).eps * ref_max if dtype.is_floating_point else 0.0
    return 2.0 * baseline_err + f + rounding


def compare(name: str, out: Tensor, ref64: Tensor, baseline: Tensor, floor: float | None = None) -> Comparison:
    """Compare ``out`` with ``ref64``, the tolerance set by ``baseline`` (PyTorch, same dtype)."""
    base = max_abs_error(baseline, ref64)
    if base == float("inf"):
        raise ValueError(f"{name}: the PyTorch baseline itself disagrees with the reference in finiteness")
    err = max_abs_error(out, ref64)
    finite = ref64.detach()[torch.isfinite(ref64.detach())]
    ref_max = float(finite.abs().max()) if finite.numel() else 0.0
    return Comparison(name, err, max_rel_error(out, ref64), base, tolerance(base, out.dtype, floor, ref_max))


def assert_close_to_reference(
    out: Tensor, ref64: Tensor, baseline: Tensor, name: str = "output", floor: float | None = None
) -> Comparison:
    """Raise AssertionError when ``out`` breaks the rule; return the comparison otherwise."""
    c = compare(name, out, ref64, baseline, floor)
    if not c.passed:
        raise AssertionError(
            f"{name}: max abs error {c.max_abs_err:.3g} exceeds tolerance {c.tolerance:.3g} "
            f"(2 x PyTorch's {c.baseline_err:.3g} + floor), rel err {c.max_rel_err:.3g}, "
            f"dtype {str(out.dtype).replace('torch.', '')}, shape {list(out.shape)}"
        )
    return c


def sqnr_db(out: Tensor, ref: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |out - ref|^2)."""
    r = ref.detach().to(torch.float64)
    noise = (out.detach().to(torch.float64) - r).pow(2).sum()
    signal = r.pow(2).sum()
    if float(noise) == 0.0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))


def poison_(t: Tensor) -> Tensor:
    """Fill an output buffer with values no kernel would produce (NaN, or int extremes)."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).min)
