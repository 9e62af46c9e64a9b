"""Input validation shared by every op and every backend.

Each check raises ``ValueError`` (wrong shape or value) or ``TypeError`` (wrong
dtype or type) with a message that names the argument, what it got and what it
needs. The ops call these before dispatch, so no backend ever sees bad input.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import SupportsIndex, cast

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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


def shape_list(op: str, name: str, value: object) -> list[int]:
    """An int or a sequence of ints (``list``, ``tuple``, ``torch.Size``; numpy integers and
    0-d integer tensors count as ints) as a list of ints; floats are refused, not truncated."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (int, numbers.Integral, torch.Tensor)) and not isinstance(value, bool):
        items = [value]
    else:
        raise TypeError(
            f"{op}: {name} must be an int or a sequence of ints (e.g. input.shape[-1:]), got "
            f"{value!r} ({type(value).__name__})"
        )
    out = []
    for v in items:
        try:
            if isinstance(v, bool):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(
                f"{op}: {name} must hold ints, got {value!r} (an entry {v!r} of type {type(v).__name__})"
            ) from None
    return out


def check_int(op: str, name: str, value: object) -> int:
    """An integer argument (``int``, a numpy integer or a 0-d integer tensor; not a bool,
    and not a float, which would be truncated) as an int."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(cast(SupportsIndex, value))  # anything else raises the TypeError below
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {value!r} ({type(value).__name__})") from None


def check_number(op: str, name: str, value: object) -> float:
    """A real-number argument (``int``, ``float``, a numpy scalar, or a one-element real
    tensor) as a float; bools, strings and larger tensors are refused."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex() or value.is_meta:
            raise TypeError(
                f"{op}: {name} must be a number, got a {dtype_name(value.dtype)} tensor of shape "
                f"{list(value.shape)} on {value.device}; pass a Python float"
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_no_grad(op: str, **tensors: torch.Tensor | None) -> None:
    """Inference-only ops: no tensor argument may require grad while grad mode is on (they
    have no backward; autograd would otherwise fail later, at ``backward()``, with a
    message that does not name the op)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(
                f"{op}: {name} requires grad, but {op} has no gradient (an inference-only op); "
                f"call it under torch.no_grad() or torch.inference_mode(), or pass {name}.detach()"
            )


def normalized_rows(
    op: str, input: torch.Tensor, normalized_shape: Sequence[int], input_name: str = "input"
) -> tuple[list[int], int, int]:
    """Check ``normalized_shape`` against ``input``; return (shape list, rows M, row length N)."""
    ns = shape_list(op, "normalized_shape", normalized_shape)
    if len(ns) == 0:
        raise ValueError(f"{op}: normalized_shape must name at least one dimension, got []")
    if len(ns) > input.dim() or list(input.shape[input.dim() - len(ns) :]) != ns:
        raise ValueError(
            f"{op}: normalized_shape {ns} must equal the trailing dimensions of {input_name}, "
            f"whose shape is {list(input.shape)}"
        )
    n = math.prod(ns)
    m = input.numel() // n if n else math.prod(input.shape[: input.dim() - len(ns)])
    return ns, m, n


def check_affine(
    op: str, name: str, param: torch.Tensor | None, normalized_shape: Sequence[int], input: torch.Tensor
) -> None:
    """A norm's weight or bias: None, or a float tensor of shape ``normalized_shape``."""
    if param is None:
        return
    check_tensor(op, name, param)
    if list(param.shape) != list(normalized_shape):
        raise ValueError(
            f"{op}: {name} has shape {list(param.shape)}; it must equal normalized_shape {list(normalized_shape)}"
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


# --------------------------------------------------------------------------------------
# backward ops: gradients and saved tensors against the forward's input
# --------------------------------------------------------------------------------------


def check_grad(op: str, name: str, grad: object, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """A gradient argument: a tensor with the shape, dtype and device of ``like``; returns it."""
    grad = check_tensor(op, name, grad)
    if grad.shape != like.shape:
        raise ValueError(
            f"{op}: {name} has shape {list(grad.shape)}; it must equal {like_name}'s shape {list(like.shape)}"
        )
    if grad.dtype != like.dtype:
        raise TypeError(
            f"{op}: {name} has dtype {dtype_name(grad.dtype)}; it must be {like_name}'s dtype {dtype_name(like.dtype)}"
        )
    check_same_device(op, **{like_name: like, name: grad})
    return grad


def check_saved(op: str, name: str, t: object, shape: Sequence[int], dtype: torch.dtype, what: str) -> torch.Tensor:
    """A tensor the forward saved (statistics, lse): exactly ``shape`` and ``dtype``; returns it."""
    t = check_tensor(op, name, t)
    if list(t.shape) != list(shape):
        raise ValueError(f"{op}: {name} has shape {list(t.shape)}; it must be {list(shape)} ({what})")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {dtype_name(t.dtype)}; it must be {dtype_name(dtype)} ({what})")
    return t


def check_output_mask(op: str, output_mask: object, n: int) -> None:
    """``output_mask``: ``n`` bools, one per gradient the backward may compute."""
    if not isinstance(output_mask, (list, tuple)) or len(output_mask) != n:
        raise ValueError(f"{op}: output_mask must be {n} bools (one per gradient), got {output_mask!r}")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of a norm's saved statistics for an input dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_norm_backward(
    op: str,
    input_name: str,
    input: object,
    normalized_shape: Sequence[int],
    grads: dict[str, object],
    params: dict[str, torch.Tensor | None],
    stats: dict[str, object],
    output_mask: object,
) -> list[int]:
    """Every tensor of a norm backward op against the forward's ``input``: gradients with its
    shape and dtype, weight / bias of shape ``normalized_shape``, statistics of its leading
    shape in :func:`stats_dtype`, all on one device. Returns ``normalized_shape`` as a list."""
    x = check_tensor(op, input_name, input)
    check_floating(op, input_name, x)
    ns, _, _ = normalized_rows(op, x, normalized_shape, input_name)
    tensors: dict[str, torch.Tensor | None] = {input_name: x}  # in this order for the device check
    for name, g in grads.items():
        tensors[name] = check_grad(op, name, g, x, input_name)
    for name, p in params.items():
        check_affine(op, name, p, ns, x)
        tensors[name] = p
    lead = list(x.shape[: x.dim() - len(ns)])
    for name, t in stats.items():
        tensors[name] = check_saved(op, name, t, lead, stats_dtype(x.dtype), f"one per row of {input_name}")
    check_same_device(op, **tensors)
    check_output_mask(op, output_mask, 1 + len(params))
    return ns
