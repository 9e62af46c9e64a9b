"""llmkit: fused GPU kernels for PyTorch Transformers.

Public API: :mod:`llmkit.ops` (functional ops), :func:`use_backend`,
:func:`backend_info`; the CLI is ``llmkit`` (``info``, ``check``).
"""

from ._version import __version__
from .dispatch import backend_info, use_backend
from .errors import BackendError, LLMKitError, UnknownBackendError
from . import ops

__all__ = [
    "__version__",
    "ops",
    "use_backend",
    "backend_info",
    "BackendError",
    "LLMKitError",
    "UnknownBackendError",
]
