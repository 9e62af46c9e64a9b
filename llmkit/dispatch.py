"""Backend registry and per-call dispatch.

Every llmkit op has one or more *dispatch points* (``layer_norm.forward``,
``layer_norm.backward``, ...). Each backend (``triton``, ``cuda_ext``,
``reference``) registers an implementation of a dispatch point together with what it
supports: the devices and dtypes it takes and a ``why_not(*args)`` function that
returns readable reasons when it cannot take a particular call.

Selection, per call, in order of precedence:

1. ``llmkit.use_backend(..., op=...)`` per-op overrides of the innermost context,
2. ``llmkit.use_backend(name)`` for all ops,
3. the environment variable ``LLMKIT_BACKEND`` (``triton``, ``triton,reference``,
   or per op: ``layer_norm=reference;attention=triton``),
4. the default order for the device of the inputs: on CUDA ``triton -> cuda_ext ->
   reference``; on the CPU the implementations registered as preferred there
   (``cpu_default``: always, or for the calls a predicate such as
   :class:`CpuPreference` accepts, e.g. some dtypes from some size on) where their
   backend is available, then ``reference``.

A single backend asked for by name never falls back: if it cannot take the call,
:class:`~llmkit.errors.BackendError` is raised with its reasons. A list of names
(``use_backend(["triton", "reference"])``) is an explicit order in which fallback is
allowed. When the default order falls back, the reason is logged once.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ._compat import triton_interpreter_note, triton_interpreting
from .errors import BackendError, UnknownBackendError

logger = logging.getLogger("llmkit")

BACKEND_NAMES: tuple[str, ...] = ("triton", "cuda_ext", "reference")
"""Every backend llmkit knows, in the default order on CUDA."""


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Backend:
    """A backend: a name and a way to tell whether it can run on a device type."""

    name: str
    description: str
    probe: Callable[[str], str | None]
    """``probe(device_type)`` returns None when usable on that device type, else why not."""
    details: Callable[[], dict[str, str]] = dataclasses.field(default=lambda: {})

    def unavailable_reason(self, device_type: str) -> str | None:
        """None when this backend can run on ``device_type`` ('cpu', 'cuda', ...), else why not."""
        return self.probe(device_type)


_lock = threading.Lock()
_triton_probe_cache: dict[str, str | None] = {}


def _triton_import_error() -> str | None:
    if "import" not in _triton_probe_cache:
        if importlib.util.find_spec("triton") is None:
            _triton_probe_cache["import"] = "Triton is not installed (pip install triton)"
        else:
            try:
                import triton  # noqa: F401
            except Exception as exc:  # pragma: no cover - depends on the wheel
                _triton_probe_cache["import"] = f"Triton failed to import: {exc!r}"
            else:
                _triton_probe_cache["import"] = None
    return _triton_probe_cache["import"]


def _probe_triton(device_type: str) -> str | None:
    # The answer depends only on the device type and TRITON_INTERPRET (GPUs do not come
    # and go within a process), so it is computed once per pair: this runs on every call.
    key = f"{device_type}|{triton_interpreting()}"
    if key not in _triton_probe_cache:
        _triton_probe_cache[key] = _probe_triton_uncached(device_type)
    return _triton_probe_cache[key]


def _probe_triton_uncached(device_type: str) -> str | None:
    err = _triton_import_error()
    if err:
        return err
    if device_type == "cpu":
        if triton_interpreting():
            return None
        return (
            "Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 "
            "before llmkit imports its kernels"
        )
    if device_type == "cuda":
        if triton_interpreting():
            return "TRITON_INTERPRET=1 is set: Triton kernels run on CPU tensors only"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        if torch.version.hip is not None:
            return "llmkit's Triton kernels are tuned for NVIDIA GPUs; ROCm is not supported"
        major, _minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"llmkit's Triton kernels need compute capability >= 8.0 (got {major}.{_minor})"
        return None
    return f"Triton backend does not run on device type {device_type!r}"


def _triton_details() -> dict[str, str]:
    if _triton_import_error():
        return {}
    import triton

    out = {"version": triton.__version__}
    if triton_interpreting():
        out["mode"] = "interpreter (TRITON_INTERPRET=1)"
        out["interpreter"] = triton_interpreter_note()
    return out


def _probe_reference(device_type: str) -> str | None:
    return None


def _probe_cuda_ext(device_type: str) -> str | None:
    # The extension module (llmkit/_ext.py) owns building and loading; it answers for
    # itself. Until it is importable the backend is simply not built. Whatever goes
    # wrong in there is a reason the backend is unavailable, never an error of the call:
    # the default order goes on to the next backend, a request by name raises it.
    try:
        from . import _ext

        return _ext.unavailable_reason(device_type)
    except ImportError:
        return "the C++/CUDA extension is not part of this installation"
    except Exception as exc:  # noqa: BLE001 - a broken optional backend must not break llmkit
        reason = f"the C++/CUDA extension failed: {type(exc).__name__}: {exc}"
        _log_once(("cuda_ext probe", reason), f"llmkit: {reason}")
        return reason


def _cuda_ext_details() -> dict[str, str]:
    try:
        from . import _ext
    except ImportError:
        return {}
    return _ext.details()


BACKENDS: dict[str, Backend] = {
    "triton": Backend(
        "triton", "Triton kernels (kernels/*.py)", _probe_triton, _triton_details
    ),
    "cuda_ext": Backend(
        "cuda_ext", "C++/CUDA extension (csrc/)", _probe_cuda_ext, _cuda_ext_details
    ),
    "reference": Backend(
        "reference", "pure PyTorch reference paths (llmkit/ops/*.py)", _probe_reference
    ),
}


def check_backend_name(name: str, source: str | None = None) -> str:
    """Return ``name`` if it is a known backend, else raise :class:`UnknownBackendError`
    (its message starts with ``source``, where the name came from, when given)."""
    if name not in BACKENDS:
        raise UnknownBackendError(
            f"{source + ': ' if source else ''}unknown backend {name!r}: llmkit knows "
            f"{', '.join(BACKEND_NAMES)}"
        )
    return name


# --------------------------------------------------------------------------------------
# Selection state: use_backend / LLMKIT_BACKEND
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """Backends asked for: an order, and whether falling back past it is allowed."""

    order: tuple[str, ...]
    """Backends to try, in order; nothing outside this list runs."""
    source: str
    """Where the request came from, for error messages."""


def _as_request(value: str | Sequence[str], source: str) -> Request:
    if isinstance(value, str):
        names = tuple(v.strip() for v in value.split(",") if v.strip())
    elif isinstance(value, (list, tuple)):
        names = tuple(value)
    else:
        raise TypeError(
            f"{source}: a backend must be given as a name ({', '.join(map(repr, BACKEND_NAMES))}), "
            f"a comma-separated string of names or a list of names, got {value!r} "
            f"({type(value).__name__})"
        )
    if not names:
        raise UnknownBackendError(f"{source}: empty backend list")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"{source}: backend names must be strings, got {n!r} ({type(n).__name__})")
        check_backend_name(n, source)
    return Request(names, source)


# The selection is a mapping: "*" for every op, else op name -> Request.
_selection: contextvars.ContextVar[dict[str, Request]] = contextvars.ContextVar(
    "llmkit_backend_selection", default={}
)

_env_cache: dict[str, dict[str, Request]] = {}


def _env_selection() -> dict[str, Request]:
    raw = os.environ.get("LLMKIT_BACKEND", "").strip()
    if not raw:
        return {}
    cached = _env_cache.get(raw)
    if cached is not None:
        return cached
    sel: dict[str, Request] = {}
    for part in raw.split(";"):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            op, _, names = part.partition("=")
            op = op.strip()
            if op not in OPS:
                raise UnknownBackendError(
                    f"LLMKIT_BACKEND={raw!r}: unknown op {op!r}; ops are {', '.join(sorted(OPS))}"
                )
            sel[op] = _as_request(names, f"LLMKIT_BACKEND={raw!r} ({op})")
        else:
            sel["*"] = _as_request(part, f"LLMKIT_BACKEND={raw!r}")
    _env_cache[raw] = sel
    return sel


def env_selection_summary() -> str | None:
    """What ``LLMKIT_BACKEND`` asks for, in one line for ``llmkit info`` (None when unset);
    an invalid value gives the error every op call would raise."""
    raw = os.environ.get("LLMKIT_BACKEND", "").strip()
    if not raw:
        return None
    try:
        sel = _env_selection()
    except (UnknownBackendError, TypeError) as exc:
        return f"LLMKIT_BACKEND={raw!r} is invalid, every llmkit op call raises: {exc}"
    parts = [f"{'every op' if op == '*' else op}: {', '.join(r.order)}" for op, r in sel.items()]
    return f"LLMKIT_BACKEND={raw!r} ({'; '.join(parts)})"


@contextlib.contextmanager
def use_backend(
    backend: str | Sequence[str] | None = None, /, **per_op: str | Sequence[str]
) -> Iterator[None]:
    """Select backends for the calls made inside the ``with`` block.

    Args:
        backend: a backend name (``"triton"``, ``"cuda_ext"``, ``"reference"``), a
            comma-separated string or a list of names giving an order. Applies to
            every op. A single name is strict: a call that backend cannot take raises
            :class:`~llmkit.errors.BackendError` instead of falling back.
        **per_op: overrides for single ops, e.g. ``attention="reference"``; op names
            are those of ``llmkit.dispatch.OPS``.

    The selection lives in a :class:`contextvars.ContextVar`, so it is local to the
    thread or asyncio task that entered the block. Blocks nest; the inner one wins.
    """
    current = dict(_selection.get())
    if backend is not None:
        current["*"] = _as_request(backend, "use_backend")
        # A new global choice replaces outer per-op choices only where the caller
        # also names the op again; outer per-op overrides stay in force.
    for op, names in per_op.items():
        if op not in OPS:
            raise UnknownBackendError(
                f"use_backend: unknown op {op!r}; ops are {', '.join(sorted(OPS))}"
            )
        current[op] = _as_request(names, f"use_backend({op}=...)")
    token = _selection.set(current)
    try:
        yield
    finally:
        _selection.reset(token)


def requested(op: str) -> Request | None:
    """The explicit backend request in force for ``op`` (None means default order)."""
    sel = _selection.get()
    req = sel.get(op) or sel.get("*")
    if req is not None:
        return req
    env = _env_selection()
    return env.get(op) or env.get("*")


# --------------------------------------------------------------------------------------
# Dispatch points
# --------------------------------------------------------------------------------------


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
        first = args[0] if args and type(args[0]) is torch.Tensor else _first_tensor(args, kwargs)
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

    def reasons(self, device_type: str, first: torch.Tensor | None, args, kwargs) -> list[str]:
        out: list[str] = []
        if self.devices is not None and device_type not in self.devices:
            out.append(
                f"takes {'/'.join(self.devices)} tensors, got {device_type} tensors"
            )
        if self.dtypes is not None and first is not None and first.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"takes {names}, got {str(first.dtype).replace('torch.', '')}")
        if not out and self.why_not is not None:
            out.extend(self.why_not(*args, **kwargs))
        return out


def _first_tensor(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return a
    return None


_logged: set[tuple[Any, ...]] = set()


def _log_once(key: tuple[Any, ...], msg: str) -> None:
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.warning(msg)


_CpuCache = tuple[tuple[str, ...], tuple[Callable[..., bool], ...], tuple[tuple[str, ...], ...]]
"""A point's default CPU order: (every backend that comes first for some call, then
reference; the predicates among the preferences, empty when all are constant; the order
for each bit mask of the predicates that accept a call, bit i for predicate i)."""


class DispatchPoint:
    """A function with one implementation per backend, chosen per call.

    ``op`` is the user-facing op name used by ``use_backend(op=...)`` and
    ``LLMKIT_BACKEND``; ``stage`` tells forward from backward etc.
    """

    def __init__(self, op: str, stage: str, doc: str = ""):
        self.op = op
        self.stage = stage
        self.doc = doc
        self.impls: dict[str, Impl] = {}
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
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``fn`` as ``backend``'s implementation of this point.

        ``cpu_default``: whether the default order on CPU tensors tries this
        implementation before ``reference``: a bool, or a predicate of the call's
        arguments such as :class:`CpuPreference` (see :data:`CpuDefault`).
        """
        check_backend_name(backend)
        if not isinstance(cpu_default, bool) and not callable(cpu_default):
            raise TypeError(
                f"{self.qualname}: cpu_default must be a bool or a predicate of the call's "
                f"arguments, got {cpu_default!r}"
            )

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.impls[backend] = Impl(
                backend,
                fn,
                tuple(devices) if devices is not None else None,
                tuple(dtypes) if dtypes is not None else None,
                why_not,
                cpu_default,
            )
            self._cpu_cache = None
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
            tuple(name for name, pref in prefs if pref is True or mask >> conditional.index(name) & 1)
            + ("reference",)
            for mask in range(1 << len(conditional))
        )
        cache = (
            tuple(name for name, _ in prefs) + ("reference",),
            tuple(pref for _, pref in prefs if pref is not True),
            orders,
        )
        self._cpu_cache = cache
        return cache

    def why_not(self, backend: str, *args: Any, **kwargs: Any) -> list[str]:
        """Reasons ``backend`` cannot take this call (empty when it can)."""
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
        first = _first_tensor(args, kwargs)
        device_type = first.device.type if first is not None else "cpu"
        req = requested(self.op)
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
            r = impl.reasons(device_type, first, args, kwargs)
            if r:
                reasons[name] = r
                continue
            if reasons and req is None:
                detail = "; ".join(f"{b}: {', '.join(rs)}" for b, rs in reasons.items())
                _log_once(
                    (self.qualname, name, detail),
                    f"llmkit {self.qualname}: using the {name} backend ({detail})",
                )
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
        return self.select(*args, **kwargs).fn(*args, **kwargs)

    def call_backend(self, backend: str, *args: Any, **kwargs: Any) -> Any:
        """Run one named backend's implementation, raising its reasons if it cannot."""
        r = self.why_not(backend, *args, **kwargs)
        if r:
            raise BackendError(
                f"llmkit {self.qualname}: backend {backend} cannot take this call: "
                + "; ".join(r),
                {backend: r},
            )
        return self.impls[backend].fn(*args, **kwargs)


OPS: dict[str, dict[str, DispatchPoint]] = {}
"""Every op name -> its dispatch points by stage. Filled as ``llmkit.ops`` imports."""


# --------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------


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
    from . import ops as _ops  # noqa: F401  (fills OPS)

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
