"""What the triton backend's registrations share."""

from __future__ import annotations

import torch

TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes llmkit's Triton kernels take (float64 goes to the reference backend)."""

INT32_MAX = 2**31 - 1
"""Row lengths and row counts past this exceed the row kernels' int32 indexing."""
