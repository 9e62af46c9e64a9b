"""CPU benchmarks of whole models with random weights (the CPU targets of docs/benchmarks.md).

BERT-base shape at batch 16, length 128: HuggingFace as shipped vs ``llmkit.swap`` vs
``llmkit.quantize`` (target: swapped >= 1.0x). GPT-2-small shape: greedy decode tokens/s
of ``llmkit.models.GPT`` (same weights via ``from_hf``) vs HuggingFace ``generate``
(target >= 1.0x), and a prompt forward.
"""

from __future__ import annotations

import pytest

from _harness import params, run_benchmark


@pytest.mark.parametrize("suite,point,pass_,impl", params("bert", "gpt2_prefill", "gpt2_decode", "llama_prefill"))
def test_model(benchmark, suite, point, pass_, impl):
    run_benchmark(benchmark, suite, point, pass_, impl)
