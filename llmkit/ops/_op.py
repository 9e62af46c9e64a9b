"""What every op shares: its custom op made from its call class, and the eager fast path.

An op's arguments are written once, as a ``typing.NamedTuple`` call class (e.g.
``LayerNormCall(input, normalized_shape, weight, bias, eps)``). :class:`Op` derives from it:

* the ``torch.library`` custom op ``llmkit::<name>`` (its schema inferred from the call
  class's annotations), whose implementation validates the call and runs the op's dispatch
  point, and whose fake implementation validates it and gives the output shapes;
* the functional entry point :meth:`Op.__call__`, which takes the eager fast path of
  :mod:`._fastpath` where nothing needs the custom op (plain CPU tensors outside autograd,
  compile, export and modes): the same validation, skipped for an argument signature that
  passed before (:func:`call_signature`), and the same dispatch point, without the custom-op
  machinery's ~10 us per call.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from ..dispatch import DispatchPoint
from . import _fastpath as FP

__all__ = ["Op", "call_signature"]

C = TypeVar("C", bound=tuple)

_SCALARS = (int, float, bool, str)


def call_signature(c: tuple) -> Hashable | None:
    """What validation of call ``c`` depends on, on the fast path (CPU tensors): each tensor's
    shape and dtype, each scalar's type and value, int lists as tuples. None when an
    argument has no exact signature (then the custom op validates the call)."""
    key: list[Hashable] = [type(c)]
    for v in c:
        if type(v) is Tensor or type(v) is torch.nn.Parameter:
            key.append((v.shape, v.dtype))
        elif v is None or isinstance(v, torch.dtype):
            key.append(v)
        elif type(v) in _SCALARS:
            key.append((type(v), v))
        elif type(v) in (list, tuple) and all(type(e) in (int, bool) for e in v):
            key.append((type(v), tuple(v)))
        else:
            return None
    return tuple(key)


def _plain_call(c: tuple) -> bool:
    """Every tensor of the call is a plain CPU tensor autograd need not see (see
    :func:`._fastpath.eager_ok`)."""
    return FP.eager_ok(*(v for v in c if v is not None and not isinstance(v, (*_SCALARS, list, tuple, torch.dtype))))


class Op(Generic[C]):
    """One ``llmkit::<name>`` custom op defined from its call class.

    Args:
        name: the op's name (``torch.ops.llmkit.<name>``).
        call: the call class; its annotations give the schema, its field defaults the
            schema's defaults.
        returns: the return annotation (``Tensor``, ``tuple[Tensor, Tensor]``, ...).
        point: the dispatch point that computes the op.
        validate: ``validate(c)`` raises a clear error on bad input (before any kernel); it
            may read only what :func:`call_signature` holds (the fast path caches it).
        fake: ``fake(c)``: empty outputs of the right shapes and dtypes (``torch.compile``,
            ``torch.export``, meta tensors); called after ``validate``.
        check_values: ``check_values(c)``, optional: checks of tensor *values* (read from
            CPU tensors), run on every real call after ``validate``, never on fake tensors.
        finish: ``finish(c, result)``, optional: what the op does to the dispatch point's
            result on every path (e.g. a memory layout the op promises).
    """

    def __init__(
        self,
        name: str,
        call: type[C],
        returns: Any,
        point: DispatchPoint,
        validate: Callable[[C], object],
        fake: Callable[[C], Any],
        check_values: Callable[[C], object] | None = None,
        finish: Callable[[C, Any], Any] | None = None,
    ):
        self.name, self.call, self.point, self.validate = name, call, point, validate
        self.check_values, self.finish = check_values, finish
        self._validated = FP.ValidatedSignatures()
        hints = typing.get_type_hints(call)
        # a field with a default (an option added later) keeps calls written without it valid
        defaults = getattr(call, "_field_defaults", {})
        params = [
            inspect.Parameter(
                n,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=hints[n],
                default=defaults.get(n, inspect.Parameter.empty),
            )
            for n in call._fields  # type: ignore[attr-defined]
        ]

        def run(*args: Any, **kwargs: Any) -> Any:
            c = call(*args, **kwargs)
            validate(c)
            return self._compute(c)

        def fake_run(*args: Any, **kwargs: Any) -> Any:
            c = call(*args, **kwargs)
            validate(c)
            return fake(c)

        run.__signature__ = inspect.Signature(params, return_annotation=returns)  # type: ignore[attr-defined]
        run.__name__ = run.__qualname__ = name
        run.__module__ = call.__module__
        self.custom = torch.library.custom_op(f"llmkit::{name}", run, mutates_args=())
        self.custom.register_fake(fake_run)
        self.packet = getattr(torch.ops.llmkit, name)
        """``torch.ops.llmkit.<name>``: what calls go through (graphs show this op)."""

    def _compute(self, c: C) -> Any:
        """After validation: the value checks, the dispatch point, the finish."""
        if self.check_values is not None:
            self.check_values(c)
        result = self.point(c)
        return result if self.finish is None else self.finish(c, result)

    def __call__(self, c: C) -> Any:
        """Run the op on call ``c``: directly through the dispatch point on the eager fast
        path (validated once per argument signature), else through the custom op."""
        if _plain_call(c):
            key = call_signature(c)
            if key is not None:
                self._validated.check(key, lambda: self.validate(c))
                return self._compute(c)
        return self.packet(*c)

    def register_autograd(self, backward: Callable[..., Any], setup_context: Callable[[Any, C, Any], None]) -> None:
        """Autograd of the op: ``setup_context(ctx, c, output)`` receives the call object."""
        call = self.call

        def setup(ctx: Any, inputs: tuple, output: Any) -> None:
            setup_context(ctx, call(*inputs), output)

        self.custom.register_autograd(backward, setup_context=setup)
