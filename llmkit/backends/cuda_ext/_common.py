"""What the cuda_ext backend's registrations share: the extension's ops, row reshapes, and
where its CPU kernels are preferred to the reference (:data:`CPU_DEFAULT`).

The extension's ops live in their own namespace (``torch.ops.llmkit_ext.*``, apart from the
user-facing ``llmkit::`` ops). The library is loaded by the backend's availability probe
(:mod:`llmkit._ext`) before any implementation runs. Validation has already happened in
the op; ``why_not`` only names what these kernels do not take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ...dispatch import CpuDefault, CpuPreference

BACKEND = "cuda_ext"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)

_HALF = {torch.bfloat16: 0, torch.float16: 0}
CPU_DEFAULT: dict[str, CpuDefault] = {
    "layer_norm.forward": CpuPreference(
        {torch.bfloat16: 128 * 768, torch.float16: 128 * 768, torch.float32: (512 * 768, 1 << 22)}
    ),
    "layer_norm.backward": CpuPreference(_HALF),
    "rms_norm.forward": True,
    "rms_norm.backward": True,
    "add_layer_norm.forward": CpuPreference(
        {torch.bfloat16: 128 * 768, torch.float16: 128 * 768, torch.float32: (256 * 768, 1 << 22)}
    ),
    "add_layer_norm.backward": CpuPreference({**_HALF, torch.float32: 1024 * 768}),
    "add_rms_norm.forward": True,
    "add_rms_norm.backward": True,
    "gelu.forward": CpuPreference({torch.bfloat16: (0, 4096), torch.float16: (0, 4096), torch.float32: (0, 8192)}),
    "gelu.backward": CpuPreference({**_HALF, torch.float32: (0, 1 << 22)}),
    "bias_gelu.forward": True,
    "bias_gelu.backward": True,
    "quantize_int8.forward": True,
    "geglu.forward": True,
    "geglu.backward": True,
    "swiglu.forward": CpuPreference({**_HALF, torch.float32: 1 << 18}),
    "swiglu.backward": True,
}
"""Dispatch point (``op.stage``) -> the ``cpu_default`` of its cuda_ext implementation: where
the C++ CPU kernels come before the reference in the default CPU order, per dtype and size
(elements of the first tensor argument; a range is half-open). Chosen from measurements
(docs/benchmarks.md, "Where the C++ CPU kernels are preferred"): only where they measured
clearly faster; a one-row decode step stays on the reference."""


def ext_ops():
    """``torch.ops.llmkit_ext``: the loaded extension's ops."""
    return torch.ops.llmkit_ext


def shaped(t: Tensor, shape: Sequence[int]) -> Tensor:
    """``t.reshape(shape)``, or ``t`` itself where it has that shape already: a reshape
    costs about 1 us on the CPU, as much as a one-row kernel, and decode calls make six."""
    return t if t.shape == tuple(shape) else t.reshape(shape)


def rows(x: Tensor, n: int) -> Tensor:
    """``x (*, n)`` as ``(rows, n)`` (a view where possible)."""
    m = x.numel() // n if n else math.prod(x.shape[:-1])
    return shaped(x, (m, n))
