"""GELU suites: gelu and bias_gelu (fused ``GELU(x + bias)``).

Each case is ``x (M, N)`` in the benchmark dtype with fresh random data, forward or backward.
Implementations: PyTorch eager (``F.gelu(x + bias)``), its ``torch.compile`` and llmkit's op
on each backend. Judged in GB/s against the measured copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops as L
from . import formulas
from .suite import Case, Context, OpCall, Suite, elem_size, register, standard_impls
from .suites_layer_norm import rows


def _gelu_builder(with_bias: bool) -> Callable[[Context, dict[str, Any], str, torch.dtype], Case]:
    def build(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
        m, n = point["M"], point["N"]
        d = rows(ctx, point, dtype)
        bwd = pass_ == "bwd"
        if with_bias:
            call = OpCall([d["x"], d["b"]], pass_, wrt=(0, 1), grads=[d["dy"]])
            impls = standard_impls(ctx, "bias_gelu", call, lambda x, b: F.gelu(x + b), lambda x, b: L.bias_gelu(x, b))
            work = formulas.bias_gelu(m, n, elem_size(dtype), bwd)
        else:
            call = OpCall([d["x"]], pass_, wrt=(0,), grads=[d["dy"]])
            impls = standard_impls(ctx, "gelu", call, lambda x: F.gelu(x), lambda x: L.gelu(x))
            work = formulas.gelu(m * n, elem_size(dtype), bwd)
        return Case("bias_gelu" if with_bias else "gelu", pass_, point, dtype, work, "memory", impls)

    return build


register(Suite("gelu", "op", ("fwd", "bwd"), _gelu_builder(False), "exact (erf) GELU of x (M, N)"))
register(Suite("bias_gelu", "op", ("fwd", "bwd"), _gelu_builder(True), "fused GELU(x + bias) vs eager add then F.gelu"))
