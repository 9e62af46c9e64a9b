"""The reference backend (the production path on CPU) against the float64 formulas.

Runs the checker's cases for every op, forward and backward, every dtype, on the
reference backend only; each output must meet the correctness rule of llmkit.testing (or be bit-exact /
reach the SQNR floor for int8).
"""

from __future__ import annotations

import pytest

from llmkit.check import all_cases, run_check

OPS = sorted({c.op for c in all_cases()})


@pytest.mark.parametrize("op", OPS)
def test_reference_backend_meets_the_rule(op):
    rows = run_check(ops=[op], backends=["reference"], quick=True)
    assert rows, f"no check case ran for {op}"
    failed = [r for r in rows if r.status != "PASS"]
    assert not failed, "\n".join(
        f"{r.dtype} {r.shape} {r.output}: err {r.max_abs_err:.3g} tol {r.tolerance:.3g} {r.note}" for r in failed
    )
    dtypes = {r.dtype for r in rows}
    assert len(dtypes) >= 1
