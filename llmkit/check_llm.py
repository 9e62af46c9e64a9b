"""``llmkit check`` cases of the gated activations of today's LLMs: ``swiglu`` and ``geglu``.

Built like the cases of :mod:`llmkit.check` (its :class:`~llmkit.check.Case`, layouts and
helpers): fresh random inputs, the op forward and backward on the backend in force, PyTorch's
unfused code in the same dtype as the baseline, the float64 formulas of
:mod:`llmkit.reference64` as the yardstick.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from . import ops as L
from . import reference64 as R
from .check import WITH_F64, Case, _f64, _grads, _label, _leaf, laid_out

# (shape, layout, quick, interp); "halves": gate and up are the two halves of one (*, 2N) tensor
GLU_SHAPES = [
    ((1,), "contig", True, True),
    ((7, 1023), "contig", True, True),
    ((7, 1023), "halves", True, True),
    ((0, 33), "contig", True, True),
    ((33, 7), "transposed", True, True),
    ((4, 5, 96), "permuted", False, True),
    ((3, 5, 1500), "contig", False, False),
    ((2, 65537), "contig", False, False),
]

GLU_ACTIVATIONS = (("swiglu", None), ("geglu", "none"), ("geglu", "tanh"))


def _pair(shape: tuple[int, ...], layout: str, dtype: torch.dtype, dev: torch.device) -> tuple[torch.Tensor, ...]:
    if layout == "halves":
        h = (torch.randn((*shape[:-1], 2 * shape[-1]), device=dev) * 3).to(dtype)
        return h[..., : shape[-1]], h[..., shape[-1]:]
    gate = laid_out((torch.randn(shape, device=dev) * 3).to(dtype), layout)
    return gate, laid_out(torch.randn(shape, device=dev).to(dtype), layout)


def glu_cases() -> Iterable[Case]:
    """swiglu and geglu (exact and tanh) over the sweep, every dtype."""
    for dtype in WITH_F64:
        for shape, layout, quick, interp in GLU_SHAPES:
            if dtype == torch.float64 and quick:
                continue  # float64 (reference-only on most backends): the non-quick sweep
            for op, approx in GLU_ACTIVATIONS:

                def make(dev, shape=shape, dtype=dtype, layout=layout):
                    gate, up = _pair(shape, layout, dtype, dev)
                    return {"gate": gate, "up": up, "gy": torch.randn(shape, device=dev)}

                def fns(op=op, approx=approx):
                    if op == "swiglu":
                        return L.swiglu, R.swiglu, lambda g, u: F.silu(g) * u
                    return (lambda g, u: L.geglu(g, u, approx), lambda g, u: R.geglu(g, u, approx),
                            lambda g, u: F.gelu(g, approximate=approx) * u)

                def run(d, fns=fns):
                    g, u = _leaf(d["gate"]), _leaf(d["up"])
                    y = fns()[0](g, u)
                    return {"out": y} | _grads(y, d["gy"], {"gate": g, "up": u})

                def ref(d, fns=fns):
                    g, u = _f64(_leaf(d["gate"])), _f64(_leaf(d["up"]))
                    y = fns()[1](g, u)
                    return {"out": y} | _grads(y, d["gy"], {"gate": g, "up": u})

                def base(d, fns=fns):
                    g, u = _leaf(d["gate"]), _leaf(d["up"])
                    y = fns()[2](g, u)
                    return {"out": y} | _grads(y, d["gy"], {"gate": g, "up": u})

                label = _label(shape, layout) + (f" {approx}" if approx else "")
                yield Case(op, label, dtype, make, run, ref, base, quick=quick, interp=interp)
