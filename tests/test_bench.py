"""The benchmark harness: formulas, roofline math, statistics, schema, rendering, a tiny run.

Nothing here asserts on a measured time: the timings of a run are only checked for
being present, positive and consistent with the formulas that turn them into GB/s.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from llmkit import cli
from llmkit.bench import formulas as Fm
from llmkit.bench.plot import matplotlib_missing
from llmkit.bench.progress import ProgressBar
from llmkit.bench.report import fmt_time, format_markdown, format_table, report_json
from llmkit.bench.roofline import Roofline, fraction, measure_roofline, roof_for
from llmkit.bench.runner import Options, Report, Result, Skip, Truth, compare_outputs, page_fault_note, plan
from llmkit.bench.schema import SCHEMA, validate
from llmkit.bench.shapes import check_shapes, group_key, load_shapes, point_label
from llmkit.bench.suite import SUITES, Context, Impl, OpCall, in_backend
from llmkit.bench.timing import CpuBudget, make_sample, measure_cpu_interleaved, quantile
from llmkit.dispatch import OPS, requested

# --------------------------------------------------------------------------------------
# FLOP / byte formulas, against numbers worked out by hand
# --------------------------------------------------------------------------------------


def test_norm_formulas_by_hand():
    # layer_norm, M=2 rows of N=3 in bf16 (2 bytes): fwd reads x (6) + w, b (3 + 3), writes y (6)
    # = 18 elements = 36 bytes, plus mean and rstd as float32 (2 rows x 2 x 4 = 16 bytes)
    assert Fm.layer_norm(2, 3, 2) == Fm.Work(42.0, 52)
    # bwd reads dy, x (12), w (3), writes dx (6), dw, db (6): 27 elements = 54 bytes + 16
    assert Fm.layer_norm(2, 3, 2, backward=True) == Fm.Work(84.0, 70)
    # rms_norm float32: fwd x (6) + w (3) + y (6) = 15 x 4 = 60 bytes + rstd 2 x 4
    assert Fm.rms_norm(2, 3, 4) == Fm.Work(24.0, 68)
    # bwd dy, x, dx (18) + w, dw (6) = 24 x 4 = 96 + 8
    assert Fm.rms_norm(2, 3, 4, backward=True) == Fm.Work(54.0, 104)
    # add_layer_norm bf16: fwd x, r, y, s (24) + w, b (6) = 30 x 2 = 60 + 16
    assert Fm.add_layer_norm(2, 3, 2) == Fm.Work(48.0, 76)
    # bwd dy, ds, s, dx (24) + w, dw, db (9) = 33 x 2 = 66 + 16
    assert Fm.add_layer_norm(2, 3, 2, backward=True) == Fm.Work(90.0, 82)


def test_activation_and_int8_formulas_by_hand():
    assert Fm.gelu(10, 2) == Fm.Work(80.0, 40)
    assert Fm.gelu(10, 2, backward=True) == Fm.Work(120.0, 60)
    # bias_gelu float32, x (2, 3): fwd x, y (12) + bias (3) = 15 x 4
    assert Fm.bias_gelu(2, 3, 4) == Fm.Work(54.0, 60)
    # bwd dy, x, dx (18) + bias, dbias (6) = 24 x 4
    assert Fm.bias_gelu(2, 3, 4, backward=True) == Fm.Work(84.0, 96)
    # quantize x (4, 8) bf16: read 32 x 2, write 32 int8 + 4 float32 scales
    assert Fm.quantize_int8(4, 8, 2) == Fm.Work(96.0, 64 + 32 + 16)
    # W8A8 M=2 N=3 K=4, bf16 activations: 2*2*3*4 = 48 ops; x 8x2, W 12 int8, scales 3x4,
    # bias 3x2, out 6x2
    assert Fm.int8_linear_w8a8(2, 3, 4, 2) == Fm.Work(48.0, 16 + 12 + 12 + 6 + 12)
    assert Fm.int8_linear_w8a8(2, 3, 4, 2, bias=False).bytes == 52
    assert Fm.int8_linear_w8a16(2, 3, 4, 2) == Fm.Work(48.0, 58)
    # float linear: every operand once, x 8 + W 12 + y 6 + b 3 = 29 x 2
    assert Fm.linear(2, 3, 4, 2) == Fm.Work(48.0, 58)
    assert Fm.copy(100) == Fm.Work(0.0, 200)


def test_attention_formulas_follow_the_flashattention_convention():
    # B=2, H=3, Sq=5, Sk=7, D=8: 4 * 2 * 3 * 5 * 7 * 8 = 6720
    fwd = Fm.attention(2, 3, 5, 7, 8, 2)
    assert fwd.flops == 6720
    assert Fm.attention(2, 3, 5, 7, 8, 2, causal=True).flops == 3360
    assert Fm.attention(2, 3, 5, 7, 8, 2, backward=True).flops == 2.5 * 6720
    assert Fm.attention(2, 3, 5, 7, 8, 2, causal=True, backward=True).flops == 2.5 * 3360
    # bytes: q, o 2*3*5*8 = 240 each; k, v 2*3*7*8 = 336 each; 1152 x 2 + lse 30 x 4
    assert fwd.bytes == 2304 + 120
    # backward: q, k, v, o, do read, dq, dk, dv written: 2*(240+336+336) + 2*240 = 2304 elements,
    # lse read and delta written and read: 3 x 30 x 4
    assert Fm.attention(2, 3, 5, 7, 8, 2, backward=True).bytes == 2304 * 2 + 360
    # GQA with 1 K/V head and Dv=4: flops 2*2*3*5*7*(8+4) = 5040; k 2*7*8=112, v 2*7*4=56
    g = Fm.attention(2, 3, 5, 7, 8, 4, hkv=1, dv=4)
    assert g.flops == 5040
    assert g.bytes == 4 * (240 + 112 + 56 + 120) + 120


def test_decode_and_model_formulas_by_hand():
    # B=2, Hq=4, Hkv=2, T=1, L=10, D=8, bf16: 2*2*4*1*10*16 = 2560 flops;
    # cache 2*2*10*16 = 640 elements, queries+outputs 2*4*1*16 = 128; lengths 2 x 4 bytes
    d = Fm.decode_attention(2, 4, 2, 1, 10, 8, 2)
    assert d == Fm.Work(2560.0, (640 + 128) * 2 + 8)
    # per layer and token: 8*4*4 + 4*4*8 = 256 dense, 4*5*4 = 80 attention
    assert Fm.transformer_tokens(2, 4, 8, 3, 5) == 2 * 3 * (256 + 80)
    assert Fm.transformer_tokens(2, 4, 8, 3, 5, causal=True) == 2 * 3 * (256 + 40)


def test_varlen_formula_counts_each_sequence_alone():
    lengths = [3, 17, 1]
    w = Fm.varlen_attention(lengths, 4, 64, 2, causal=True, backward=False, hkv=2)
    parts = [Fm.attention(1, 4, n, n, 64, 2, True, False, hkv=2) for n in lengths]
    assert w.flops == sum(p.flops for p in parts) and w.bytes == sum(p.bytes for p in parts)
    assert w.flops == 4 * 4 * 64 * sum(n * n for n in lengths) / 2


def test_varlen_suite_runs_on_the_cpu(tmp_path, capsys):
    """The packed call, the padded SDPA baseline and llmkit's padded call agree at a small shape."""
    from llmkit.bench.suites_varlen_attention import length_mix

    assert length_mix(100, 4, 24) == length_mix(100, 4, 24) and sum(length_mix(100, 4, 24)) == 100
    out = tmp_path / "res"
    code = cli.main(
        ["bench", "--quick", "--op", "varlen_attention", "--seconds", "0.003", "--no-plots", "--out", str(out)]
    )
    rows = json.loads((out / "quick.json").read_text())["results"]
    assert code == 0, capsys.readouterr().out
    ok = {r["impl"] for r in rows if r["status"] == "ok"}
    assert {"eager", "llmkit[reference]", "llmkit[reference]+padded"} <= ok
    assert {r["pass"] for r in rows} == {"fwd", "bwd"}


def test_work_rates_and_roofline_fraction():
    w = Fm.Work(2e12, 1e9)
    assert w.tflops(2.0) == pytest.approx(1.0)
    assert w.gbps(0.5) == pytest.approx(2.0)
    r = Roofline(copy_gbps=2000.0, bf16_tflops=800.0, int8_tops=1600.0)
    assert fraction(1500.0, "memory", torch.bfloat16, r) == pytest.approx(0.75)
    assert fraction(400.0, "compute", torch.bfloat16, r) == pytest.approx(0.5)
    assert fraction(400.0, "compute", torch.float16, r) == pytest.approx(0.5)  # same tensor cores
    assert fraction(400.0, "compute", torch.float32, r) is None  # no measured fp32 ceiling
    assert fraction(800.0, "int8", torch.bfloat16, r) == pytest.approx(0.5)
    assert fraction(800.0, "memory", torch.bfloat16, None) is None
    assert fraction(None, "memory", torch.bfloat16, r) is None
    assert Fm.fraction_of_roofline(math.nan, 10.0) is None
    assert Fm.fraction_of_roofline(5.0, 0.0) is None
    assert roof_for("memory", torch.float32) == "bandwidth"
    with pytest.raises(ValueError, match="unknown bound"):
        roof_for("latency", torch.float32)
    with pytest.raises(ValueError, match="unknown roof kind"):
        r.roof("fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_roofline_measurement_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        measure_roofline(1 << 20, 256, None)


def test_sample_statistics():
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    s = make_sample([1.0, 2.0, 3.0, 4.0], 10, "m")
    assert (s.median_s, s.q25_s, s.q75_s, s.min_s, s.max_s) == (2.5, 1.75, 3.25, 1.0, 4.0)
    assert s.spread == pytest.approx(1.5 / 2.5)
    assert quantile([7.0], 0.25) == 7.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


# --------------------------------------------------------------------------------------
# shapes file, selection
# --------------------------------------------------------------------------------------


def test_shapes_file_is_versioned_and_covers_every_suite():
    shapes = load_shapes()
    assert isinstance(shapes.version, int)
    for name in SUITES:
        for set_name in ("gpu", "cpu", "quick"):
            assert shapes.points(name, set_name), (name, set_name)
    for name in (
        "layer_norm",
        "rms_norm",
        "add_layer_norm",
        "gelu",
        "bias_gelu",
        "attention",
        "decode_attention",
        "quantize_int8",
        "int8_w8a8",
        "int8_w8a16",
        "bert",
        "gpt2_prefill",
        "gpt2_decode",
    ):
        assert name in SUITES
    # the CPU targets of the other issues are in the cpu sets
    assert {"M": 512, "N": 4096, "K": 4096} in shapes.points("int8_w8a8", "cpu")
    assert {p["M"] for p in shapes.points("int8_w8a16", "cpu")} >= {1, 16}
    assert {"model": "bert-base", "B": 16, "S": 128} in shapes.points("bert", "cpu")
    assert shapes.points("gpt2_decode", "cpu")[0]["model"] == "gpt2-small"
    with pytest.raises(KeyError, match="no shape set 'huge'"):
        shapes.points("gelu", "huge")


def test_check_shapes_names_every_problem():
    bad = {
        "version": "1",
        "models": {},
        "suites": {
            "a": {"x": "N", "sets": {"s": [{"M": 1}]}},
            "b": {"x": "N", "sets": {"s": [{"N": -1}, {"N": 2, "model": "nope"}]}},
            "c": {"sets": {}},
        },
    }
    problems = "\n".join(check_shapes(bad))
    assert "'version' must be an integer" in problems
    assert "suite a, set s, point 0: lacks the x key 'N'" in problems
    assert "suite b, set s, point 0: N must be a non-negative integer, got -1" in problems
    assert "unknown model 'nope'" in problems
    assert "suite c: needs 'x'" in problems
    assert check_shapes(json.loads(Path(load_shapes().path).read_text())) == []


def test_point_labels_and_groups():
    p = {"B": 2, "S": 128, "D": 64, "causal": True}
    assert point_label(p) == "B=2 S=128 D=64 causal"
    assert group_key(p, "S") == "B=2 D=64 causal"
    assert point_label({"S": 4, "causal": False}) == "S=4"


def test_plan_reports_unknown_and_cuda_only_requests():
    shapes = load_shapes()
    units, skips, set_name = plan(Options(ops=["gelu", "nosuch", "roofline"], quick=True), shapes, torch.device("cpu"))
    assert set_name == "quick"
    assert {u.suite for u in units} == {"gelu"}
    assert {u.pass_ for u in units} == {"fwd", "bwd"}
    why = {s.what: s.reason for s in skips}
    assert why["nosuch"].startswith("unknown suite")
    assert why["roofline"] == "CUDA-only suite on a CPU machine: skipped"
    units, skips, _ = plan(Options(ops=["gelu"], shapes="bert-base", dtypes=["float8"]), shapes, torch.device("cpu"))
    assert not units
    assert any("no shape set 'bert-base'" in s.reason for s in skips)
    assert any(s.what == "dtype float8" for s in skips)


def test_cpu_samples_count_page_faults_per_call():
    """A call that writes a fresh 64 MiB anonymous mapping faults in its pages on every call; a
    call on a small tensor faults none. (The mapping is made directly, not through malloc:
    whether malloc hands a large block back to the kernel on free depends on the allocator's
    state in the process, and once reused, the block faults nothing.)"""
    pytest.importorskip("resource")
    mmap = pytest.importorskip("mmap")
    size = 64 << 20
    chunk = bytes(1 << 20)

    def fresh() -> None:
        m = mmap.mmap(-1, size)
        for _ in range(size // len(chunk)):
            m.write(chunk)  # the first write to each page faults it in
        m.close()

    small = torch.ones(64)
    samples = measure_cpu_interleaved({"fresh": fresh, "small": lambda: small * 2}, CpuBudget(0.05, threads=1))
    fresh, tiny = samples["fresh"].page_faults_per_call, samples["small"].page_faults_per_call
    assert fresh is not None and tiny is not None and tiny < 1
    assert fresh >= 16, fresh  # 16384 pages of 4 KiB; 32 of 2 MiB with transparent huge pages
    # the note says when faults touch at least a quarter of the bytes moved, and not otherwise
    s = make_sample([1e-3], 1, "m", page_faults_per_call=16384.0)
    assert "16384 page faults per call (100% of the bytes it moves)" in page_fault_note(s, 64 << 20)
    assert page_fault_note(s, 1 << 30) == ""
    assert page_fault_note(make_sample([1e-3], 1, "m"), 64 << 20) == ""


# --------------------------------------------------------------------------------------
# output checks, backend selection
# --------------------------------------------------------------------------------------


def test_compare_outputs_catches_wrong_answers():
    ref = torch.randn(64, 32)
    ok, what = compare_outputs(ref * (1 + 1e-6), ref, Impl("x"), torch.float32)
    assert ok and what.startswith("max rel err")
    ok, what = compare_outputs(ref * 1.01, ref, Impl("x"), torch.float32)
    assert not ok and "differs from the baseline" in what
    bad = ref.clone()
    bad[3, 4] = float("nan")
    ok, what = compare_outputs(bad, ref, Impl("x"), torch.float32)
    assert not ok and "NaN" in what
    ok, what = compare_outputs(ref[:, :16], ref, Impl("x"), torch.float32)
    assert not ok and "shape" in what
    ok, what = compare_outputs(
        ref + 0.01 * torch.randn_like(ref), ref, Impl("x", check="sqnr", min_sqnr_db=30), torch.float32
    )
    assert ok and what.startswith("SQNR")
    ok, what = compare_outputs(torch.randn_like(ref), ref, Impl("x", check="cosine"), torch.float32)
    assert not ok and "cosine" in what
    # the largest error of several outputs is the one reported (by value, not as text)
    ok, what = compare_outputs((ref * (1 + 1e-5), ref * (1 + 9e-4)), (ref, ref), Impl("x"), torch.float32)
    assert ok and what == "max rel err 9.0e-04", what


def test_compare_outputs_judges_both_sides_against_float64_when_the_baseline_is_off():
    exact = torch.randn(256, 48, dtype=torch.float64)
    sloppy_baseline = (exact + 0.1 * torch.randn_like(exact)).to(torch.bfloat16)
    accurate = exact.to(torch.bfloat16)
    truth = Truth(lambda: exact)
    # without float64 the accurate implementation looks wrong: it is 0.1 away from the baseline
    ok, what = compare_outputs(accurate, sloppy_baseline, Impl("x"), torch.bfloat16)
    assert not ok and "differs from the baseline" in what
    ok, what = compare_outputs(accurate, sloppy_baseline, Impl("x"), torch.bfloat16, truth)
    assert ok and "against float64" in what, what
    # an implementation further from float64 than twice the baseline's own error still fails
    worse = (exact + 0.5 * torch.randn_like(exact)).to(torch.bfloat16)
    ok, what = compare_outputs(worse, sloppy_baseline, Impl("x"), torch.bfloat16, truth)
    assert not ok and "against float64" in what and "allowed" in what

    # a float64 recomputation that fails keeps the plain verdict and says why
    def broken():
        raise RuntimeError("no double kernel")

    ok, what = compare_outputs(accurate, sloppy_baseline, Impl("x"), torch.bfloat16, Truth(broken))
    assert not ok and "float64 recomputation failed: RuntimeError: no double kernel" in what


def test_truth_recomputes_only_once_and_only_when_asked():
    calls = []
    truth = Truth(lambda: calls.append(1) or (torch.ones(3), torch.zeros(2)))
    assert calls == []
    assert [t.dtype for t in truth.tensors()] == [torch.float64, torch.float64]
    truth.tensors()
    assert calls == [1]


def test_opcall_float64_converts_floating_tensors_only():
    x, idx = torch.randn(5, 7, dtype=torch.bfloat16), torch.arange(5)
    up = OpCall([x, idx, 3], "bwd", wrt=(0,), grads=[torch.randn(5, 7, dtype=torch.float16)]).float64()
    assert up.inputs[0].dtype == torch.float64 and torch.equal(up.inputs[0], x.double())
    assert up.inputs[1] is idx and up.inputs[2] == 3
    assert up.grads[0].dtype == torch.float64 and up.wrt == (0,) and up.pass_ == "bwd"


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
def test_baseline_truth_is_the_eager_computation_in_float64(pass_):
    from llmkit import reference64
    from llmkit.bench.suite import standard_impls

    n = 129
    x = (torch.randn(37, n) * 2 + 1).to(torch.bfloat16)
    w, b = (torch.rand(n) + 0.5).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16)
    dy = torch.randn(37, n).to(torch.bfloat16)
    ctx = Context(torch.device("cpu"), ["reference"], False, load_shapes(None))
    call = OpCall([x, w, b], pass_, wrt=(0, 1, 2), grads=[dy])
    impls = standard_impls(
        ctx, "layer_norm", call, lambda x, w, b: torch.nn.functional.layer_norm(x, (n,), w, b), lambda x, w, b: x
    )
    got = Truth(impls[0].truth).tensors()
    # independently: llmkit.reference64's formula on the inputs in float64 (and its autograd)
    x64, w64, b64 = (t.double().requires_grad_(pass_ == "bwd") for t in (x, w, b))
    y64 = reference64.layer_norm(x64, [n], w64, b64, 1e-5)
    want = [y64] if pass_ == "fwd" else list(torch.autograd.grad(y64, (x64, w64, b64), dy.double()))
    assert len(got) == len(want)
    for g, e in zip(got, want, strict=True):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e.detach(), rtol=1e-9, atol=1e-9)


def test_bf16_layer_norm_weight_grad_is_judged_against_float64():
    """A false positive seen before: eager bf16's own weight gradient is ~5% off over
    2048 rows, so the reference path looked wrong against it."""
    ctx = Context(torch.device("cpu"), ["reference"], False, load_shapes(None))
    case = SUITES["layer_norm"].build(ctx, {"M": 2048, "N": 96}, "bwd", torch.bfloat16)
    base, ref = case.impls[0], next(i for i in case.impls if i.name == "llmkit[reference]")
    _, want = base.run_once()
    _, got = ref.run_once()
    ok, what = compare_outputs(got, want, ref, torch.bfloat16, Truth(base.truth))
    assert ok, what


def test_in_backend_selects_once_and_leaves_the_caller_alone():
    f = in_backend("reference", lambda: requested("gelu"))
    assert f().order == ("reference",)
    assert requested("gelu") is None or requested("gelu").source == "LLMKIT_BACKEND"


# --------------------------------------------------------------------------------------
# rendering and schema on a hand-made report
# --------------------------------------------------------------------------------------


def _hand_report() -> Report:
    def res(impl, median, vs, status="ok", reason="", frac=None):
        sample = make_sample([median * 0.9, median, median * 1.1], 5, "test") if status == "ok" else None
        w = Fm.layer_norm(4096, 1024, 2)
        return Result(
            "layer_norm",
            "fwd",
            "bfloat16",
            "cuda",
            {"M": 4096, "N": 1024},
            "M=4096 N=1024",
            "M=4096",
            1024,
            impl,
            status,
            reason=reason,
            check="baseline" if impl == "eager" else "",
            sample=sample,
            flops=w.flops,
            bytes=w.bytes,
            gbps=w.gbps(median) if sample else None,
            vs_eager=vs,
            roofline="bandwidth",
            fraction_of_roofline=frac,
            x_name="N",
            bound="memory",
            peak_mem_bytes=8 << 20 if sample else None,
        )

    rows = [
        res("eager", 2e-3, 1.0, frac=0.3),
        res("llmkit[triton]", 1e-3, 2.0, frac=0.6),
        res("liger-kernel", 0.0, None, "skipped", "could not set up"),
    ]
    env = {
        "device": "cuda",
        "device_name": "Test GPU",
        "driver": "1.0",
        "cuda": "12.8",
        "torch": "2.13",
        "triton": "3.9",
        "llmkit": "0.1.0",
        "git_commit": "abc",
        "date": "2026-01-01T00:00:00+00:00",
        "command": "llmkit bench --op layer_norm",
        "python": "3.11",
        "threads": 1,
        "capability": "sm_90",
    }
    roof = Roofline(copy_gbps=3000.0, bf16_tflops=700.0, int8_tops=1400.0, copy_bytes=1 << 30, matmul_size=8192)
    return Report(
        env,
        {"quick": False},
        "bench/shapes.json",
        1,
        "gpu",
        roof,
        ["a note"],
        rows,
        [Skip("nosuch", "unknown suite")],
        elapsed_s=1.5,
    )


def test_table_and_markdown_show_ratios_fractions_and_skips():
    rep = _hand_report()
    table = format_table(rep)
    assert "layer_norm fwd bfloat16 (cuda)" in table
    assert "roofline (measured now): copy 3000 GB/s, bf16 matmul 700 TFLOP/s, int8 _int_mm 1400 TOP/s" in table
    line = next(x for x in table.splitlines() if "llmkit[triton]" in x)
    assert "1 ms" in line and "2.00x" in line and "60%" in line and "8 MiB" in line
    assert f"{Fm.layer_norm(4096, 1024, 2).gbps(1e-3):.3g}" in line
    assert "SKIPPED: could not set up" in table
    assert "skipped: nosuch: unknown suite" in table
    assert "2 measured, 1 skipped, 0 failed, 0 not applicable, 1 requests skipped" in table
    assert rep.exit_code == 3
    md = format_markdown(rep)
    assert md.startswith("# llmkit bench: Test GPU")
    assert "| command | `llmkit bench --op layer_norm` |" in md
    body = [x for x in md.splitlines() if x.startswith("| M=4096 N=1024") or x.startswith("|  |")]
    assert len(body) == 3 and all(x.count("|") == 10 for x in body)


def test_plot_of_a_gpu_report_draws_the_roofline(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="plots need the bench extra: pip install 'llmkit[bench]'")
    import matplotlib.axes

    from llmkit.bench.plot import write_plots

    lines = []
    real = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes, "axhline", lambda self, y, *a, **k: lines.append(y) or real(self, y, *a, **k)
    )
    files, why = write_plots(_hand_report(), tmp_path)
    assert why is None
    assert [f.name for f in files] == ["layer_norm-fwd-bfloat16.png"]
    assert files[0].read_bytes()[:4] == b"\x89PNG"
    assert lines == [3000.0]  # the copy bandwidth of the run, in the plot's unit (GB/s)


def test_fmt_time():
    assert fmt_time(1.5e-3) == "1.5 ms"
    assert fmt_time(2.5) == "2.5 s"
    assert fmt_time(456e-6) == "456 us"
    assert fmt_time(7.5e-8) == "75 ns"
    assert fmt_time(None) == "-"


def test_schema_accepts_a_report_and_rejects_broken_ones():
    doc = report_json(_hand_report())
    assert validate(doc) == []
    broken = json.loads(json.dumps(doc))
    del broken["environment"]["git_commit"]
    broken["results"][0]["status"] = "fast"
    broken["results"][1]["sample"]["median_s"] = -1.0
    broken["results"][1]["peak_mem_bytes"] = "8 MiB"
    broken["schema"] = "other/1"
    errors = "\n".join(validate(broken))
    assert "$.environment: lacks required key 'git_commit'" in errors
    assert "$.results[0].status: must be one of" in errors
    assert "$.results[1].sample.median_s: must be >= 0" in errors
    assert "$.results[1].peak_mem_bytes: must be of type integer/null" in errors
    assert "$.schema: must be 'llmkit-bench/1'" in errors
    assert SCHEMA["properties"]["schema"]["const"] == "llmkit-bench/1"


def test_progress_bar_draws_when_forced():
    buf = io.StringIO()
    bar = ProgressBar(4, stream=buf, force=True, width=8)
    bar.update(2, "gelu fwd")
    bar.close()
    out = buf.getvalue()
    assert "[####....] 2/4 gelu fwd" in out and "[########] 4/4 done" in out and out.endswith("\n")
    silent = io.StringIO()
    ProgressBar(4, stream=silent).update(1, "x")
    assert silent.getvalue() == ""


# --------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------


def test_tiny_quick_run_writes_table_json_markdown_and_png(tmp_path, capsys):
    out = tmp_path / "res"
    code = cli.main(
        [
            "bench",
            "--quick",
            "--op",
            "layer_norm,gelu",
            "--op",
            "int8_w8a8",
            "--op",
            "gpt2_prefill",
            "--seconds",
            "0.003",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    doc = json.loads((out / "quick.json").read_text())
    assert validate(doc) == [], validate(doc)[:5]
    assert code == doc["exit_code"]
    assert code in (0, 3), printed  # 3: some llmkit part not built yet, reported as skipped
    assert "layer_norm fwd float32 (cpu)" in printed and "gpt2_prefill prefill float32 (cpu)" in printed
    env = doc["environment"]
    assert (
        env["command"] == "llmkit bench --op layer_norm,gelu --op int8_w8a8 --op gpt2_prefill "
        "--seconds 0.003 --out " + str(out) + " --quick"
    )
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    rows = doc["results"]
    assert {r["suite"] for r in rows} == {"layer_norm", "gelu", "int8_w8a8", "gpt2_prefill"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"eager", "llmkit[reference]", "torch._int_mm+dequant"}
    assert not [r for r in rows if r["status"] == "error"], [r["reason"] for r in rows if r["status"] == "error"]
    for r in rows:
        if r["status"] == "skipped":
            assert r["reason"]
    for r in ok:
        s = r["sample"]
        assert s["min_s"] <= s["median_s"] <= s["max_s"] and len(s["times_s"]) >= 3
        if r["gbps"] is not None:
            assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        if r["impl"] == "eager":
            assert r["vs_eager"] == 1.0
    ln = next(r for r in ok if r["suite"] == "layer_norm" and r["pass"] == "bwd" and r["impl"] == "eager")
    assert ln["bytes"] == Fm.layer_norm(ln["shape"]["M"], ln["shape"]["N"], 4, backward=True).bytes
    md = (out / "quick.md").read_text()
    assert "## layer_norm bwd float32 (cpu)" in md and "| llmkit[reference] |" in md
    pngs = sorted((out / "quick-plots").glob("*.png"))
    if matplotlib_missing() is not None:  # installed without the bench extra: no PNG, and the run says why
        assert pngs == [] and "no plots: matplotlib is not installed" in printed
        return
    assert {p.name for p in pngs} >= {"layer_norm-fwd-float32.png", "gelu-bwd-float32.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_a_wrong_implementation_is_an_error_not_a_speedup(tmp_path, monkeypatch, capsys):
    impl = OPS["gelu"]["forward"].impls["reference"]
    good = impl.fn
    monkeypatch.setattr(impl, "fn", lambda c: good(c) * 1.05)
    code = cli.main(
        [
            "bench",
            "--quick",
            "--op",
            "gelu",
            "--pass",
            "fwd",
            "--seconds",
            "0.003",
            "--no-plots",
            "--out",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1
    assert "ERROR: wrong output: output 0 differs from the baseline" in printed
    doc = json.loads((tmp_path / "quick.json").read_text())
    bad = [r for r in doc["results"] if r["impl"] == "llmkit[reference]"]
    assert bad and all(r["status"] == "error" and r["median_s"] is None for r in bad)


def test_bad_requests_are_skipped_with_reasons_and_the_rest_runs(tmp_path, capsys):
    code = cli.main(
        [
            "bench",
            "--quick",
            "--op",
            "nosuch",
            "--op",
            "roofline",
            "--op",
            "gelu",
            "--pass",
            "fwd",
            "--backend",
            "reference",
            "--backend",
            "cuda_ext",
            "--seconds",
            "0.003",
            "--no-plots",
            "--out",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 3
    assert "skipped: nosuch: unknown suite" in printed
    if not torch.cuda.is_available():
        assert "skipped: roofline: CUDA-only suite on a CPU machine: skipped" in printed
    doc = json.loads((tmp_path / "quick.json").read_text())
    assert any(
        r["suite"] == "gelu" and r["impl"] == "llmkit[reference]" and r["status"] == "ok" for r in doc["results"]
    )
    from llmkit.dispatch import BACKENDS

    if BACKENDS["cuda_ext"].unavailable_reason("cpu"):
        assert any(s["what"] == "backend cuda_ext" for s in doc["skipped"])
    # nothing runnable at all: exit 2 (docs/benchmarks.md) and no result files
    empty = tmp_path / "empty"
    assert (
        cli.main(["bench", "--quick", "--op", "gelu", "--shapes", "nosuchset", "--no-plots", "--out", str(empty)]) == 2
    )
    assert "no shape set 'nosuchset'" in capsys.readouterr().out
    assert cli.main(["bench", "--op", "nosuch", "--no-plots", "--out", str(empty)]) == 2
    assert "nothing ran: no result files written" in capsys.readouterr().out
    assert not empty.exists()


def test_a_backend_declining_a_case_is_not_applicable_unless_asked_for(tmp_path, monkeypatch, capsys):
    impl = OPS["gelu"]["forward"].impls["reference"]
    monkeypatch.setattr(impl, "why_not", lambda *a, **k: ["this test declines"])
    argv = [
        "bench",
        "--quick",
        "--op",
        "gelu",
        "--pass",
        "fwd",
        "--seconds",
        "0.002",
        "--no-plots",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "N/A: backend cannot take this case (reference: this test declines)" in out
    assert cli.main(argv + ["--backend", "reference"]) == 3
    doc = json.loads((tmp_path / "quick.json").read_text())
    assert {r["status"] for r in doc["results"] if r["impl"] == "llmkit[reference]"} == {"skipped"}


def test_missing_matplotlib_means_no_png_said_so(tmp_path, monkeypatch, capsys):
    import llmkit.bench.plot as P

    monkeypatch.setattr(P, "matplotlib_missing", lambda: "matplotlib is not installed (test)")
    code = cli.main(["bench", "--quick", "--op", "gelu", "--pass", "fwd", "--seconds", "0.003", "--out", str(tmp_path)])
    assert code in (0, 3)
    assert "no plots: matplotlib is not installed (test)" in capsys.readouterr().out
    assert not (tmp_path / "quick-plots").exists()


def test_list_names_every_suite(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in SUITES:
        assert f"  {name} " in out
    assert "roofline" in out and "CUDA only" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_run_on_the_gpu_measures_the_roofline(tmp_path):
    code = cli.main(["bench", "--quick", "--op", "layer_norm", "--out", str(tmp_path), "--no-plots"])
    doc = json.loads((tmp_path / "quick.json").read_text())
    assert validate(doc) == []
    assert code in (0, 3)
    roof = doc["roofline"]
    assert roof["copy_gbps"] > 0 and roof["bf16_tflops"] > 0 and roof["int8_tops"] > 0
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert ok and all(r["fraction_of_roofline"] is not None and r["peak_mem_bytes"] is not None for r in ok)


# --------------------------------------------------------------------------------------
# bench/results summary
# --------------------------------------------------------------------------------------


def test_results_summary_table(tmp_path, capsys):
    from llmkit.bench.summary import build_readme, main

    dev = tmp_path / "test-gpu"
    dev.mkdir()
    (dev / "bench.json").write_text(json.dumps(report_json(_hand_report())))
    (dev / "notes.json").write_text(json.dumps({"something": "else"}))
    broken = report_json(_hand_report())
    del broken["results"][0]["impl"]
    (dev / "broken.json").write_text(json.dumps(broken))
    text = build_readme(tmp_path)
    assert "## test-gpu" in text
    assert "| layer_norm fwd bfloat16 M=4096 N=1024 | 2 ms | llmkit[triton] 1 ms | 2.00x | 60% | - | - |" in text
    assert "roofline: copy 3000 GB/s, bf16 matmul 700 TFLOP/s, int8 1400 TOP/s" in text
    assert "command: `llmkit bench --op layer_norm`" in text
    assert "### test-gpu/notes.json\n\nnot an llmkit bench result" in text
    assert "### test-gpu/broken.json\n\nbreaks the result schema" in text
    assert main([str(tmp_path), "--check"]) == 1
    assert main([str(tmp_path)]) == 0
    assert main([str(tmp_path), "--check"]) == 0
    assert (tmp_path / "README.md").read_text() == text


def test_committed_results_readme_is_up_to_date():
    from llmkit.bench.summary import main

    assert main(["--check"]) == 0, "run python bench/results/summarize.py"
