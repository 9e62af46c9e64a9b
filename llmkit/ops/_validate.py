"""Input validation shared by every op and every backend.

Each check raises ``ValueError`` (wrong shape or value) or ``TypeError`` (wrong
dtype or type) with a message that names the argument, what it got and what it
needs. The ops call these before dispatch, so no backend ever sees bad input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'``."""
    return str(dtype).replace("torch.", "")


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(dtype_name(d) for d in dtypes)


def check_tensor(op: str, name: str, value: object) -> torch.Tensor:
    """``value`` must be a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    """``t.dtype`` must be one of ``dtypes``."""
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {dtype_name(t.dtype)}; it must be one of {_names(dtypes)}")


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` must be float16, bfloat16, float32 or float64."""
    check_dtype(op, name, t, FLOAT_DTYPES)


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """All given tensors (None skipped) must live on the same device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {n} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device"
            )


def check_ndim(op: str, name: str, t: torch.Tensor, ndims: Sequence[int]) -> None:
    """``t.dim()`` must be one of ``ndims``."""
    if t.dim() not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{op}: {name} must have {want} dimensions, got shape {tuple(t.shape)}")


def normalized_rows(
    op: str, input: torch.Tensor, normalized_shape: Sequence[int]
) -> tuple[list[int], int, int]:
    """Check ``normalized_shape`` against ``input``; return (shape list, rows M, row length N)."""
    if isinstance(normalized_shape, int):
        normalized_shape = [normalized_shape]
    try:
        ns = [int(s) for s in normalized_shape]
    except TypeError:
        raise TypeError(
            f"{op}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        ) from None
    if len(ns) == 0:
        raise ValueError(f"{op}: normalized_shape must name at least one dimension, got []")
    if len(ns) > input.dim() or list(input.shape[input.dim() - len(ns):]) != ns:
        raise ValueError(
            f"{op}: normalized_shape {ns} must equal the trailing dimensions of input, "
            f"whose shape is {list(input.shape)}"
        )
    n = math.prod(ns)
    m = input.numel() // n if n else math.prod(input.shape[: input.dim() - len(ns)])
    return ns, m, n


def check_affine(
    op: str,
    name: str,
    param: torch.Tensor | None,
    normalized_shape: Sequence[int],
    input: torch.Tensor,
) -> None:
    """A norm's weight or bias: None, or a float tensor of shape ``normalized_shape``."""
    if param is None:
        return
    check_tensor(op, name, param)
    if list(param.shape) != list(normalized_shape):
        raise ValueError(
            f"{op}: {name} has shape {list(param.shape)}; it must equal normalized_shape "
            f"{list(normalized_shape)}"
        )
    allowed = (input.dtype, torch.float32) if input.dtype in HALF_DTYPES else (input.dtype,)
    if param.dtype not in allowed:
        raise TypeError(
            f"{op}: {name} has dtype {dtype_name(param.dtype)}; with a {dtype_name(input.dtype)} "
            f"input it must be {' or '.join(dtype_name(d) for d in allowed)}"
        )


def check_eps(op: str, eps: float) -> None:
    """eps must be a finite number >= 0."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def check_approximate(op: str, approximate: str) -> None:
    """GELU's ``approximate`` is 'none' or 'tanh' (as in torch.nn.functional.gelu)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
