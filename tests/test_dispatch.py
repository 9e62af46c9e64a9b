"""Backend selection and fallback rules (llmkit/dispatch.py)."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import torch

import llmkit
from llmkit import dispatch
from llmkit.dispatch import BACKENDS, OPS, CpuPreference, DispatchPoint, requested, use_backend
from llmkit.errors import BackendError, UnknownBackendError


def _make_toy_point(cpu_default, dtypes=(torch.float32,)):
    """``toy_op.forward``: a cuda_ext implementation (CPU only, ``dtypes``, refusing odd
    row counts) registered with ``cpu_default``, and a reference; and the list of the
    backends that ran."""
    point = DispatchPoint("toy_op", "forward")
    calls = []

    def odd_rows(x, *rest, **kw):
        if x.shape[0] % 2:
            yield f"takes an even number of rows, got {x.shape[0]}"

    @point.register("cuda_ext", devices=("cpu",), dtypes=dtypes, why_not=odd_rows, cpu_default=cpu_default)
    def _ext(x, *rest, **kw):
        calls.append("cuda_ext")
        return x * 2

    @point.register("reference")
    def _ref(x, *rest, **kw):
        calls.append("reference")
        return x * 2

    return point, calls


@pytest.fixture
def toy_factory(monkeypatch):
    """:func:`_make_toy_point` with the cuda_ext backend made available on the CPU; the
    point is removed from the registry afterwards."""
    monkeypatch.setattr(BACKENDS["cuda_ext"], "probe", lambda device_type: None)
    dispatch._logged.clear()
    yield _make_toy_point
    OPS.pop("toy_op", None)
    dispatch._logged.clear()


@pytest.fixture
def toy_point(toy_factory):
    """A dispatch point with a CPU-preferred (always) cuda_ext implementation that refuses odd rows."""
    return toy_factory(True)


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


# -- per-call CPU preference (cpu_default as a predicate) -----------------------------

HALVES_AND_BIG_FLOAT32 = CpuPreference({torch.bfloat16: 0, torch.float32: (64, 4000)})
"""The toy rule: every bfloat16 call, float32 from 64 to 3999 elements, never float16."""


@pytest.mark.parametrize(
    "shape,dtype,expected",
    [
        ((2, 3), torch.float32, "reference"),  # 6 elements: below the float32 minimum
        ((2, 31), torch.float32, "reference"),  # 62
        ((2, 32), torch.float32, "cuda_ext"),  # 64: the minimum itself
        ((4, 999), torch.float32, "cuda_ext"),  # 3996
        ((4, 1000), torch.float32, "reference"),  # 4000: the (exclusive) limit
        ((1, 4001), torch.float32, "reference"),
        ((2, 1), torch.bfloat16, "cuda_ext"),  # minimum 0: every bfloat16 call
        ((4, 1000), torch.float16, "reference"),  # not listed: never preferred
        ((4, 1000), torch.float64, "reference"),
    ],
)
def test_cpu_preference_picks_by_dtype_and_size(toy_factory, caplog, shape, dtype, expected):
    point, calls = toy_factory(HALVES_AND_BIG_FLOAT32, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    x = torch.randn(shape).to(dtype)
    assert point.select(x).backend == expected
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        assert torch.equal(point(x), x * 2)
    assert calls == [expected]
    assert caplog.records == []  # a call the rule leaves to the reference is not a fallback


def test_cpu_preference_still_falls_back_with_a_log_when_the_preferred_refuses(toy_factory, caplog):
    point, calls = toy_factory(HALVES_AND_BIG_FLOAT32)
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        point(torch.randn(3, 100))  # preferred by size, refused by why_not (odd rows)
    assert calls == ["reference"]
    assert len(caplog.records) == 1 and "even number of rows, got 3" in caplog.records[0].getMessage()


def test_cpu_preference_predicate_sees_the_call_arguments(toy_factory):
    seen = []

    def prefer(x, scale, *, flag=False):
        seen.append((tuple(x.shape), scale, flag))
        return flag

    point, calls = toy_factory(prefer)
    x = torch.randn(2, 5)
    point(x, 0.5)
    point(x, 0.25, flag=True)
    assert calls == ["reference", "cuda_ext"]
    assert seen == [((2, 5), 0.5, False), ((2, 5), 0.25, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backend_by_name_ignores_the_cpu_preference(toy_factory, monkeypatch, dtype):
    """A backend asked for by name runs where the rule would not prefer it, and raises
    (never falls back) where it cannot take the call, whatever the rule says."""
    point, calls = toy_factory(HALVES_AND_BIG_FLOAT32, dtypes=(torch.float32, torch.float16))
    small, odd_big = torch.ones(2, 3, dtype=dtype), torch.ones(3, 100, dtype=dtype)
    with use_backend("cuda_ext"):
        point(small)
        with pytest.raises(BackendError, match="even number of rows"):
            point(odd_big)
    monkeypatch.setenv("LLMKIT_BACKEND", "toy_op=cuda_ext")
    point(small)
    with pytest.raises(BackendError, match="from LLMKIT_BACKEND"):
        point(odd_big)
    monkeypatch.delenv("LLMKIT_BACKEND")
    point.call_backend("cuda_ext", small)
    with pytest.raises(BackendError, match="even number of rows"):
        point.call_backend("cuda_ext", odd_big)
    assert calls == ["cuda_ext"] * 3
    with use_backend("reference"):
        point(torch.ones(4, 1000, dtype=dtype))  # preferred by the rule for float32; reference asked
    assert calls[-1] == "reference"


def test_cpu_order_cache_follows_registrations(toy_factory):
    point, calls = toy_factory(True)
    big, small = torch.randn(4, 100), torch.randn(2, 3)
    assert point._default_order("cpu") == ("cuda_ext", "reference")
    point(small)
    assert calls == ["cuda_ext"]

    # a new registration replaces the cached order: a rule, then never, then always again
    def reregister(cpu_default, label):
        point.register("cuda_ext", dtypes=(torch.float32,), cpu_default=cpu_default)(lambda x: calls.append(label) or x)

    reregister(HALVES_AND_BIG_FLOAT32, "rule")
    point(small), point(big)
    assert calls[1:] == ["reference", "rule"]
    # without the call's arguments: every backend that may come first (for selects_reference)
    assert point._default_order("cpu") == ("cuda_ext", "reference")
    assert point._default_order("cpu", (small,), {}) == ("reference",)
    reregister(False, "never")
    point(big)
    assert calls[-1] == "reference"
    assert point._default_order("cpu") == ("reference",)
    reregister(True, "always")
    point(small)
    assert calls[-1] == "always"
    assert point._default_order("cuda", (small,), {}) == dispatch.BACKEND_NAMES


def test_selects_reference_is_conservative_for_a_conditional_preference(toy_factory):
    from llmkit.ops import _fastpath as FP

    point, _ = toy_factory(HALVES_AND_BIG_FLOAT32)
    assert not FP.selects_reference(point)  # cuda_ext comes first for some calls
    with use_backend(toy_op="reference"):
        assert FP.selects_reference(point)


def test_bad_cpu_default_raises_naming_it():
    point = DispatchPoint("toy_op", "forward")
    try:
        with pytest.raises(TypeError, match=r"toy_op.forward: cpu_default must be a bool or a predicate.*'yes'"):
            point.register("cuda_ext", cpu_default="yes")
        with pytest.raises(TypeError, match="keys of sizes must be torch.dtype, got 'float32'"):
            CpuPreference({"float32": 0})
        for bad in (-1, 1.5, True, (10, 10), (10, 5), (None, 5), (1, 2, 3)):
            with pytest.raises(ValueError, match=r"sizes\[torch.float32\] must be an int >= 0 .* got "):
                CpuPreference({torch.float32: bad})
    finally:
        OPS.pop("toy_op", None)


def test_cpu_preference_describes_itself():
    assert str(HALVES_AND_BIG_FLOAT32) == "bfloat16, float32 of [64, 4000) elements"
    assert str(CpuPreference({torch.float32: (0, 8)})) == "float32 below 8 elements"
    assert str(CpuPreference({torch.float16: 10})) == "float16 from 10 elements"
    assert repr(CpuPreference({torch.float16: 0})) == "CpuPreference(float16)"
    assert CpuPreference({torch.float16: 0}) == CpuPreference({torch.float16: (0, None)})
    assert not CpuPreference({torch.float32: 0})()  # no tensor argument: not preferred
    assert CpuPreference({torch.float32: 0})(4, x=torch.ones(2))  # the first tensor may be a keyword


def test_cuda_ext_cpu_preference_table_is_what_is_registered():
    from llmkit.backends.cuda_ext import _common as C

    for qualname, pref in C.CPU_DEFAULT.items():
        op, stage = qualname.split(".")
        assert OPS[op][stage].impls["cuda_ext"].cpu_default is pref, qualname
    for op, stages in OPS.items():  # every CPU-capable cuda_ext implementation has an entry
        for stage, point in stages.items():
            impl = point.impls.get("cuda_ext")
            if impl is not None and (impl.devices is None or "cpu" in impl.devices):
                assert f"{op}.{stage}" in C.CPU_DEFAULT, f"{op}.{stage}"


def _norm_args(m, n, dtype):
    x = torch.randn(m, n).to(dtype)
    return x, torch.randn(m, n).to(dtype), [n], torch.rand(n).to(dtype), torch.randn(n).to(dtype), 1e-5


@pytest.mark.parametrize(
    "m,n,dtype,first",
    [
        (1, 768, torch.float32, "reference"),  # one-row decode: the reference is faster
        (64, 1024, torch.float32, "reference"),
        (512, 768, torch.float32, "cuda_ext"),
        (1, 768, torch.bfloat16, "reference"),  # in every dtype
        (1, 768, torch.float16, "reference"),
        (128, 768, torch.bfloat16, "cuda_ext"),
        (128, 768, torch.float32, "reference"),
        (3, 5, torch.float64, "reference"),
    ],
)
def test_add_layer_norm_cpu_order_follows_the_measured_rule(m, n, dtype, first):
    """The default CPU order of the real add_layer_norm point (whether or not the
    extension is built here: the order lists backends before their availability)."""
    point = OPS["add_layer_norm"]["forward"]
    assert point._default_order("cpu", _norm_args(m, n, dtype), {})[0] == first
    assert point._default_order("cpu")[0] == "cuda_ext"  # preferred for some calls


def test_selection_is_local_to_each_thread():
    barrier = threading.Barrier(2)
    seen: dict[str, object] = {}

    def worker(name, backend):
        with use_backend(backend):
            barrier.wait()  # both threads are inside their blocks at the same time
            seen[name] = requested("layer_norm").order
            barrier.wait()

    threads = [
        threading.Thread(target=worker, args=("a", "reference")),
        threading.Thread(target=worker, args=("b", "triton")),
    ]
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
    expected = {
        "layer_norm",
        "rms_norm",
        "add_layer_norm",
        "gelu",
        "bias_gelu",
        "attention",
        "decode_attention",
        "varlen_attention",
        "quantize_int8",
        "int8_matmul",
        "int8_linear",
    }
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


# -- what a bad selection says ----------------------------------------------------------


@pytest.mark.parametrize(
    "value, words",
    [
        (3, ["use_backend", "got 3 (int)", "name"]),
        ([3], ["use_backend", "got 3 (int)", "strings"]),
        ("nope", ["use_backend", "unknown backend 'nope'", "reference"]),
    ],
)
def test_use_backend_names_what_it_got(value, words):
    with pytest.raises((TypeError, ValueError)) as info:
        with use_backend(value):
            pass
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize(
    "value, words",
    [
        ("nope", ["LLMKIT_BACKEND='nope'", "unknown backend 'nope'", "triton, cuda_ext, reference"]),
        (
            "gelu=reference;layer_norm=nope",
            ["LLMKIT_BACKEND='gelu=reference;layer_norm=nope'", "(layer_norm)", "'nope'"],
        ),
    ],
)
def test_an_invalid_llmkit_backend_is_named_in_errors_and_in_info(monkeypatch, value, words):
    from llmkit.info import format_info

    monkeypatch.setenv("LLMKIT_BACKEND", value)
    with pytest.raises(UnknownBackendError) as info:
        llmkit.ops.layer_norm(torch.randn(2, 3), [3])
    for w in words:
        assert w in str(info.value)
    text = format_info()
    assert f"LLMKIT_BACKEND={value!r} is invalid" in text and words[1] in text


def test_info_shows_a_valid_llmkit_backend(monkeypatch):
    from llmkit.info import format_info

    monkeypatch.setenv("LLMKIT_BACKEND", "triton,reference;gelu=reference")
    assert (
        "LLMKIT_BACKEND='triton,reference;gelu=reference' (every op: triton, reference; gelu: reference)"
        in format_info()
    )
    monkeypatch.delenv("LLMKIT_BACKEND")
    assert "LLMKIT_BACKEND is not set" in format_info()
