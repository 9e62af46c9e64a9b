"""bench/gpu_round.py, the one-shot GPU acceptance run: its dry run on this CPU (so that
the script cannot rot between the rare GPU runs), its time limits (SIGINT first, so what
ran is kept; SIGKILL after), the toolkit search, and how results are read back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # gpu_round imports gpu_round_env and gpu_round_report by name
    spec.loader.exec_module(mod)
    return mod


REPORT = _load("gpu_round_report")
_load("gpu_round_env")
G = _load("gpu_round")

GPU_STEPS = (
    "install",
    "build-ext",
    "pytest-rows",
    "pytest-attention",
    "check-triton-attention",
    "check-triton-rows",
    "pytest-rest",
    "pytest-ext",
    "check-cuda-ext",
    "bench-attention",
    "bench-norms",
    "bench-int8",
    "bench-models",
)
SMOKE_STEPS = ("versions", "shapes", "info", "pytest-collect", "pytest-smoke", "check-smoke", "bench-smoke")


def test_dry_run_writes_its_summary_in_a_few_flat_files(tmp_path):
    """Without a GPU: nothing installed, built or run on a GPU, and the summary says so;
    the smoke steps run the same tools on the CPU and their results are read back."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_round.py"),
            "--dry-run",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--budget",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    entries = list(out.iterdir())
    assert sorted(p.name for p in entries) == sorted(REPORT.RESULT_FILES)
    assert len(entries) <= 8 and all(p.is_file() for p in entries)  # what the device tool brings back
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in entries)

    md = (out / "summary.md").read_text()
    assert "DRY RUN (--dry-run): the GPU steps did not run." in md
    doc = json.loads((out / "summary.json").read_text())
    assert doc["dry_run"] is True and doc["gpu_steps_ran"] is False
    steps = {s["name"]: s for s in doc["steps"]}
    for name in GPU_STEPS:
        assert steps[name]["status"] == "not run", steps[name]
        assert steps[name]["command"], name  # what a GPU run would start, listed
    for name in SMOKE_STEPS:
        log = (tmp_path / "work" / steps[name]["log"]).read_text()
        assert steps[name]["status"] == "ok", (steps[name], log[-3000:])
    assert re.fullmatch(r"\d+ tests collected", steps["pytest-collect"]["note"])
    # the GPU commands: real kernels, CUDA, the reduced bf16 benchmark set without torch.compile
    assert "--device cuda --backend triton" in steps["check-triton-rows"]["command"]
    assert "--device cuda --backend cuda_ext" in steps["check-cuda-ext"]["command"]
    bench = steps["bench-models"]["command"]
    assert "--shapes round --dtype bfloat16 --no-compile" in bench and "gpt2_prefill,gpt2_decode,bert" in bench
    assert "build-ext --cuda --arch 9.0" in steps["build-ext"]["command"]
    assert "--no-index --no-deps --no-build-isolation" in steps["install"]["command"]

    ops = {r["op"]: r for r in doc["ops"]}
    assert set(REPORT.OPS) <= set(ops)
    assert not any(r["ran_on_gpu"] for r in ops.values())
    assert "| gelu | no |" in md
    assert ops["gelu"]["check"]["PASS"] > 0 and ops["gelu"]["check"]["FAIL"] == 0
    assert ops["gelu"]["speed"]["passes"]["fwd"]["llmkit[reference]"]["geomean_vs_eager"] > 0
    counts = doc["tests"]["counts"]
    assert counts["passed"] >= 10 and counts["failed"] == counts["error"] == 0
    assert len(list(ET.parse(out / "junit.xml").getroot().iter("testcase"))) == counts["passed"] + counts["skipped"]
    assert set(json.loads((out / "check.json").read_text())["runs"]) == {"check-smoke"}
    assert set(json.loads((out / "bench.json").read_text())["runs"]) == {"bench-smoke"}
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/pytest-smoke.xml" in names and "logs/round.log" in names
    assert any(n.endswith("-bench-smoke.log") for n in names)


def _round(tmp_path: Path, budget: float = 120) -> G.Round:
    return G.Round(tmp_path / "out", tmp_path / "work", budget, dry_run=False, env=dict(os.environ))


def test_a_timed_out_pytest_step_keeps_its_junit_xml(tmp_path):
    """A step past its time limit gets SIGINT: pytest stops and still writes the JUnit XML
    of the tests that ran; the other steps are not touched."""
    test = tmp_path / "t" / "test_slow.py"
    test.parent.mkdir()
    test.write_text(
        textwrap.dedent("""
        import time
        def test_a(): pass
        def test_b(): assert 1 + 1 == 2
        def test_slow(): time.sleep(300)
    """)
    )
    rnd = _round(tmp_path)
    xml = tmp_path / "slow.xml"
    slow = rnd.start(
        G.Step(
            "slow",
            "pytest",
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={xml}", str(test)],
            cap_s=12,
            min_s=1,
            output=str(xml),
        )
    )
    quick = rnd.start(G.Step("quick", "info", [sys.executable, "-c", "print('fine')"], cap_s=60, min_s=1))
    t0 = time.monotonic()
    rnd.wait(slow, quick)
    assert time.monotonic() - t0 < 12 + G.KILL_AFTER_S + 10
    assert slow.status == "timeout" and quick.status == "ok"
    got = {t["nodeid"].split("::")[-1]: t["outcome"] for t in REPORT.read_junit(xml)}
    assert got.get("test_a") == "passed" and got.get("test_b") == "passed", got
    assert (tmp_path / "out" / "summary.md").is_file()  # rewritten after every step


def test_a_step_ignoring_sigint_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "KILL_AFTER_S", 1)
    rnd = _round(tmp_path)
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
    step = rnd.run(G.Step("stubborn", "info", [sys.executable, "-c", code], cap_s=3, min_s=1))
    assert step.status == "timeout" and step.rc is not None and step.rc < 0
    assert step.seconds < 3 + 1 + 10


def test_a_step_without_time_left_is_skipped_with_the_reason(tmp_path):
    rnd = _round(tmp_path, budget=30)
    step = rnd.start(G.Step("late", "bench", [sys.executable, "-c", "pass"], reserve_s=20, min_s=10))
    assert step.status == "skipped" and "no time left" in step.note
    assert rnd.running == []


def test_cuda_home_is_the_toolkit_not_a_wrapper_folder(tmp_path):
    def toolkit(path: Path) -> Path:
        (path / "bin").mkdir(parents=True)
        (path / "include").mkdir()
        (path / "bin" / "nvcc").write_text("#!/bin/sh\n")
        (path / "bin" / "nvcc").chmod(0o755)
        (path / "include" / "cuda_runtime.h").write_text("")
        return path

    real = toolkit(tmp_path / "cuda-12.9")
    wrap = tmp_path / "wrap" / "bin"  # a wrapper script: torch would guess tmp/wrap
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    link = tmp_path / "link" / "bin"  # a symbolic link into the toolkit
    link.mkdir(parents=True)
    (link / "nvcc").symlink_to(real / "bin" / "nvcc")
    none = str(tmp_path / "nothing")
    kw = {"roots": (), "versioned": none}
    assert G.find_cuda_home({"PATH": str(link)}, **kw) == str(real)
    assert G.find_cuda_home({"PATH": str(wrap)}, **kw) is None
    assert G.find_cuda_home({"PATH": str(wrap)}, roots=(), versioned=str(tmp_path)) == str(real)
    assert G.find_cuda_home({"PATH": str(wrap), "CUDA_HOME": str(real)}, **kw) == str(real)
    assert G.find_cuda_home({"PATH": str(wrap), "CUDA_HOME": none}, roots=(str(real),), versioned=none) == str(real)


def test_tests_using_the_extension_run_after_its_build(tmp_path):
    """A test that loads or builds the extension must not run beside the build step (it
    would build it a second time into the same cache)."""
    files = {
        "test_a.py": "def test_x(ext, device):\n    pass\n",
        "test_b.py": "@pytest.fixture\ndef here(request):\n    return request.getfixturevalue('ext')\n",
        "test_c.py": "res = _ext.build(verbose=False)\n",
        "test_d.py": "def test_next(text):\n    assert 'ext' in text\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert [Path(p).name for p in G.tests_using_extension(tmp_path)] == ["test_a.py", "test_b.py", "test_c.py"]
    found = {Path(p).name for p in G.tests_using_extension()}
    assert "test_cuda_ext.py" in found and "test_cuda_ext_limits.py" in found and "test_gelu.py" not in found


@pytest.mark.parametrize(
    "nodeid, op",
    [
        ("tests/test_layer_norm.py::test_rms_norm_backward[cuda-float32]", "rms_norm"),
        ("tests/test_layer_norm.py::test_add_layer_norm_fused[x]", "add_layer_norm"),
        ("tests/test_layer_norm.py::test_large_rows", "layer_norm"),
        ("tests/test_gelu.py::test_bias_gelu_tanh", "bias_gelu"),
        ("tests/test_decode_attention.py::test_splits", "decode_attention"),
        ("tests/test_attention.py::test_gqa", "attention"),
        ("tests/test_reference.py::test_reference_backend_meets_the_rule[int8_linear]", "int8_linear"),
        ("tests/test_swap.py::test_swap_report", REPORT.OTHER),
    ],
)
def test_tests_are_counted_for_the_op_they_are_about(nodeid, op):
    assert REPORT.op_of_test(nodeid) == op


def test_junit_outcomes_are_read_back(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="5">'
        '<testcase classname="tests.test_gelu" name="test_gelu_ok[cuda]" time="0.1"/>'
        '<testcase classname="tests.test_gelu" name="test_gelu_bad" time="0.1">'
        '<failure message="AssertionError: max abs error 3 exceeds">trace</failure></testcase>'
        '<testcase classname="tests.test_attention.TestMasks" name="test_bool" time="0.1">'
        '<error message="fixture failed">trace</error></testcase>'
        '<testcase classname="tests.test_attention" name="test_skip" time="0"><skipped message="needs 2 GPUs"/>'
        '</testcase><testcase classname="tests.test_models" name="test_gpt" time="1"/>'
        "</testsuite></testsuites>"
    )
    got = REPORT.read_junit(xml)
    assert [(t["nodeid"], t["outcome"]) for t in got] == [
        ("tests/test_gelu.py::test_gelu_ok[cuda]", "passed"),
        ("tests/test_gelu.py::test_gelu_bad", "failed"),
        ("tests/test_attention.py::TestMasks::test_bool", "error"),
        ("tests/test_attention.py::test_skip", "skipped"),
        ("tests/test_models.py::test_gpt", "passed"),
    ]
    assert got[1]["message"] == "AssertionError: max abs error 3 exceeds"


def test_speed_is_the_geometric_mean_of_llmkit_against_eager():
    def res(impl, ratio, pass_="fwd", status="ok", roof=None):
        return {
            "suite": "layer_norm",
            "pass": pass_,
            "impl": impl,
            "status": status,
            "vs_eager": ratio,
            "device": "cuda",
            "shape_label": "M=1 N=2",
            "fraction_of_roofline": roof,
            "reason": "boom",
        }

    rows = [
        res("eager", 1.0),
        res("llmkit[triton]", 2.0, roof=0.5),
        res("llmkit[triton]", 8.0, roof=0.9),
        res("sdpa[flash]", 5.0),
        res("llmkit[cuda_ext]", 1.0),
        res("llmkit[triton]", 0.5, "bwd"),
        res("llmkit[cuda_ext]", None, "bwd", status="error"),
    ]
    s = REPORT.speed_summary(rows)["layer_norm"]
    assert set(s["passes"]["fwd"]) == {"llmkit[triton]", "llmkit[cuda_ext]"}  # peers and eager left out
    assert s["passes"]["fwd"]["llmkit[triton]"]["geomean_vs_eager"] == pytest.approx(4.0)
    assert s["passes"]["fwd"]["llmkit[triton]"]["best_roofline"] == pytest.approx(0.9)
    assert len(s["errors"]) == 1 and s["devices"] == ["cuda"]
    text = REPORT._speed_cell(s)
    assert text.startswith("fwd: triton 4.00x (90% roof), cuda_ext 1.00x; bwd: triton 0.50x") and "ERROR x1" in text
