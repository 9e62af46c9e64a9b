"""CPU benchmarks of int8 linears against float32 ``F.linear`` (the CPU targets of docs/benchmarks.md).

W8A8 at M=512, K=N=4096 (target: Int8Linear >= 3x float32 nn.Linear) and W8A16 at
M=1..16 (target: no slower than float32), next to llmkit's op on each backend and the
plain PyTorch int8 paths (``torch._int_mm`` + separate dequant; dequant + ``F.linear``).
"""

from __future__ import annotations

import pytest

from _harness import params, run_benchmark


@pytest.mark.parametrize("suite,point,pass_,impl", params("int8_w8a8", "int8_w8a16"))
def test_int8_linear(benchmark, suite, point, pass_, impl):
    run_benchmark(benchmark, suite, point, pass_, impl)
