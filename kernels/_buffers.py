"""Output buffers and 2-D row views shared by the int8 kernels' host functions."""

from __future__ import annotations

import torch


def out_buffer(out: torch.Tensor | None, shape: list[int], dtype: torch.dtype, device: torch.device,
                name: str) -> torch.Tensor:
    """``out`` checked against the shape and dtype a kernel writes, or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if list(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"{name}: the output buffer must be a contiguous {dtype} tensor of shape {shape} on {device}, got "
            f"{out.dtype} {list(out.shape)} on {out.device}{'' if out.is_contiguous() else ' (not contiguous)'}"
        )
    return out


def i32_inner(t: torch.Tensor) -> torch.Tensor:
    """2-D ``t`` whose offsets along dim 1 fit in int32 (the kernels index rows in int64,
    columns in int32): a contiguous copy in the rare case they do not."""
    if t.stride(1) != 1 and t.shape[1] * t.stride(1) >= 2**31:
        return t.contiguous()
    return t


def rows_view(t: torch.Tensor, dim: int) -> torch.Tensor | None:
    """``t`` with ``dim`` moved last and the rest flattened, as a view (None if impossible,
    or if its column offsets would not fit in int32)."""
    moved = t.movedim(dim, -1)
    try:
        view = moved.view(-1, moved.shape[-1])
    except RuntimeError:
        return None
    return view if i32_inner(view) is view else None
