"""The roofline, measured on the GPU in the same run as the kernels it judges.

Three ceilings, each the best a plain PyTorch call reaches on this device right now:

* ``copy_gbps``: a large device-to-device copy (``dst.copy_(src)``), bytes read plus bytes
  written per second: the bandwidth a memory-bound kernel can hope for;
* ``bf16_tflops``: a large square bf16 ``torch.matmul`` (cuBLAS): the compute ceiling of
  half-precision kernels (attention, float GEMMs);
* ``int8_tops``: a large square ``torch._int_mm`` (int8 x int8 -> int32, cuBLASLt):
  the ceiling of int8 GEMMs.

A result's *fraction of roofline* is its achieved GB/s (or TFLOP/s, TOP/s) divided by the
ceiling that bounds its op (see :func:`roof_for`). These are measured ceilings, not
datasheet peaks, so a fraction near 1 means "as fast as PyTorch's best call of the same
kind", and can exceed 1 slightly. This is a CUDA-only measurement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .._compat import int_mm
from . import formulas
from .timing import CudaBudget, Sample, measure_cuda

ROOF_KINDS = ("bandwidth", "bf16", "int8")


@dataclasses.dataclass
class Roofline:
    """Measured ceilings (None: not measured)."""

    copy_gbps: float | None = None
    bf16_tflops: float | None = None
    int8_tops: float | None = None
    copy_bytes: int = 0
    matmul_size: int = 0
    samples: dict[str, Sample] = dataclasses.field(default_factory=dict)

    def roof(self, kind: str) -> float | None:
        """The ceiling of ``kind`` ('bandwidth' in GB/s, 'bf16' in TFLOP/s, 'int8' in TOP/s)."""
        if kind not in ROOF_KINDS:
            raise ValueError(f"unknown roof kind {kind!r}; kinds are {', '.join(ROOF_KINDS)}")
        return {"bandwidth": self.copy_gbps, "bf16": self.bf16_tflops, "int8": self.int8_tops}[kind]


def roof_for(bound: str, dtype: torch.dtype) -> str | None:
    """Which ceiling judges a result: memory-bound -> bandwidth; compute-bound -> by dtype.

    ``bound`` is 'memory', 'compute' or 'int8'. Float16 compute is judged against the bf16
    matmul (same tensor-core rate); float32 compute has no measured ceiling (None).
    """
    if bound == "memory":
        return "bandwidth"
    if bound == "int8":
        return "int8"
    if bound == "compute":
        return "bf16" if dtype in (torch.bfloat16, torch.float16) else None
    raise ValueError(f"unknown bound {bound!r}")


def fraction(achieved: float | None, bound: str, dtype: torch.dtype, roofline: Roofline | None) -> float | None:
    """``achieved`` (in the unit of the matching ceiling) over that ceiling; None if unknown."""
    if roofline is None:
        return None
    kind = roof_for(bound, dtype)
    return formulas.fraction_of_roofline(achieved, roofline.roof(kind) if kind else None)


def _sample(fn: Callable[..., object], *inputs: torch.Tensor, budget: CudaBudget) -> Sample:
    """Time ``fn(*inputs)``; the inputs are freed when this returns, before the next ceiling
    allocates its own."""
    s, _ = measure_cuda(lambda: fn(*inputs), budget, graph=False)
    return s


def measure_roofline(copy_bytes: int, matmul_size: int, budget: CudaBudget) -> Roofline:
    """Measure the three ceilings on the current CUDA device (see module doc)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the roofline is measured on a CUDA GPU; none is available")
    dev = torch.device("cuda")
    out = Roofline(copy_bytes=copy_bytes, matmul_size=matmul_size)

    numel = copy_bytes // 4
    src = torch.empty(numel, dtype=torch.float32, device=dev).uniform_()
    s = _sample(torch.Tensor.copy_, torch.empty_like(src), src, budget=budget)  # dst.copy_(src)
    del src
    out.samples["copy"] = s
    out.copy_gbps = formulas.copy(numel * 4).gbps(s.median_s)

    n = matmul_size
    s = _sample(torch.matmul, *(torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2)), budget=budget)
    out.samples["bf16_matmul"] = s
    out.bf16_tflops = formulas.linear(n, n, n, 2, bias=False).tflops(s.median_s)

    s = _sample(
        int_mm, *(torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8) for _ in range(2)), budget=budget
    )
    out.samples["int8_int_mm"] = s
    out.int8_tops = formulas.linear(n, n, n, 1, bias=False).tflops(s.median_s)
    torch.cuda.empty_cache()
    return out
