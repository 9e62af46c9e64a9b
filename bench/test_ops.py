"""CPU benchmarks of the ops: fused add+LayerNorm and bias+GELU against the unfused eager
sequence (the CPU targets of docs/benchmarks.md), norms, GELU, attention, decode attention, int8 quantization.

Each test checks one implementation's output against PyTorch eager, then times it;
pytest-benchmark groups the implementations of one case together.
"""

from __future__ import annotations

import pytest

from _harness import params, run_benchmark

SUITES = ("add_layer_norm", "bias_gelu", "layer_norm", "rms_norm", "gelu", "attention", "decode_attention",
          "quantize_int8")


@pytest.mark.parametrize("suite,point,pass_,impl", params(*SUITES))
def test_op(benchmark, suite, point, pass_, impl):
    run_benchmark(benchmark, suite, point, pass_, impl)
