"""Packaging: one version, kernels installed as llmkit.kernels, cheap import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import llmkit

ROOT = Path(__file__).resolve().parents[1]


def test_version_has_one_source():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text
    assert 'version = { attr = "llmkit._version.__version__" }' in text
    assert re.fullmatch(r"\d+\.\d+\.\d+", llmkit.__version__)


def test_kernels_are_the_llmkit_kernels_subpackage():
    import llmkit.kernels.layer_norm

    assert Path(llmkit.kernels.layer_norm.__file__).resolve().parent == (ROOT / "kernels").resolve()


def test_nothing_in_the_repo_root_shadows_a_top_level_import():
    """Python started in the repo root has the root first on sys.path: no folder there may be
    a regular package (``kernels`` would hide HuggingFace's ``kernels``, which transformers imports)."""
    regular = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "llmkit")
    assert regular == [], f"top-level regular packages shadow other distributions: {regular}"
    proc = subprocess.run(
        [sys.executable, "-c", "import kernels, sys; print(getattr(kernels, '__file__', None))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    # either another distribution's kernels (a file of its own) or nothing importable, never our folder
    assert proc.returncode != 0 or str(ROOT / "kernels") not in proc.stdout, proc.stdout


def test_import_is_cheap_and_does_not_load_triton_or_transformers():
    code = (
        "import sys, time; t = time.perf_counter(); import llmkit; "
        "print(round(time.perf_counter() - t, 3)); "
        "print(sorted(m for m in ('triton', 'transformers', 'llmkit.kernels.layer_norm') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    _, loaded = proc.stdout.strip().splitlines()
    assert loaded == "[]", f"import llmkit loaded {loaded}"


def test_public_api_names():
    for name in (
        "layer_norm",
        "rms_norm",
        "add_layer_norm",
        "gelu",
        "bias_gelu",
        "geglu",
        "swiglu",
        "scaled_dot_product_attention",
        "decode_attention",
        "quantize_int8",
        "int8_matmul",
        "int8_linear",
    ):
        assert callable(getattr(llmkit.ops, name)), name
    assert callable(llmkit.use_backend) and callable(llmkit.backend_info)


def test_a_wheel_carries_kernels_csrc_sources_and_the_bench_shapes(tmp_path):
    """A normal (non-editable) install: kernels as llmkit.kernels, csrc/ as package data and
    bench/shapes.json copied into llmkit/bench, so `llmkit bench` works from a wheel."""
    import json
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy, so the build leaves no build/ folder in the checkout
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".hypothesis",
            ".benchmarks",
            ".mypy_cache",
            ".ruff_cache",
        ),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("llmkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "llmkit/kernels/layer_norm.py",
        "llmkit/kernels/attention.py",
        "llmkit/csrc/bindings.cpp",
        "llmkit/csrc/cuda/attention_fwd.cu",
        "llmkit/csrc/cpu/vec_io.h",
        "llmkit/bench/shapes.json",
    } <= names
    packaged = json.loads(zipfile.ZipFile(wheel).read("llmkit/bench/shapes.json"))
    assert packaged == json.loads((ROOT / "bench" / "shapes.json").read_text())
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_every_package_folder_is_listed_in_pyproject():
    """A wheel holds only the packages pyproject.toml lists: a new folder must be added there."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "llmkit").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, sorted(found - listed)
