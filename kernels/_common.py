"""Helpers shared by the Triton kernel modules.

Importing this module (every kernel module does) makes Triton's interpreter usable with
the installed numpy where it needs a fix (see :func:`llmkit._compat.fix_triton_interpreter`).
"""

from __future__ import annotations

from .._compat import fix_triton_interpreter, triton_interpreting

INTERPRETING = triton_interpreting()
"""True under ``TRITON_INTERPRET=1``: kernels run in Triton's interpreter on CPU tensors."""

if INTERPRETING:
    fix_triton_interpreter()
