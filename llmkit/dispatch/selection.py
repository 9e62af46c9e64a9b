"""Which backends a call may use: ``use_backend`` and the ``LLMKIT_BACKEND`` variable.

Selection, per call, in order of precedence: per-op overrides of the innermost
``use_backend`` block, its choice for every op, ``LLMKIT_BACKEND`` (``triton``,
``triton,reference``, or per op: ``layer_norm=reference;attention=triton``), else the
default order of the dispatch point (:mod:`.point`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType

from ..errors import UnknownBackendError
from .backends import BACKEND_NAMES, OPS, check_backend_name


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


# The selection is a mapping: "*" for every op, else op name -> Request. Read-only: use_backend
# sets a new one, so the default shared by every context can never be changed in place.
_selection: contextvars.ContextVar[Mapping[str, Request]] = contextvars.ContextVar(
    "llmkit_backend_selection", default=MappingProxyType({})
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
def use_backend(backend: str | Sequence[str] | None = None, /, **per_op: str | Sequence[str]) -> Iterator[None]:
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
            raise UnknownBackendError(f"use_backend: unknown op {op!r}; ops are {', '.join(sorted(OPS))}")
        current[op] = _as_request(names, f"use_backend({op}=...)")
    token = _selection.set(current)
    try:
        yield
    finally:
        _selection.reset(token)


def requested(op: str, per_op_only: bool = False) -> Request | None:
    """The explicit backend request in force for ``op`` (None means default order);
    ``per_op_only``: ignore choices made for every op (a composite point's)."""
    sel = _selection.get()
    req = sel.get(op) or (None if per_op_only else sel.get("*"))
    if req is not None:
        return req
    env = _env_selection()
    return env.get(op) or (None if per_op_only else env.get("*"))
