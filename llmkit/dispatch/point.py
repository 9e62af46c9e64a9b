"""Dispatch points: one function with an implementation per backend, chosen per call.

A dispatch point (``layer_norm.forward``, ``layer_norm.backward``, ...) has a *call class*:
a ``typing.NamedTuple`` of the point's arguments, named, in the order of the op's schema.
That class is the signature, written once: the custom op's schema is derived from it
(:func:`llmkit.ops._op.define`), every backend's implementation takes one call object
``c`` (``fn(c)``), and so do its ``why_not(c)`` and CPU preference. Calling the point with
positional arguments builds the call object.

Each backend registers an implementation with what it supports: the devices and dtypes it
takes (of the call's first tensor argument) and ``why_not(c)``, readable reasons it cannot
take a particular call. :meth:`DispatchPoint.select` walks the order in force
(:mod:`.selection`, else the default order for the device) and runs the first that takes
the call; a fallback in the default order is logged once, an explicit request never runs
anything outside its list and raises :class:`~llmkit.errors.BackendError` with every reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import BackendError
from .backends import BACKEND_NAMES, BACKENDS, OPS, _log_once, check_backend_name
from .selection import requested

WhyNot = Callable[..., Iterable[str]]

CpuDefault = bool | Callable[..., bool]
"""Whether an implementation comes before ``reference`` in the default CPU order: a
constant, or a predicate called with each call's arguments (as ``why_not`` is) that says
whether it is preferred for that call. Only the default order consults it; a backend
asked for by name runs (or raises) whatever it says."""


class CpuPreference:
    """A ``cpu_default`` predicate: preferred for calls whose first tensor argument has a
    dtype listed in ``sizes`` and a number of elements in that dtype's range.

    ``sizes`` maps a dtype to the fewest elements (``int``: no upper bound) or to a
    half-open range ``(least, limit)``: preferred when ``least <= numel < limit``.
    ``CpuPreference({torch.bfloat16: 0, torch.float32: (1 << 19, 1 << 22)})`` prefers the
    implementation for every bfloat16 call and for float32 calls of 2**19 up to (not
    including) 2**22 elements; calls of other dtypes, other sizes or without a tensor
    argument go to the next backend of the order. The cost per call is a dict lookup and
    ``numel()``.
    """

    __slots__ = ("sizes",)

    def __init__(self, sizes: Mapping[torch.dtype, int | tuple[int, int]]):
        ranges: dict[torch.dtype, tuple[int, int | None]] = {}
        for dtype, size in sizes.items():
            if not isinstance(dtype, torch.dtype):
                raise TypeError(f"CpuPreference: the keys of sizes must be torch.dtype, got {dtype!r}")
            least, limit = size if isinstance(size, tuple) and len(size) == 2 else (size, None)
            if not (_is_count(least) and (limit is None or (_is_count(limit) and limit > least))):
                raise ValueError(
                    f"CpuPreference: sizes[{dtype}] must be an int >= 0 (the fewest elements) "
                    f"or a range (least, limit) of ints with 0 <= least < limit, got {size!r}"
                )
            ranges[dtype] = (least, limit)
        self.sizes: dict[torch.dtype, tuple[int, int | None]] = ranges
        """dtype -> (least, limit or None): the element counts for which it is preferred."""

    def __call__(self, *args: Any, **kwargs: Any) -> bool:
        first = _first_tensor(args, kwargs)
        if first is None:
            return False
        size = self.sizes.get(first.dtype)
        if size is None:
            return False
        n = first.numel()
        return n >= size[0] and (size[1] is None or n < size[1])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CpuPreference) and other.sizes == self.sizes

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CpuPreference({self})"

    def __str__(self) -> str:
        def one(dtype: torch.dtype, least: int, limit: int | None) -> str:
            name = str(dtype).replace("torch.", "")
            if limit is None:
                return name + (f" from {least} elements" if least else "")
            return f"{name} of [{least}, {limit}) elements" if least else f"{name} below {limit} elements"

        return ", ".join(one(d, *r) for d, r in self.sizes.items())


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclasses.dataclass
class Impl:
    """One backend's implementation of a dispatch point, with what it supports."""

    backend: str
    fn: Callable[..., Any]
    devices: tuple[str, ...] | None = None
    """Device types the implementation takes; None: whatever the backend runs on."""
    dtypes: tuple[torch.dtype, ...] | None = None
    """Dtypes of the first tensor argument it takes; None: any."""
    why_not: WhyNot | None = None
    """Called with the call's arguments; yields reasons it cannot take them."""
    cpu_default: CpuDefault = False
    """On CPU tensors, take precedence over the reference path (where measured faster):
    always (True), never (False), or for the calls a predicate accepts (:data:`CpuDefault`)."""
    variant: str | None = None
    """For a variant (a faster way of the same backend for some calls): its name."""
    prefer: Callable[..., bool] | None = None
    """For a variant: a predicate of the call; the variant runs only for calls it accepts."""

    @property
    def name(self) -> str:
        return self.backend if self.variant is None else f"{self.backend}:{self.variant}"

    def reasons(self, device_type: str, first: torch.Tensor | None, args, kwargs) -> list[str]:
        out: list[str] = []
        if self.devices is not None and device_type not in self.devices:
            out.append(f"takes {'/'.join(self.devices)} tensors, got {device_type} tensors")
        if self.dtypes is not None and first is not None and first.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"takes {names}, got {str(first.dtype).replace('torch.', '')}")
        if not out and self.why_not is not None:
            out.extend(self.why_not(*args, **kwargs))
        return out


def _first_tensor(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The first tensor argument of a call (inside a call object: its first tensor field)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        # a call object (a NamedTuple); no hasattr on its class: torch 2.11's Dynamo
        # cannot trace that
        if isinstance(a, tuple):
            for v in a:
                if isinstance(v, torch.Tensor):
                    return v
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return a
    return None


_CpuCache = tuple[tuple[str, ...], tuple[Callable[..., bool], ...], tuple[tuple[str, ...], ...]]
"""A point's default CPU order: (every backend that comes first for some call, then
reference; the predicates among the preferences, empty when all are constant; the order
for each bit mask of the predicates that accept a call, bit i for predicate i)."""


class DispatchPoint:
    """A function with one implementation per backend, chosen per call.

    ``op`` is the user-facing op name used by ``use_backend(op=...)`` and
    ``LLMKIT_BACKEND``; ``stage`` tells forward from backward etc. ``call`` is the call
    class (a ``typing.NamedTuple`` of the arguments): implementations, ``why_not`` and CPU
    preferences receive one call object. Calling the point (``point(c)``, or with the
    arguments, ``point(x, ...)``, which builds ``call(x, ...)``) selects and runs.
    """

    def __init__(self, op: str, stage: str, call: type[tuple] | None = None, composite: bool = False):
        self.op = op
        self.stage = stage
        self.call = call
        self.composite = composite
        """A composite point's implementations compose other llmkit ops, which dispatch
        themselves: a backend chosen for every op does not apply to it (only ``use_backend``
        / ``LLMKIT_BACKEND`` for this op by name, and not while ``torch.compile`` traces)."""
        self.impls: dict[str, Impl] = {}
        self.variants: dict[str, list[Impl]] = {}
        """backend -> its variants, tried in order before its implementation (see register)."""
        # Computed from the registrations on first use, reset by register(); one attribute
        # replaced whole, so that a reader never mixes two registrations.
        self._cpu_cache: _CpuCache | None = None
        OPS.setdefault(op, {})[stage] = self

    @property
    def qualname(self) -> str:
        return f"{self.op}.{self.stage}"

    def register(
        self,
        backend: str,
        *,
        devices: Sequence[str] | None = None,
        dtypes: Sequence[torch.dtype] | None = None,
        why_not: WhyNot | None = None,
        cpu_default: CpuDefault = False,
        variant: str | None = None,
        prefer: Callable[..., bool] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``fn`` as ``backend``'s implementation of this point.

        ``cpu_default``: whether the default order on CPU tensors tries this
        implementation before ``reference``: a bool, or a predicate of the call's
        arguments such as :class:`CpuPreference` (see :data:`CpuDefault`).

        ``variant`` (with ``prefer``): registers a faster way of the same backend for the
        calls ``prefer(c)`` accepts and ``why_not(c)`` does not refuse; variants are tried
        in registration order before the backend's implementation, wherever the backend
        is selected (by default or by name), and never count as a fallback.
        """
        check_backend_name(backend)
        if (variant is None) != (prefer is None):
            raise TypeError(f"{self.qualname}: a variant needs both a name and a prefer predicate")
        if not isinstance(cpu_default, bool) and not callable(cpu_default):
            raise TypeError(
                f"{self.qualname}: cpu_default must be a bool or a predicate of the call's "
                f"arguments, got {cpu_default!r}"
            )

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            impl = Impl(
                backend,
                fn,
                tuple(devices) if devices is not None else None,
                tuple(dtypes) if dtypes is not None else None,
                why_not,
                cpu_default,
                variant,
                prefer,
            )
            if variant is None:
                self.impls[backend] = impl
                self._cpu_cache = None
            else:
                variants = self.variants.setdefault(backend, [])
                variants[:] = [v for v in variants if v.variant != variant] + [impl]
            return fn

        return deco

    # -- selection -------------------------------------------------------------------

    def _default_order(
        self, device_type: str, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None
    ) -> tuple[str, ...]:
        """The default order for a call with ``args`` / ``kwargs`` on ``device_type``.

        Without ``args`` (None) on the CPU: every backend that comes before ``reference``
        for *some* call, then ``reference`` (a superset of each call's order, for
        questions asked without a call).
        """
        if device_type == "cuda":
            return BACKEND_NAMES
        cache = self._cpu_cache
        if cache is None:
            cache = self._cache_cpu_order()
        order, preds, orders = cache
        if not preds or args is None:
            return order
        kw = kwargs if kwargs is not None else {}
        accepted, bit = 0, 1
        for pred in preds:
            if pred(*args, **kw):
                accepted |= bit
            bit <<= 1
        return orders[accepted]

    def _cache_cpu_order(self) -> _CpuCache:
        prefs = [
            (name, impl.cpu_default)
            for name, impl in self.impls.items()
            if impl.cpu_default is not False and name != "reference"
        ]
        conditional = [name for name, pref in prefs if pref is not True]
        orders = tuple(
            tuple(name for name, pref in prefs if pref is True or mask >> conditional.index(name) & 1) + ("reference",)
            for mask in range(1 << len(conditional))
        )
        cache = (
            tuple(name for name, _ in prefs) + ("reference",),
            tuple(pref for _, pref in prefs if pref is not True),
            orders,
        )
        self._cpu_cache = cache
        return cache

    def _args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments implementations receive: ``(call object,)`` for a point with a call
        class (built from the arguments unless one was passed), else as given."""
        call = self.call
        if call is None or (len(args) == 1 and not kwargs and type(args[0]) is call):
            return args, kwargs
        return (call(*args, **kwargs),), {}

    def why_not(self, backend: str, *args: Any, **kwargs: Any) -> list[str]:
        """Reasons ``backend`` cannot take this call (empty when it can)."""
        args, kwargs = self._args(args, kwargs)
        check_backend_name(backend)
        first = _first_tensor(args, kwargs)
        device_type = first.device.type if first is not None else "cpu"
        unavailable = BACKENDS[backend].unavailable_reason(device_type)
        if unavailable:
            return [unavailable]
        impl = self.impls.get(backend)
        if impl is None:
            return [f"{backend} has no implementation of {self.qualname}"]
        return impl.reasons(device_type, first, args, kwargs)

    def select(self, *args: Any, **kwargs: Any) -> Impl:
        """The implementation that takes this call; raises BackendError if none does."""
        args, kwargs = self._args(args, kwargs)
        return self._select(args, kwargs)

    def _select(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Impl:
        first = _first_tensor(args, kwargs)
        device_type = first.device.type if first is not None else "cpu"
        # a composite point runs while torch.compile traces (no custom op hides it): there,
        # the default order, without reading the selection's context variable
        req = None if self.composite and torch.compiler.is_compiling() else requested(self.op, self.composite)
        if req is not None:
            order = req.order
        else:
            order = self._default_order(device_type, args, kwargs)
        reasons: dict[str, list[str]] = {}
        for name in order:
            unavailable = BACKENDS[name].unavailable_reason(device_type)
            if unavailable:
                # On the CPU an unbuilt extension is the normal case, not news worth a log.
                if req is not None or device_type == "cuda":
                    reasons[name] = [unavailable]
                continue
            impl = self.impls.get(name)
            if impl is None:
                reasons[name] = [f"no {name} implementation of {self.qualname}"]
                continue
            for v in self.variants.get(name, ()):
                if v.prefer(*args, **kwargs) and not v.reasons(device_type, first, args, kwargs):  # type: ignore[misc]
                    return v
            r = impl.reasons(device_type, first, args, kwargs)
            if r:
                reasons[name] = r
                continue
            if reasons and req is None:
                detail = "; ".join(f"{b}: {', '.join(rs)}" for b, rs in reasons.items())
                _log_once((self.qualname, name, detail), f"llmkit {self.qualname}: using the {name} backend ({detail})")
            return impl
        detail = "\n".join(f"  {b}: {'; '.join(rs)}" for b, rs in reasons.items())
        if req is not None:
            head = (
                f"llmkit {self.qualname}: the backend{'s' if len(order) > 1 else ''} "
                f"asked for ({', '.join(order)}, from {req.source}) cannot take this call"
            )
        else:
            head = f"llmkit {self.qualname}: no backend can take this call"
        raise BackendError(f"{head}:\n{detail}", reasons)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._args(args, kwargs)
        return self._select(args, kwargs).fn(*args, **kwargs)

    def call_backend(self, backend: str, *args: Any, **kwargs: Any) -> Any:
        """Run one named backend's implementation, raising its reasons if it cannot."""
        args, kwargs = self._args(args, kwargs)
        r = self.why_not(backend, *args, **kwargs)
        if r:
            raise BackendError(
                f"llmkit {self.qualname}: backend {backend} cannot take this call: " + "; ".join(r), {backend: r}
            )
        first = _first_tensor(args, kwargs)
        device_type = first.device.type if first is not None else "cpu"
        for v in self.variants.get(backend, ()):
            if v.prefer(*args, **kwargs) and not v.reasons(device_type, first, args, kwargs):  # type: ignore[misc]
                return v.fn(*args, **kwargs)
        return self.impls[backend].fn(*args, **kwargs)


@dataclasses.dataclass
class BackendInfo:
    """What ``llmkit.backend_info()`` reports for one backend."""

    name: str
    description: str
    available: dict[str, str | None]
    """device type -> None when usable there, else the reason it is not."""
    details: dict[str, str]
    ops: dict[str, list[str]]
    """op name -> the stages this backend implements."""


def backend_info() -> list[BackendInfo]:
    """Which backends can run on this machine, on which devices, and why not."""
    from .. import ops as _ops  # noqa: F401  (fills OPS)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for name in BACKEND_NAMES:
        b = BACKENDS[name]
        avail = {d: b.unavailable_reason(d) for d in devices}
        if "cuda" not in devices:
            avail["cuda"] = "no CUDA GPU is available"
        covered: dict[str, list[str]] = {}
        for op, stages in sorted(OPS.items()):
            have = [s for s, p in stages.items() if name in p.impls]
            if have:
                covered[op] = have
        try:
            det = b.details()
        except Exception as exc:  # details are informative only
            det = {"error": repr(exc)}
        out.append(BackendInfo(name, b.description, avail, det, covered))
    return out
