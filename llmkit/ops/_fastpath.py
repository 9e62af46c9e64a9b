"""The eager fast path of the functional ops on CPU tensors.

Each functional op (``llmkit.ops.layer_norm`` ...) normally calls its ``torch.library``
custom op, which validates the arguments and then calls the op's dispatch point. On
small CPU tensors (a decode step) the custom-op machinery and the validation cost more
than the computation (measured ~7 us and ~4 us per call against ~3 us for the ATen
kernel), so when nothing needs the custom op the functional calls the op's *body*
directly: the same validation (skipped when the same shapes / dtypes / scalars passed it
before, :class:`ValidatedSignatures`) and the same dispatch point, which still picks the
backend per call and honours ``use_backend``, ``LLMKIT_BACKEND`` and a backend named
explicitly (refusals raise the same :class:`~llmkit.errors.BackendError`). The result is
the op's result: the same function computes it.

Nothing needs the custom op (:func:`eager_ok`) when all of these hold:

* not inside ``torch.compile`` / ``torch.export`` tracing (they must see one node);
* no autograd: grad mode off, or no tensor argument requires grad;
* every tensor argument is a plain CPU ``torch.Tensor`` / ``nn.Parameter`` (no
  FakeTensor, FunctionalTensor or other subclass, no meta or CUDA tensor);
* no ``TorchFunctionMode`` / ``TorchDispatchMode`` and no functorch transform (``vmap``,
  ``grad``) is active: those expect to see the op.

:func:`selects_reference` tells whether a dispatch point would run its ``reference``
implementation for a CPU call; ``llmkit.nn`` uses it before computing in place into a
temporary it owns (the reference computation, minus an allocation).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import nn

from .._compat import no_active_modes
from ..dispatch import BACKENDS, DispatchPoint, requested

__all__ = ["eager_ok", "selects_reference", "ValidatedSignatures", "signature"]

_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def eager_ok(*tensors: object, optional: tuple = ()) -> bool:
    """True when a call with these tensor arguments may skip the custom op.

    ``tensors`` must all be tensors (anything else: False, the custom op reports it);
    ``optional`` ones may also be None.
    """
    if torch.compiler.is_compiling() or not no_active_modes():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if not _plain_cpu(t, grad):
            return False
    for t in optional:
        if t is not None and not _plain_cpu(t, grad):
            return False
    return True


def _plain_cpu(t: object, grad: bool) -> bool:
    """A plain CPU tensor that autograd does not need to see (grad mode ``grad``)."""
    # (type() is one of the tensor types; a cast would cost a call on this hot path)
    return type(t) in _PLAIN_TENSOR_TYPES and t.is_cpu and not (grad and t.requires_grad)  # type: ignore[attr-defined]


def selects_reference(point: DispatchPoint) -> bool:
    """True when ``point`` runs its reference implementation for a call on CPU tensors.

    The first backend of the order in force (``use_backend``, ``LLMKIT_BACKEND``, else the
    CPU default order) that is available on the CPU must be ``reference`` (which takes
    every call). Conservative: when another backend comes first and would refuse the
    call, dispatch falls back to the reference but this says False.
    """
    req = requested(point.op, point.composite)
    order = req.order if req is not None else point._default_order("cpu")
    for name in order:
        if name == "reference":
            return True
        if BACKENDS[name].unavailable_reason("cpu") is None:
            return False
    return False


class ValidatedSignatures:
    """Argument signatures (shapes, dtypes, scalars) that passed an op's validation.

    Validation of these ops depends only on such signatures for CPU tensors (the devices
    are all CPU on the fast path), so a signature seen once need not be checked again.
    Bounded: cleared when it holds ``limit`` entries.
    """

    def __init__(self, limit: int = 4096):
        self._seen: set[Hashable] = set()
        self._limit = limit

    def __contains__(self, key: Hashable) -> bool:
        return key in self._seen

    def add(self, key: Hashable) -> None:
        if len(self._seen) >= self._limit:
            self._seen.clear()
        self._seen.add(key)

    def check(self, key: Hashable, validate: Callable[[], object]) -> bool:
        """Run ``validate()`` (which raises on bad input) unless ``key`` passed before, and
        remember ``key`` when it passes. True when the key had passed before (nothing ran)."""
        if key in self._seen:
            return True
        validate()
        self.add(key)
        return False


def signature(t: torch.Tensor | None) -> tuple | None:
    """Shape and dtype of a tensor argument (None for None) for a validation key."""
    return None if t is None else (t.shape, t.dtype)
