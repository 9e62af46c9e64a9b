"""Run a function right after a module is imported, without importing it.

``import llmkit`` must stay fast, yet some registrations belong in modules that cost
seconds to import and that llmkit only needs when the user imports them: transformers'
attention registry (:mod:`llmkit.integrations.hf`), DTensor's sharding strategies
(:mod:`llmkit.distributed`). :func:`after_import` runs a callback at once when the module
is already imported, otherwise from a small ``sys.meta_path`` finder that wraps the
module's loader and calls the callback right after the module has executed. The finder
imports nothing itself, finds nothing itself, and leaves ``sys.meta_path`` when no
callback is pending.

A callback that raises is logged and never breaks the user's import.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["after_import"]

logger = logging.getLogger("llmkit")

_lock = threading.RLock()
_pending: dict[str, list[Callable[[], None]]] = {}


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once module ``name`` is imported: now if it already is, else
    right after its first import has executed (in the importing thread)."""
    with _lock:
        if name not in sys.modules:
            _pending.setdefault(name, []).append(callback)
            _install()
            return
    _run(name, [callback])


def _run(name: str, callbacks: list[Callable[[], None]]) -> None:
    for fn in callbacks:
        try:
            fn()
        except Exception as exc:  # an incompatible version of the module: say so, do not fail its import
            logger.warning("llmkit: a registration after importing %s failed: %r", name, exc)


def _on_loaded(name: str) -> None:
    with _lock:
        callbacks = _pending.pop(name, [])
        if not _pending:
            _remove()
    _run(name, callbacks)


class _LoaderWithCallback(importlib.abc.Loader):
    """Wraps a module's loader; after the module executed, runs the pending callbacks."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):  # noqa: D401 - Loader protocol
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader  # hand introspection the real loader back
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        _on_loaded(self._name)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._loader, item)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loaders of the watched modules."""

    def find_spec(self, fullname: str, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderWithCallback(spec.loader, fullname)
        return spec


_finder: _PostImportFinder | None = None


def _install() -> None:
    global _finder
    if _finder is None:
        _finder = _PostImportFinder()
        sys.meta_path.insert(0, _finder)


def _remove() -> None:
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None
