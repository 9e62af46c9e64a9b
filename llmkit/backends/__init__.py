"""Implementations of llmkit's dispatch points, one folder per backend, one file per op:

* ``reference/``: pure PyTorch (ATen), float32 math for 16-bit inputs; every dispatch point
  has one, on every device;
* ``triton/``: llmkit's Triton kernels (``kernels/<op>.py``, imported on first use);
* ``cuda_ext/``: the C++/CUDA extension (``csrc/``): CUDA kernels, and C++ CPU kernels
  preferred to the reference where they measured faster.

Importing this package registers them all (``llmkit.ops`` does, once the ops are defined).
"""

from __future__ import annotations

from . import cuda_ext, reference, triton  # noqa: F401
