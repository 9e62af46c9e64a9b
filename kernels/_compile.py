"""Declarations of kernel launch configurations for the compile report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class CompileSpec:
    """One kernel at one launch configuration, compiled ahead of time for a report.

    ``signature`` maps every argument name to a Triton type string (``"*fp16"``,
    ``"*fp32"``, ``"i32"``, ``"i64"``, ``"fp32"``, or ``"constexpr"``); ``constexprs``
    gives the constexpr values, either as a dict or as a function of the target
    architecture (80, 90, ...) for kernels whose configuration depends on it.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] | Callable[[int], dict[str, Any]]
    num_warps: int | Callable[[int], int] = 4
    num_stages: int | Callable[[int], int] = 3
    matrix: bool = False
    """A matrix kernel: the report says which tensor-core instructions it uses."""
    archs: tuple[int, ...] = (80, 90)

    def for_arch(self, arch: int) -> tuple[dict[str, Any], int, int]:
        c = self.constexprs(arch) if callable(self.constexprs) else dict(self.constexprs)
        w = self.num_warps(arch) if callable(self.num_warps) else self.num_warps
        s = self.num_stages(arch) if callable(self.num_stages) else self.num_stages
        return c, w, s
