"""Triton kernels, one file per op; installed as ``llmkit.kernels``.

Kernels know tensors, strides and launch grids, nothing about modules or dispatch.
Each kernel module also lists the configurations it launches with in
``compile_specs()``, so ``llmkit check --compile`` / ``python -m llmkit.compile_report``
can compile every kernel for sm_80 and sm_90 without a GPU and report registers,
spills, shared memory and matrix instructions.

Importing a kernel module imports Triton; llmkit only does that lazily, when the
``triton`` backend is used.
"""
