"""llmkit's ops inside ``torch.distributed``: DTensor sharding strategies and parallel styles.

Every ``llmkit::*`` custom op (forward and backward) has a DTensor sharding strategy
(:mod:`llmkit.distributed._strategies` lists the rules), so llmkit's ops, ``llmkit.nn``
modules and swapped HuggingFace models run on DTensors: under tensor parallelism and
sequence parallelism (``torch.distributed.tensor.parallel.parallelize_module`` with
``ColwiseParallel`` / ``RowwiseParallel`` / ``SequenceParallel``), under FSDP2
(``fully_shard``) and under ``torch.compile``. A placement an op cannot take is
redistributed by DTensor to one it can (at worst, replicated), never computed wrong.

The strategies are registered by ``import llmkit`` as soon as ``torch.distributed.tensor``
is imported (before or after llmkit; importing it costs about a second, so llmkit never
imports it itself). :func:`register` does it explicitly and says why when this torch
cannot take them.

:class:`Int8ColwiseParallel` and :class:`Int8RowwiseParallel` are ``ColwiseParallel`` /
``RowwiseParallel`` for :class:`llmkit.nn.Int8Linear` (torch's styles accept only
``nn.Linear`` and ``nn.Embedding``).
"""

from __future__ import annotations

import logging
import threading

from .. import _compat
from .._import_hook import after_import

__all__ = ["register", "is_registered", "install", "Int8ColwiseParallel", "Int8RowwiseParallel"]

logger = logging.getLogger("llmkit")

DTENSOR_MODULE = "torch.distributed.tensor"

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register the DTensor sharding strategy of every ``llmkit::*`` op (idempotent).

    Imports ``torch.distributed.tensor``. Raises RuntimeError, saying why, when this torch
    has no DTensor op-strategy registry llmkit can use.
    """
    global _registered
    with _lock:
        if _registered:
            return
        why = _compat.dtensor_strategy_api()
        if why is not None:
            raise RuntimeError(f"llmkit.distributed: cannot register DTensor sharding strategies: {why}")
        import torch

        from .. import ops  # noqa: F401  (defines the custom ops)
        from ._strategies import rules

        for name, (placements, is_valid) in rules().items():
            op = getattr(torch.ops.llmkit, name).default
            _compat.register_dtensor_strategy(op, placements, is_valid)
        _registered = True


def is_registered() -> bool:
    """Whether the sharding strategies are registered in this process."""
    return _registered


def _register_quietly() -> None:
    try:
        register()
    except RuntimeError as exc:
        logger.warning("%s; llmkit ops on DTensors will raise DTensor's own error", exc)


def install() -> None:
    """Register the strategies once ``torch.distributed.tensor`` is imported (now if it is)."""
    after_import(DTENSOR_MODULE, _register_quietly)


def __getattr__(name: str):
    # the parallel styles import torch.distributed.tensor.parallel: only when asked for
    if name in ("Int8ColwiseParallel", "Int8RowwiseParallel"):
        from . import _styles

        return getattr(_styles, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
