"""Backend selection and fallback rules (llmkit/dispatch.py)."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import torch

import llmkit
from llmkit import dispatch
from llmkit.dispatch import BACKENDS, OPS, DispatchPoint, requested, use_backend
from llmkit.errors import BackendError, UnknownBackendError


@pytest.fixture
def toy_point(monkeypatch):
    """A dispatch point with a CPU-preferred cuda_ext implementation that refuses odd rows.

    The cuda_ext backend is made available on the CPU for the test; the point is removed
    from the registry afterwards.
    """
    monkeypatch.setattr(BACKENDS["cuda_ext"], "probe", lambda device_type: None)
    point = DispatchPoint("toy_op", "forward")
    calls = []

    def odd_rows(x):
        if x.shape[0] % 2:
            yield f"takes an even number of rows, got {x.shape[0]}"

    @point.register("cuda_ext", devices=("cpu",), dtypes=(torch.float32,), why_not=odd_rows, cpu_default=True)
    def _ext(x):
        calls.append("cuda_ext")
        return x * 2

    @point.register("reference")
    def _ref(x):
        calls.append("reference")
        return x * 2

    dispatch._logged.clear()
    yield point, calls
    OPS.pop("toy_op", None)
    dispatch._logged.clear()


def test_default_order_prefers_registered_cpu_kernel_and_falls_back_with_one_log(toy_point, caplog):
    point, calls = toy_point
    assert torch.equal(point(torch.ones(2, 3)), torch.full((2, 3), 2.0))
    assert calls == ["cuda_ext"]
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        point(torch.ones(3, 3))
        point(torch.ones(3, 3))
    assert calls[1:] == ["reference", "reference"]
    logs = [r.getMessage() for r in caplog.records]
    assert len(logs) == 1, logs
    assert "toy_op.forward" in logs[0] and "even number of rows, got 3" in logs[0]


def test_dtype_declared_by_implementation_is_enforced(toy_point):
    point, calls = toy_point
    point(torch.ones(2, 3, dtype=torch.float64))
    assert calls == ["reference"]
    with use_backend("cuda_ext"), pytest.raises(BackendError, match="takes float32, got float64"):
        point(torch.ones(2, 3, dtype=torch.float64))


def test_backend_named_alone_raises_instead_of_falling_back(toy_point):
    point, calls = toy_point
    with use_backend("cuda_ext"):
        with pytest.raises(BackendError) as info:
            point(torch.ones(3, 3))
    assert "cuda_ext" in info.value.reasons
    assert "even number of rows" in str(info.value)
    assert calls == []


def test_explicit_order_allows_fallback_within_the_list_only(toy_point):
    point, calls = toy_point
    with use_backend(["cuda_ext", "reference"]):
        point(torch.ones(3, 3))
    assert calls == ["reference"]
    with use_backend("triton,cuda_ext"):
        with pytest.raises(BackendError) as info:
            point(torch.ones(3, 3))
    assert set(info.value.reasons) == {"triton", "cuda_ext"}
    assert "no triton implementation of toy_op.forward" in str(info.value)


def test_per_op_override_beats_global_selection(toy_point):
    point, calls = toy_point
    with use_backend("cuda_ext", toy_op="reference"):
        point(torch.ones(2, 2))
    assert calls == ["reference"]
    with use_backend(toy_op="reference"), use_backend("cuda_ext"):
        # the outer per-op override stays in force inside a new global choice
        assert requested("toy_op").order == ("reference",)


def test_unknown_names_raise():
    with pytest.raises(UnknownBackendError, match="unknown backend 'cuda'"):
        with use_backend("cuda"):
            pass
    with pytest.raises(UnknownBackendError, match="unknown op 'layernorm'"):
        with use_backend(layernorm="reference"):
            pass
    with pytest.raises(UnknownBackendError):
        with use_backend([]):
            pass


def test_environment_variable_selects_and_context_wins(monkeypatch, toy_point):
    point, calls = toy_point
    monkeypatch.setenv("LLMKIT_BACKEND", "toy_op=reference")
    point(torch.ones(2, 2))
    assert calls == ["reference"]
    with use_backend("cuda_ext"):
        point(torch.ones(2, 2))
    assert calls[-1] == "cuda_ext"
    monkeypatch.setenv("LLMKIT_BACKEND", "cuda_ext")
    with pytest.raises(BackendError, match="from LLMKIT_BACKEND"):
        point(torch.ones(3, 3))
    monkeypatch.setenv("LLMKIT_BACKEND", "nosuch")
    with pytest.raises(UnknownBackendError, match="nosuch"):
        point(torch.ones(2, 2))
    monkeypatch.setenv("LLMKIT_BACKEND", "nosuch_op=reference")
    with pytest.raises(UnknownBackendError, match="unknown op 'nosuch_op'"):
        point(torch.ones(2, 2))


def test_selection_is_local_to_each_thread():
    barrier = threading.Barrier(2)
    seen: dict[str, object] = {}

    def worker(name, backend):
        with use_backend(backend):
            barrier.wait()  # both threads are inside their blocks at the same time
            seen[name] = requested("layer_norm").order
            barrier.wait()

    threads = [threading.Thread(target=worker, args=("a", "reference")),
               threading.Thread(target=worker, args=("b", "triton"))]
    with use_backend("cuda_ext"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert requested("layer_norm").order == ("cuda_ext",)
    assert seen == {"a": ("reference",), "b": ("triton",)}
    assert requested("layer_norm") is None


def test_selection_is_local_to_each_asyncio_task():
    async def task(backend, out, key):
        with use_backend(backend):
            await asyncio.sleep(0.01)
            out[key] = requested("gelu").order

    async def main():
        out = {}
        await asyncio.gather(task("reference", out, 1), task("triton", out, 2))
        return out

    assert asyncio.run(main()) == {1: ("reference",), 2: ("triton",)}


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = BACKENDS["triton"].unavailable_reason("cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKENDS["triton"].unavailable_reason("cpu") is None
    assert "CPU tensors only" in BACKENDS["triton"].unavailable_reason("cuda")


def test_every_op_has_a_reference_implementation_for_every_stage():
    expected = {"layer_norm", "rms_norm", "add_layer_norm", "gelu", "bias_gelu", "attention",
                "decode_attention", "quantize_int8", "int8_matmul", "int8_linear"}
    assert expected <= set(OPS)
    for op in expected:
        for stage, point in OPS[op].items():
            assert "reference" in point.impls, f"{op}.{stage} has no reference implementation"


def test_backend_info_reports_every_backend_with_reasons():
    infos = {b.name: b for b in llmkit.backend_info()}
    assert list(infos) == ["triton", "cuda_ext", "reference"]
    assert infos["reference"].available["cpu"] is None
    if not torch.cuda.is_available():
        assert infos["reference"].available["cuda"] == "no CUDA GPU is available"
        assert infos["triton"].available["cuda"]
    assert "layer_norm" in infos["reference"].ops
    assert infos["reference"].ops["layer_norm"] == ["forward", "backward"]


def test_named_backend_that_is_unavailable_raises_with_its_reason(monkeypatch):
    monkeypatch.setattr(BACKENDS["cuda_ext"], "probe", lambda device_type: "extension not built (test)")
    x = torch.randn(4, 8)
    with use_backend("cuda_ext"):
        with pytest.raises(BackendError, match=r"extension not built \(test\)"):
            llmkit.ops.gelu(x)
    assert torch.equal(llmkit.ops.gelu(x), torch.nn.functional.gelu(x))
