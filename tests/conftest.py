"""Test setup: Triton kernels run through the interpreter on this CPU-only machine.

TRITON_INTERPRET must be set before Triton decorates any kernel, so it is set here,
before llmkit (which imports kernels lazily) is imported by any test module. On a
machine with a GPU, set LLMKIT_TEST_GPU=1 to run the kernels for real instead.
"""

from __future__ import annotations

import os

if os.environ.get("LLMKIT_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Fresh data on every run; LLMKIT_TEST_SEED=<n> replays a run (the header prints n).
SESSION_SEED = int(os.environ.get("LLMKIT_TEST_SEED", random.randrange(2**31)))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seed torch from the session seed and the test's id: fresh per run, replayable."""
    torch.manual_seed((SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**63))
    yield


def pytest_report_header(config):
    import llmkit

    lines = [f"llmkit {llmkit.__version__}, torch {torch.__version__}, LLMKIT_TEST_SEED={SESSION_SEED}"]
    for info in llmkit.backend_info():
        avail = ", ".join(f"{d}: {'yes' if r is None else 'no'}" for d, r in info.available.items())
        lines.append(f"backend {info.name}: {avail}")
    return lines


@pytest.fixture(scope="session")
def ext():
    """The C++/CUDA extension (``llmkit._ext``), loaded: an existing build in the cache
    (``llmkit build-ext``, ``$LLMKIT_EXT_CACHE_DIR``), else the CPU part built here once
    (about 30 s on 2 cores). A failed build fails the tests using it with its first error."""
    from llmkit import _ext

    reason = _ext.load()
    if reason is not None:
        res = _ext.build(verbose=True)
        assert res.ok, res.summary()
        reason = _ext.load()
    assert reason is None, reason
    return _ext


def poison_kernel_buffers(monkeypatch, *modules) -> None:
    """Every buffer the given kernel modules allocate through their ``_empty`` starts as NaN
    (integer buffers at their minimum), and so does every buffer of the shared helpers of
    ``kernels/_common.py`` (the sums of partial rows): an element a kernel fails to write shows."""
    from llmkit.kernels import _common
    from llmkit.testing import poison_

    real = _common.empty

    def poisoned(shape, dtype, device):
        return poison_(real(shape, dtype, device))

    for module in modules:
        monkeypatch.setattr(module, "_empty", poisoned)
    monkeypatch.setattr(_common, "empty", poisoned)


def assert_refused_then_falls_back(calls, backend: str, reason: str) -> None:
    """Each of ``calls`` (no arguments) raises ``BackendError`` naming ``reason`` when ``backend``
    is asked for alone, and, given ``[backend, "reference"]``, falls back to the reference's
    result exactly."""
    import llmkit

    for call in calls:
        with llmkit.use_backend(backend), pytest.raises(llmkit.BackendError) as info:
            call()
        assert reason in str(info.value), str(info.value)
        with llmkit.use_backend([backend, "reference"]):
            got = call()
        with llmkit.use_backend("reference"):
            assert torch.equal(got, call())


def select_linear_path(monkeypatch, path: str) -> None:
    """Force one of the ``linear`` dispatch point's reference paths on CPU tensors:
    ``"onednn"`` (the default: its variants as they are), ``"bias_in_gemm"`` (no oneDNN) or
    ``"bias_gelu"`` (neither variant: the path GPUs take, the bias inside the GELU kernel)."""
    from llmkit.ops.linear import linear_forward

    order = ["onednn", "bias_in_gemm", "bias_gelu"]
    keep = set(order[order.index(path) :])
    for v in linear_forward.variants["reference"]:
        if v.variant not in keep:
            monkeypatch.setattr(v, "prefer", lambda c: False)
