"""The llmkit command line: info, check and bench (the wiring; tests/test_check.py and
tests/test_bench.py test what check and bench do)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmkit import cli
from llmkit.dispatch import OPS


def test_info_lists_versions_devices_and_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    for name in ("triton", "cuda_ext", "reference"):
        assert f"  {name} - " in out
    if not torch.cuda.is_available():
        assert "no CUDA GPU is available" in out
    assert "layer_norm(forward+backward)" in out


def test_check_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "check.json"
    code = cli.main(
        ["check", "--quick", "--op", "gelu", "--op", "quantize_int8", "--backend", "reference", "--json", str(path)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out and "FAIL" not in out.replace("0 failed", "")
    rows = json.loads(path.read_text())["rows"]
    assert {r["op"] for r in rows} == {"gelu", "quantize_int8"}
    assert all(r["status"] == "PASS" for r in rows)
    assert {r["dtype"] for r in rows} >= {"float32", "float16", "bfloat16"}
    assert any(r["output"] == "grad_input" for r in rows), "backward must be checked too"


def test_check_fails_when_a_backend_is_wrong(monkeypatch, capsys):
    impl = OPS["gelu"]["forward"].impls["reference"]
    good = impl.fn
    monkeypatch.setattr(impl, "fn", lambda c: good(c) * 1.01)
    code = cli.main(["check", "--quick", "--op", "gelu", "--backend", "reference"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out


def test_check_fails_when_an_exact_op_is_off_by_one(monkeypatch, capsys):
    impl = OPS["int8_matmul"]["forward"].impls["reference"]
    good = impl.fn
    monkeypatch.setattr(impl, "fn", lambda *a: good(*a) + 1)
    assert cli.main(["check", "--op", "int8_matmul", "--backend", "reference"]) == 1
    assert "must be bit-exact" in capsys.readouterr().out


def test_check_rejects_unknown_op(capsys):
    assert cli.main(["check", "--op", "layernorm"]) == 2
    assert "unknown op 'layernorm'" in capsys.readouterr().err


def test_console_script_runs_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("llmkit ")
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli"], capture_output=True, text=True)
    assert proc.returncode == 2 and "info" in proc.stdout


@pytest.mark.parametrize("argv", [["check", "--backend", "cuda"], ["nosuch"], ["bench", "--device", "tpu"]])
def test_bad_arguments_exit_nonzero(argv):
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", *argv], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "cuda" in proc.stderr or "invalid choice" in proc.stderr


def test_bench_is_wired_with_its_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--op", "--shapes", "--dtype", "--backend", "--quick", "--out", "--threads", "--no-compile"):
        assert flag in out


def test_bench_draws_a_progress_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    code = cli.main(
        [
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
    )
    assert code == 0, capsys.readouterr().out
    drawn = err.getvalue()
    assert "\r[" in drawn and "gelu fwd float32" in drawn and "] 2/2 done" in drawn
    assert "gelu fwd float32 (cpu)" in capsys.readouterr().out  # the table goes to stdout


@pytest.mark.parametrize(
    "argv, words",
    [
        (["check", "--backend", "nope"], ["llmkit check: error:", "--backend", "unknown backend 'nope'"]),
        (["check", "--quick", "--op", "gelu", "--json", "{unwritable}/x.json"], ["llmkit check: error:", "--json"]),
        (["demo", "--size", "nope"], ["llmkit demo: error:", "--size for gpt2", "small", "'nope'"]),
        (["demo", "--model", "bert", "--size", "xl"], ["llmkit demo: error:", "--size for bert", "base", "'xl'"]),
        (["build-ext", "--cache-dir", "{unwritable}/ext"], ["llmkit build-ext: error:", "cache directory"]),
        (["build-ext", "--cache-dir", "{a_file}"], ["llmkit build-ext: error:", "is a file, not a directory"]),
    ],
)
def test_argument_errors_are_one_line_with_exit_code_2(tmp_path, argv, words):
    """No traceback for an argument llmkit cannot use: one line on stderr naming it, exit 2,
    and before any work (the check writes no rows, the demo builds no model)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    argv = [a.format(unwritable=a_file, a_file=a_file) for a in argv]  # a path under a file: never writable
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("llmkit: the C++/CUDA")]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert proc.stdout == ""
