"""Shared pieces of the fuzz suite (tests/test_fuzz_*.py): profiles, value generators and the rule.

The rule, for every output and gradient against :mod:`llmkit.reference64` (float64):

* where the float64 result, rounded to the output's dtype, is finite, llmkit's is finite and
  within the tolerance of :mod:`llmkit.testing`: 2 x PyTorch's error (the worse of PyTorch
  in that dtype and PyTorch in float32 rounded to it, each where finite; never less than
  the rounding of the float64 result) + floor + one unit of rounding;
* where it is not finite, llmkit's is not finite either (NaN or inf), except where a
  convention of docs/architecture.md says otherwise (the ``allow_finite`` mask).

Profiles: ``LLMKIT_FUZZ=ci`` (default: fixed example counts, derandomized, so every run draws
the same examples and the suite's time is fixed) or ``LLMKIT_FUZZ=long`` (20x the examples,
drawn afresh from a seed derived from ``LLMKIT_TEST_SEED``, printed in the session header, and
the test's name: a failing run replays with the same seed). No example database is written.

Tensors are built from a ``torch.Generator`` that the test draws a seed for (``gens``), so an
example is a handful of integers and hypothesis shrinks shapes and value classes, not floats.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib

import torch
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st

from llmkit.testing import ATOL_FLOOR, max_abs_error, tolerance

F64 = torch.float64
HALF = (torch.float16, torch.bfloat16)
HALF_AND_FLOAT = [torch.float16, torch.bfloat16, torch.float32]
WARNINGS = [
    "ignore:Mismatch dtype",  # ATen's mixed-dtype norms with a float32 weight
    "ignore::RuntimeWarning",  # numpy under the Triton interpreter, on inf / NaN values
]
"""``pytestmark`` filters of the fuzz files: ``[pytest.mark.filterwarnings(w) for w in WARNINGS]``."""


def leaf(t):
    """A fresh leaf that requires grad (None stays None)."""
    return None if t is None else t.detach().clone().requires_grad_(True)


PROFILE = os.environ.get("LLMKIT_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"LLMKIT_FUZZ must be 'ci' or 'long', got {PROFILE!r}")
_FACTOR = 20 if PROFILE == "long" else 1


def _session_seed() -> int:
    conftest = sys.modules.get("conftest")
    if conftest is not None and hasattr(conftest, "SESSION_SEED"):
        return int(conftest.SESSION_SEED)
    return int(os.environ.get("LLMKIT_TEST_SEED", "0"))


def fuzz(examples: int, name: str):
    """Decorator: hypothesis settings, ``examples`` examples in CI (derandomized: the same ones
    every run) or 20x that many in the long profile (seeded from the session seed and ``name``)."""
    s = settings(
        max_examples=examples * _FACTOR,
        deadline=None,
        database=None,
        derandomize=PROFILE == "ci",
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    if PROFILE == "ci":
        return s
    sd = seed((_session_seed() + zlib.crc32(name.encode())) % (2**32))
    return lambda fn: sd(s(fn))


def gens() -> st.SearchStrategy[torch.Generator]:
    """A seeded ``torch.Generator`` (the seed is what hypothesis draws and shrinks)."""
    return st.integers(0, 2**31 - 1).map(lambda s: torch.Generator().manual_seed(s))


# --------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------

KINDS = ["normal", "large_mean", "huge", "tiny", "constant", "zeros", "specials", "mixed", "mixed", "mixed"]
"""Value classes of a tensor's rows: randn, randn + 1e4, |x| ~ 1e30 (float16: ~1e4),
|x| ~ 1e-40 (float16: ~1e-6; denormals), constant rows, zeros, NaN / +-inf sprinkled, and
(drawn most often) every row a class of its own."""

_ROW_KINDS = KINDS[:7]
_HUGE = {torch.float16: 1e4, torch.bfloat16: 1e30, torch.float32: 1e30, F64: 1e30}
_TINY = {torch.float16: 1e-6, torch.bfloat16: 1e-40, torch.float32: 1e-40, F64: 1e-40}


def _fill(x: torch.Tensor, dtype, kind: str, gen: torch.Generator, huge: float | None) -> None:
    """Give the rows of the float64 ``x`` (..., N) the value class ``kind``, in place."""
    if kind == "large_mean":
        x += 1e4
    elif kind == "huge":
        x *= huge or _HUGE[dtype]
    elif kind == "tiny":
        x *= _TINY[dtype]
    elif kind == "constant":
        x.copy_((torch.randn(x.shape[:-1], dtype=F64, generator=gen) * 100)[..., None].expand(x.shape))
    elif kind == "zeros":
        x.zero_()
    elif kind == "specials":
        flat = x.view(-1)
        n = max(1, flat.numel() // 50)
        idx = torch.randint(0, flat.numel(), (3 * n,), generator=gen)
        flat[idx[:n]] = float("nan")
        flat[idx[n : 2 * n]] = float("inf")
        flat[idx[2 * n :]] = float("-inf")


STRICT_KINDS = ("huge", "tiny")
"""Row classes where PyTorch's float32 kernels themselves break (0, NaN, 0 / 0): their rows
are held to the float64 result rounded to the dtype, not to PyTorch's error."""


def values(
    shape,
    dtype,
    kind: str,
    gen: torch.Generator,
    row_dims: int = 1,
    huge: float | None = None,
    strict_rows: list | None = None,
    strict_kinds: tuple[str, ...] = STRICT_KINDS,
) -> torch.Tensor:
    """A tensor of ``shape`` whose rows (the last ``row_dims`` dims) follow ``kind``. With
    ``strict_rows`` (a list), a boolean of the leading shape marking the rows of
    ``strict_kinds`` (default :data:`STRICT_KINDS`: the op's PyTorch baseline breaks on them)
    is appended to it."""
    x = torch.randn(shape, dtype=F64, generator=gen)
    lead = tuple(shape[: len(shape) - row_dims])
    strict = torch.zeros(lead, dtype=torch.bool)
    if x.numel():
        rows = x.reshape(-1, math.prod(shape[len(shape) - row_dims :]))
        strict = strict.view(-1)
        if kind in strict_kinds:
            strict[:] = True
        if kind == "mixed":
            pick = torch.randint(0, len(_ROW_KINDS), (rows.shape[0],), generator=gen)
            for k in strict_kinds:
                strict |= pick == _ROW_KINDS.index(k)
            for i, k in enumerate(_ROW_KINDS):
                sel = (pick == i).nonzero().squeeze(1)
                if sel.numel():
                    part = rows[sel]
                    _fill(part, dtype, k, gen, huge)
                    rows[sel] = part
        else:
            _fill(rows, dtype, kind, gen, huge)
        x = rows.reshape(shape)
        strict = strict.view(lead)
    if strict_rows is not None:
        strict_rows.append(strict)
    return x.to(dtype)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout: contiguous, a transposed view of the
    leading dims, rows of a wider buffer (sliced), or stride 0 along the first dim (expanded)."""
    if kind == "contiguous" or t.dim() < 2:
        return t
    if kind == "transposed" and t.dim() >= 3:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "sliced":
        wide = torch.empty(t.shape[:-1] + (t.shape[-1] + 3,), dtype=t.dtype)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    if kind == "expanded" and t.shape[0] > 0:
        return t[:1].expand(t.shape)
    return t


LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])
ROW_LENGTHS = st.sampled_from([1, 2, 3, 7, 31, 61, 127, 128, 257, 1021, 4099])
LEAD_DIMS = st.lists(st.sampled_from([1, 2, 3, 5, 13, 1, 2, 3, 5, 13, 0]), min_size=1, max_size=3)
"""Leading dims: 0 (an empty tensor) in about one draw in eleven."""


# --------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------


def check(
    name: str,
    out: torch.Tensor | None,
    ref: torch.Tensor | None,
    baselines=(),
    allow_finite: torch.Tensor | None = None,
    strict: torch.Tensor | None = None,
) -> None:
    """The fuzz rule (module docstring) for one output ``out`` against the float64 ``ref``;
    ``baselines``: PyTorch's own results (in ``out``'s dtype; computed in that dtype or in
    float32 and rounded), each where it is finite. ``strict`` (broadcastable to ``out``):
    positions held to the rounded float64 result alone (see :data:`STRICT_KINDS`)."""
    if strict is not None and out is not None and out.numel() and strict.any():
        strict = strict.expand(out.shape)
        check(name + " [strict rows]", out[strict], ref.detach()[strict], (), None, None)
        keep = ~strict
        check(
            name,
            out[keep],
            ref.detach()[keep],
            [None if b is None else b.detach()[keep] for b in baselines],
            None if allow_finite is None else allow_finite.expand(out.shape)[keep],
            None,
        )
        return
    if out is None and ref is None:
        return
    assert out is not None and ref is not None, f"{name}: one of result / reference is missing"
    assert out.shape == ref.shape, f"{name}: shape {list(out.shape)}, reference {list(ref.shape)}"
    if out.numel() == 0:
        return
    ref = ref.detach()
    out = out.detach()
    expect = ref.to(out.dtype)
    fin = torch.isfinite(expect)
    got_fin = torch.isfinite(out)
    bad = fin & ~got_fin
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} non-finite values where float64 is finite, first at "
        f"{tuple(bad.nonzero()[0].tolist())}: {out[bad][0].item()} vs {ref[bad][0].item()}"
    )
    extra = ~fin & got_fin
    if allow_finite is not None:
        extra &= ~allow_finite.expand(extra.shape)
    assert not extra.any(), (
        f"{name}: {int(extra.sum())} finite values where float64 is not, first at "
        f"{tuple(extra.nonzero()[0].tolist())}: {out[extra][0].item()} vs {ref[extra][0].item()}"
    )
    if not fin.any():
        return
    o, r = out[fin].to(F64), ref[fin]
    base = max_abs_error(expect[fin], r)  # the correctly rounded result's own error
    for b in baselines:
        if b is None:
            continue
        b = b.detach()[fin]
        ok = torch.isfinite(b)
        if ok.any():
            base = max(base, max_abs_error(b[ok], r[ok]))
    ref_max = float(r.abs().max())
    tol = tolerance(base, out.dtype, ATOL_FLOOR.get(out.dtype), ref_max)
    err = float((o - r).abs().max())
    assert err <= tol, (
        f"{name}: max abs error {err:.3g} exceeds tolerance {tol:.3g} (2 x {base:.3g} + floor), "
        f"dtype {str(out.dtype).replace('torch.', '')}, shape {list(out.shape)}"
    )


# --------------------------------------------------------------------------------------
# crash isolation
# --------------------------------------------------------------------------------------

CHILD = os.environ.get("LLMKIT_FUZZ_CHILD") == "1"
"""True inside the subprocess that :func:`run_isolated` starts."""


def run_isolated(nodeid: str, timeout: float = 600) -> None:
    """Run one pytest node in a fresh process: a crash (SIGSEGV, SIGBUS, abort) fails the
    calling test with the signal and the output instead of killing pytest."""
    env = dict(os.environ, LLMKIT_FUZZ_CHILD="1", LLMKIT_TEST_SEED=str(_session_seed()))
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", nodeid, "-q", "-p", "no:cacheprovider", "-x", "--runxfail"],
        cwd=os.path.dirname(here),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode < 0:
        raise AssertionError(
            f"{nodeid} crashed with signal {-proc.returncode}:\n{proc.stdout[-6000:]}{proc.stderr[-3000:]}"
        )
    if proc.returncode not in (0, 5):  # 5: nothing collected / all deselected
        raise AssertionError(f"{nodeid} failed:\n{proc.stdout[-8000:]}{proc.stderr[-2000:]}")


def need_ext() -> None:
    """The C++ extension loaded (built here once if missing); a failed build fails the test."""
    from llmkit import _ext

    if _ext.load() is not None:
        res = _ext.build()
        assert res.ok, res.summary()
        assert _ext.load() is None


def run_fuzz(request, backend: str, examples: int, name: str, case) -> None:
    """Run ``case(backend, data)`` (``data``: hypothesis' ``st.data()``) on ``examples``
    examples (:func:`fuzz`). ``cuda_ext``: the extension loaded, and the test re-run in a
    subprocess (:func:`run_isolated`) so a crash of the C++ kernels fails it."""
    from hypothesis import given

    if backend == "cuda_ext":
        need_ext()
        if not CHILD:
            run_isolated(request.node.nodeid)
            return

    @fuzz(examples, name)
    @given(data=st.data())
    def run(data):
        case(backend, data)

    run()
