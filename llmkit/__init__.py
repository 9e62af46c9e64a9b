"""llmkit: fused GPU kernels for PyTorch Transformers.

Public API: :mod:`llmkit.ops` (functional ops), :func:`use_backend`,
:func:`backend_info`; the CLI is ``llmkit`` (``info``, ``check``).
"""

from ._version import __version__
from .dispatch import backend_info, use_backend
from .errors import BackendError, LLMKitError, UnknownBackendError
from . import ops
from . import nn, models
from .swap import swap, unswap
from .quantize import quantize, calibrate
from .integrations import hf as _hf
from . import distributed as _distributed

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
