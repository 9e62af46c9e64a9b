"""The benchmark harness behind ``llmkit bench`` and the pytest-benchmark suites in bench/.

Modules: :mod:`~llmkit.bench.formulas` (FLOP and byte counts per op),
:mod:`~llmkit.bench.shapes` (the versioned ``bench/shapes.json``),
:mod:`~llmkit.bench.suite` and ``suites_*`` (what each suite times),
:mod:`~llmkit.bench.timing` (CPU: interleaved ``torch.utils.benchmark``; CUDA:
``triton.testing.do_bench`` with L2 flushed, CUDA graphs when launch-bound, peak memory),
:mod:`~llmkit.bench.roofline` (copy GB/s, bf16 matmul TFLOP/s, int8 ``_int_mm`` TOP/s,
measured in the same run), :mod:`~llmkit.bench.runner` (checks every output against
PyTorch eager before timing it; skips with reasons; exit code),
:mod:`~llmkit.bench.report` / :mod:`~llmkit.bench.plot` / :mod:`~llmkit.bench.schema`
(table, markdown, JSON and its schema, PNG plots).
"""

from typing import Any

__all__ = ["Options", "Report", "Result", "run_bench"]


def __getattr__(name: str) -> Any:
    # lazy: ``llmkit --help`` builds the bench parser without loading every suite
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
