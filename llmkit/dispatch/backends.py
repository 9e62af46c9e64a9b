"""The backends llmkit knows, whether each can run here, and the registry of ops.

``BACKENDS`` maps a name (``triton``, ``cuda_ext``, ``reference``) to its :class:`Backend`:
a probe that says, per device type, why the backend cannot run (None when it can) and
details for ``llmkit info``. ``OPS`` maps every op name to its dispatch points by stage
(filled as ``llmkit.ops`` imports).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .._compat import triton_interpreter_note, triton_interpreting
from ..errors import UnknownBackendError

if TYPE_CHECKING:
    from .point import DispatchPoint

logger = logging.getLogger("llmkit")

BACKEND_NAMES: tuple[str, ...] = ("triton", "cuda_ext", "reference")
"""Every backend llmkit knows, in the default order on CUDA."""

OPS: dict[str, dict[str, DispatchPoint]] = {}
"""Every op name -> its dispatch points by stage. Filled as ``llmkit.ops`` imports."""


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
        from .. import _ext

        return _ext.unavailable_reason(device_type)
    except ImportError:
        return "the C++/CUDA extension is not part of this installation"
    except Exception as exc:  # noqa: BLE001 - a broken optional backend must not break llmkit
        reason = f"the C++/CUDA extension failed: {type(exc).__name__}: {exc}"
        _log_once(("cuda_ext probe", reason), f"llmkit: {reason}")
        return reason


def _cuda_ext_details() -> dict[str, str]:
    try:
        from .. import _ext
    except ImportError:
        return {}
    return _ext.details()


BACKENDS: dict[str, Backend] = {
    "triton": Backend(
        "triton", "Triton kernels (kernels/*.py; llmkit/backends/triton/)", _probe_triton, _triton_details
    ),
    "cuda_ext": Backend(
        "cuda_ext", "C++/CUDA extension (csrc/; llmkit/backends/cuda_ext/)", _probe_cuda_ext, _cuda_ext_details
    ),
    "reference": Backend("reference", "pure PyTorch reference paths (llmkit/backends/reference/)", _probe_reference),
}


def check_backend_name(name: str, source: str | None = None) -> str:
    """Return ``name`` if it is a known backend, else raise :class:`UnknownBackendError`
    (its message starts with ``source``, where the name came from, when given)."""
    if name not in BACKENDS:
        raise UnknownBackendError(
            f"{source + ': ' if source else ''}unknown backend {name!r}: llmkit knows {', '.join(BACKEND_NAMES)}"
        )
    return name


_logged: set[tuple[Any, ...]] = set()


def _log_once(key: tuple[Any, ...], msg: str) -> None:
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.warning(msg)
