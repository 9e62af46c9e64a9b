"""Helpers shared by the reference backend's implementations."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
