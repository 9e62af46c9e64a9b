"""``llmkit check``: the sweep it covers, and that it fails when a backend is wrong.

Each "wrong backend" test breaks one implementation in a specific way (a scaled
forward, a scaled gradient, a half-written output, an exception, a refusal) and checks
that exactly the affected outputs fail, with a non-zero exit code.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmkit import cli
from llmkit.check import NORM_SHAPES, all_cases, laid_out, plan_check, run_check
from llmkit.dispatch import BACKENDS, OPS, triton_interpreting


def _triton_on_cpu_reason(op: str) -> str | None:
    if BACKENDS["triton"].unavailable_reason("cpu"):
        return BACKENDS["triton"].unavailable_reason("cpu")
    if not all("triton" in p.impls for p in OPS[op].values()):
        return f"no Triton implementation of {op} yet"
    return None


# --------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------


def test_sweep_follows_the_design_rules():
    cases = all_cases()
    ops = {c.op for c in cases}
    assert ops == {
        "layer_norm",
        "rms_norm",
        "add_layer_norm",
        "add_rms_norm",
        "gelu",
        "bias_gelu",
        "geglu",
        "swiglu",
        "attention",
        "decode_attention",
        "varlen_attention",
        "quantize_int8",
        "int8_matmul",
        "int8_linear",
    }
    cpu = torch.device("cpu")
    for op in ops:
        mine = [c for c in cases if c.op == op]
        made = [[v for v in c.make(cpu).values() if isinstance(v, torch.Tensor)] for c in mine]
        # empty tensors and non-contiguous inputs for every op
        assert any(any(t.numel() == 0 for t in ts) for ts in made), op
        assert any(any(not t.is_contiguous() for t in ts) for ts in made), op
        if op != "int8_matmul":
            assert {c.dtype for c in mine} >= {torch.float32, torch.float16, torch.bfloat16}, op
    # odd sizes and rows past every block size
    norm_sizes = {s[-1] for s, *_ in NORM_SHAPES}
    assert {1, 33, 1500, 4097, 65537} <= norm_sizes
    large = [c for c in cases if "65537" in c.label]
    assert large and all(not c.interp and not c.quick for c in large)
    assert any(c.dtype == torch.float64 for c in cases)


@pytest.mark.parametrize("layout", ["rows", "permuted", "transposed"])
def test_layouts_keep_values_and_change_strides(layout):
    t = torch.randn(4, 6) if layout == "transposed" else torch.randn(3, 4, 6)
    v = laid_out(t, layout)
    assert torch.equal(v, t)
    assert not v.is_contiguous()
    if layout == "rows":
        assert v.stride(-2) == 6 + 9 and v.stride(-1) == 1
    with pytest.raises(ValueError, match="unknown layout"):
        laid_out(t, "diagonal")


def test_reference_backend_passes_the_quick_sweep():
    rows = run_check(backends=["reference"], quick=True)
    failed = [(r.op, r.dtype, r.shape, r.output, r.note) for r in rows if r.status == "FAIL"]
    assert not failed, failed[:10]
    ops = {r.op for r in rows}
    assert ops == {c.op for c in all_cases()}
    # backward is checked: every differentiable op has gradient rows, including on empty inputs
    for op in (
        "layer_norm",
        "rms_norm",
        "add_layer_norm",
        "add_rms_norm",
        "gelu",
        "bias_gelu",
        "geglu",
        "swiglu",
        "attention",
        "varlen_attention",
    ):
        grads = [r for r in rows if r.op == op and r.output.startswith("grad_")]
        assert grads, op
    assert any(r.shape.startswith("0x33") and r.output == "grad_input" for r in rows if r.op == "layer_norm")


def test_interpreter_leaves_out_only_the_large_cases():
    if not triton_interpreting() or BACKENDS["triton"].unavailable_reason("cpu"):
        pytest.skip("the Triton interpreter is not in use")
    plan = plan_check(ops=["layer_norm"], backends=["triton"])
    assert all(c.interp for c, _, _ in plan.work)
    if "triton" in OPS["layer_norm"]["forward"].impls:
        assert any("large cases left out" in n for n in plan.notes)


# --------------------------------------------------------------------------------------
# a wrong backend makes check fail
# --------------------------------------------------------------------------------------


def _break(monkeypatch, op: str, stage: str, backend: str, wrap):
    impl = OPS[op][stage].impls[backend]
    monkeypatch.setattr(impl, "fn", wrap(impl.fn))


def test_a_wrong_gradient_fails_exactly_the_gradient(monkeypatch, capsys, tmp_path):
    def wrap(good):
        def bad(*args):
            dx, dw, db = good(*args)
            return dx * 1.01, dw, db

        return bad

    _break(monkeypatch, "layer_norm", "backward", "reference", wrap)
    path = tmp_path / "c.json"
    code = cli.main(
        ["check", "--quick", "--op", "layer_norm", "--backend", "reference", "--dtype", "float32", "--json", str(path)]
    )
    assert code == 1
    doc = json.loads(path.read_text())
    assert doc["exit_code"] == 1 and doc["environment"]["torch"] == torch.__version__
    by_output = {}
    for r in doc["rows"]:
        by_output.setdefault(r["output"], set()).add(r["status"])
    assert by_output["out"] == {"PASS"} and by_output["grad_weight"] == {"PASS"}
    assert "FAIL" in by_output["grad_input"]
    # an empty input has nothing to be wrong about
    assert all(r["status"] == "PASS" for r in doc["rows"] if r["shape"].startswith("0x"))
    assert all(r["max_abs_err"] is None or r["max_abs_err"] >= 0 for r in doc["rows"])


def test_a_half_written_output_fails(monkeypatch):
    def wrap(good):
        def bad(c):
            y = good(c).clone()
            if y.numel() > 1:
                y.view(-1)[-1] = float("nan")  # "forgot" the last element
            return y

        return bad

    _break(monkeypatch, "gelu", "forward", "reference", wrap)
    rows = run_check(ops=["gelu"], backends=["reference"], quick=True, dtypes=["bfloat16"])
    fails = [r for r in rows if r.status == "FAIL"]
    assert fails and all(r.output == "out" for r in fails)
    assert all(r.max_abs_err == float("inf") for r in fails)


def test_an_exception_fails_and_a_refusal_skips(monkeypatch, capsys):
    def boom(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(OPS["rms_norm"]["forward"].impls["reference"], "fn", boom)
    assert cli.main(["check", "--quick", "--op", "rms_norm", "--backend", "reference", "--dtype", "float16"]) == 1
    assert "RuntimeError: kernel exploded" in capsys.readouterr().out
    monkeypatch.undo()

    impl = OPS["rms_norm"]["forward"].impls["reference"]
    monkeypatch.setattr(impl, "why_not", lambda *a, **k: ["this test declines"])
    code = cli.main(["check", "--quick", "--op", "rms_norm", "--backend", "reference", "--dtype", "float16"])
    out = capsys.readouterr().out
    assert "SKIP  (this test declines)" in out
    assert code == 0  # a backend that says it cannot take a case is not a failure


def test_unknown_names_are_skipped_and_the_rest_runs(capsys):
    code = cli.main(
        [
            "check",
            "--quick",
            "--op",
            "layernorm",
            "--op",
            "quantize_int8",
            "--backend",
            "reference",
            "--dtype",
            "float32",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 3
    assert "unknown op 'layernorm'" in err and "skipped: unknown op 'layernorm'" in out
    assert "quantize_int8" in out and " 0 failed" in out
    assert cli.main(["check", "--op", "layernorm"]) == 2
    if BACKENDS["cuda_ext"].unavailable_reason("cpu") and not torch.cuda.is_available():
        capsys.readouterr()
        code = cli.main(
            [
                "check",
                "--quick",
                "--op",
                "gelu",
                "--backend",
                "reference",
                "--backend",
                "cuda_ext",
                "--dtype",
                "float32",
            ]
        )
        assert code == 3
        assert "skipped: backend cuda_ext is not available here" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# Triton through the interpreter
# --------------------------------------------------------------------------------------


def test_triton_interpreter_checks_gelu():
    why = _triton_on_cpu_reason("gelu")
    if why:
        pytest.skip(why)
    rows = run_check(ops=["gelu"], backends=["triton"], quick=True, dtypes=["float32"])
    assert rows and {r.backend for r in rows} == {"triton"}
    failed = [(r.shape, r.output, r.note) for r in rows if r.status != "PASS"]
    assert not failed, failed
    shapes = {r.shape for r in rows}
    assert any("transposed" in s for s in shapes) and any(s.startswith("0x33") for s in shapes)
    assert {r.output for r in rows} == {"out", "grad_input"}


def test_a_wrong_triton_kernel_fails(monkeypatch):
    why = _triton_on_cpu_reason("bias_gelu")
    if why:
        pytest.skip(why)

    def wrap(good):
        return lambda c: good(c) + 1e-2

    _break(monkeypatch, "bias_gelu", "forward", "triton", wrap)
    rows = run_check(ops=["bias_gelu"], backends=["triton"], quick=True, dtypes=["float32"])
    outs = [r for r in rows if r.output == "out" and not r.shape.startswith("0x")]
    assert outs and all(r.status == "FAIL" for r in outs)
