"""Backend registry and per-call dispatch.

Every llmkit op has one or more *dispatch points* (``layer_norm.forward``,
``layer_norm.backward``, ...), each with a call class: its arguments, named. Each backend
(``triton``, ``cuda_ext``, ``reference``) registers an implementation of a dispatch point
(``llmkit/backends/<backend>/<op>.py``) together with what it supports: the devices and
dtypes it takes and a ``why_not(c)`` function that returns readable reasons when it cannot
take a particular call ``c``.

Modules: :mod:`.backends` (the backends, whether each can run here, the op registry),
:mod:`.selection` (``use_backend``, ``LLMKIT_BACKEND``), :mod:`.point` (dispatch points).

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

from .._compat import triton_interpreting
from .backends import BACKEND_NAMES, BACKENDS, OPS, Backend, _logged, check_backend_name
from .point import BackendInfo, CpuDefault, CpuPreference, DispatchPoint, Impl, WhyNot, backend_info
from .selection import Request, env_selection_summary, requested, use_backend

__all__ = [
    "BACKEND_NAMES",
    "BACKENDS",
    "OPS",
    "Backend",
    "BackendInfo",
    "CpuDefault",
    "CpuPreference",
    "DispatchPoint",
    "Impl",
    "Request",
    "WhyNot",
    "backend_info",
    "check_backend_name",
    "env_selection_summary",
    "requested",
    "triton_interpreting",
    "use_backend",
    "_logged",
]
