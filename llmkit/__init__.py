"""llmkit: fused GPU kernels for PyTorch Transformers.

Public API: :mod:`llmkit.ops` (functional ops), :func:`use_backend`,
:func:`backend_info`; the CLI is ``llmkit`` (``info``, ``check``).
"""

from . import distributed as _distributed
from . import models, nn, ops
from ._version import __version__
from .dispatch import backend_info, use_backend
from .errors import BackendError, LLMKitError, UnknownBackendError
from .integrations import hf as _hf
from .quantize import calibrate, quantize
from .swap import swap, unswap

# Registers attn_implementation="llmkit" with transformers when transformers loads
# (at once if it already has); never imports transformers itself. See llmkit.integrations.hf.
_hf.install()
# Registers the ops' DTensor sharding strategies when torch.distributed.tensor loads (at once
# if it already has); never imports it itself. See llmkit.distributed.
_distributed.install()

__all__ = [
    "__version__",
    "ops",
    "nn",
    "models",
    "swap",
    "unswap",
    "quantize",
    "calibrate",
    "use_backend",
    "backend_info",
    "BackendError",
    "LLMKitError",
    "UnknownBackendError",
]
