"""How the kernel modules launch: one call site for every kernel, the GPU a launch plans
for, grid limits, and recording launches instead of running them.

Every launcher calls :func:`launch` instead of ``kernel[grid](...)``, and asks
:func:`device_target` for the compute capability and multiprocessor count its heuristics
plan for. That gives two things that need no GPU:

* :func:`recording` collects the launches (kernel, grid, every argument by name, launch
  options) instead of running them. With :func:`planning_for` and ``meta`` tensors, a
  launcher runs its heuristics for an sm_80 / sm_90 GPU of a given size without memory or
  a device: ``compile_specs()`` and the compile report use this to compile exactly the
  arguments a real launch passes (and so the specializations Triton derives from them),
  and the tests use it to check grids, configurations and alignment decisions.
* :func:`launch` checks the grid against CUDA's limits (x < 2**31, y and z <= 65535)
  before anything runs, so an impossible launch is a clear error instead of a launch
  failure on the device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch

MAX_GRID_X = 2**31 - 1
"""CUDA's limit on the first grid dimension."""
MAX_GRID_YZ = 65535
"""CUDA's limit on the second and third grid dimensions."""


@dataclasses.dataclass(frozen=True)
class Target:
    """The GPU a launch plans for: compute capability as an int (80, 90) and SM count."""

    arch: int
    sms: int


STANDARD_TARGETS = {80: Target(80, 108), 90: Target(90, 132)}
"""The GPUs the compile report plans for: an A100 (sm_80, 108 SMs) and an H100 / H200
(sm_90, 132 SMs)."""


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher made it."""

    kernel: Any
    grid: tuple[int, int, int]
    args: dict[str, Any]
    """Every parameter of the kernel by name (constexprs included), as passed."""
    options: dict[str, Any]
    """Launch options: ``num_warps``, ``num_stages``, ``enable_fp_fusion``..."""

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", repr(fn))

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


_PLAN: contextvars.ContextVar[Target | None] = contextvars.ContextVar("llmkit_kernels_plan", default=None)
_RECORD: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar("llmkit_kernels_record", default=None)


@functools.cache
def _cuda_target(index: int) -> Target:
    major, minor = torch.cuda.get_device_capability(index)
    return Target(major * 10 + minor, torch.cuda.get_device_properties(index).multi_processor_count)


def device_target(device: torch.device) -> Target | None:
    """The GPU that launches on ``device`` plan for.

    A CUDA device: its own capability and SM count (read once per device). Any other device
    inside :func:`planning_for`: the target given there. Otherwise None: the kernels run in
    Triton's interpreter and each launcher picks its small interpreter configuration.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_target(index)
    return _PLAN.get()


@contextlib.contextmanager
def planning_for(target: Target) -> Iterator[Target]:
    """Launches on non-CUDA tensors (``meta`` tensors, or CPU tensors under
    :func:`recording`) plan for ``target`` inside this block."""
    token = _PLAN.set(target)
    try:
        yield target
    finally:
        _PLAN.reset(token)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside this block :func:`launch` appends to the yielded list instead of running."""
    launches: list[Launch] = []
    token = _RECORD.set(launches)
    try:
        yield launches
    finally:
        _RECORD.reset(token)


def _parameters(kernel: Any) -> list[str]:
    # a JITFunction and the interpreter's InterpretedFunction both wrap the Python function as .fn
    return list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)


def check_grid(kernel: Any, grid: tuple[int, ...]) -> tuple[int, int, int]:
    """``grid`` padded to three dims; a ValueError naming the kernel when CUDA could not launch it."""
    dims = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    limits = (MAX_GRID_X, MAX_GRID_YZ, MAX_GRID_YZ)
    if len(dims) != 3 or any(g < 1 or g > lim for g, lim in zip(dims, limits, strict=True)):
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
        raise ValueError(
            f"{name}: grid {dims} is outside CUDA's limits (x in [1, {MAX_GRID_X}], y and z in "
            f"[1, {MAX_GRID_YZ}]); the input is too large for one launch"
        )
    return dims[0], dims[1], dims[2]


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` after checking the grid, or recorded (:func:`recording`)."""
    dims = check_grid(kernel, grid)
    record = _RECORD.get()
    if record is None:
        kernel[dims](*args, **kwargs)
        return
    names = _parameters(kernel)
    bound = dict(zip(names, args, strict=False))  # trailing arguments may come by keyword
    options = {}
    for key, value in kwargs.items():
        if key in names:
            bound[key] = value
        else:
            options[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"launch of {getattr(getattr(kernel, 'fn', kernel), '__name__', kernel)}: "
                        f"no value for {missing}")
    record.append(Launch(kernel, dims, bound, options))
