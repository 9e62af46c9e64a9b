"""Declarations of kernel launches for the compile report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ._launch import STANDARD_TARGETS, Launch, planning_for, recording


@dataclasses.dataclass
class CompileSpec:
    """One kernel at the launch its launcher makes for one call, compiled ahead of time.

    ``call`` runs a launcher (``attention_forward``, ``norm_backward``...) on ``meta``
    tensors of the spec's shapes; :meth:`launch` records what that call launches when it
    plans for an sm_80 GPU with 108 SMs or an sm_90 GPU with 132 SMs, and keeps its (first)
    launch of ``kernel``. The compile report compiles that launch's arguments
    with the specializations Triton derives from them (16-byte divisible pointers and
    integers, integers equal to 1 as constants), its constexprs and launch options: what a
    real launch of that shape compiles.
    """

    name: str
    kernel: Any
    call: Callable[[], Any]
    matrix: bool = False
    """A matrix kernel: the report says which tensor-core instructions it uses."""
    archs: tuple[int, ...] = (80, 90)

    def launch(self, arch: int) -> Launch:
        """The launch of ``kernel`` that ``call`` makes planning for ``arch``."""
        with planning_for(STANDARD_TARGETS[arch]), recording() as launches:
            self.call()
        mine = [rec for rec in launches if rec.kernel is self.kernel]
        if not mine:
            made = ", ".join(rec.name for rec in launches) or "nothing"
            raise ValueError(f"compile spec {self.name}: the call launched {made}, "
                             f"not {getattr(self.kernel, 'fn', self.kernel).__name__}")
        return mine[0]
