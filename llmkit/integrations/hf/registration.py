"""Registering the ``"llmkit"`` attention (and its mask function) with transformers.

The attention is registered under :data:`~.attention.NAME` together with a mask function (the
boolean masks of transformers' ``sdpa``; without one, transformers would build no mask at all
for an unknown implementation and ignore padding). After that,
``AutoModel.from_pretrained(..., attn_implementation="llmkit")`` and
``model.set_attn_implementation("llmkit")`` work.

``import llmkit`` must not import transformers (that costs seconds), and registration must
work whichever of the two is imported first. So :func:`install` (called by ``import llmkit``)
registers the attention in ``transformers.modeling_utils`` and the mask in
``transformers.masking_utils``, each as soon as that module exists: at once when it is already
imported, otherwise right after the module has executed
(:func:`llmkit._import_hook.after_import`: a ``sys.meta_path`` finder that imports nothing and
removes itself when nothing is pending). :func:`ensure_registered`, called by ``llmkit.swap``
and ``from_hf``, imports the two modules and registers; it is idempotent.

Set ``LLMKIT_NO_HF_HOOK=1`` to skip the import hook (``ensure_registered`` still works).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable

from ..._import_hook import after_import
from .attention import NAME, attention_function

__all__ = ["install", "ensure_registered", "is_registered", "MODELING"]

logger = logging.getLogger("llmkit")

MODELING = "transformers.modeling_utils"
_MASKING = "transformers.masking_utils"
_registered: set[str] = set()
_lock = threading.RLock()


def _register_attention() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, attention_function)
    _registered.add(MODELING)


def _register_mask() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered.add(_MASKING)


_REGISTER: dict[str, Callable[[], None]] = {MODELING: _register_attention, _MASKING: _register_mask}


def _on_loaded(name: str) -> None:
    """Run after ``name`` executed: register (idempotent; never breaks the user's import)."""
    with _lock:
        if name in _registered:
            return
        try:
            _REGISTER[name]()
        except Exception as exc:  # an incompatible transformers: say so, do not fail its import
            logger.warning(
                "llmkit could not register its attention with %s (%r); "
                "attn_implementation='llmkit' will not be available",
                name,
                exc,
            )


def is_registered() -> bool:
    """True once both the attention and its mask function are registered."""
    return _registered >= set(_REGISTER)


def ensure_registered() -> None:
    """Import transformers' modeling and masking utilities and register ``"llmkit"``.

    Raises ImportError with a clear message when transformers is not installed.
    """
    try:
        import transformers.masking_utils  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"this needs HuggingFace transformers (pip install transformers): {exc}") from exc
    with _lock:
        for name, fn in _REGISTER.items():
            if name not in _registered:
                fn()


def install() -> None:
    """Register now what transformers has loaded; hook the rest (imports nothing)."""
    if os.environ.get("LLMKIT_NO_HF_HOOK", "0") == "1":
        return
    for name in _REGISTER:
        if name not in _registered:
            after_import(name, functools.partial(_on_loaded, name))
