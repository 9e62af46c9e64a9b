"""Compile-only checks of the CUDA sources (no GPU needed; nvcc must be installed).

Every ``csrc/cuda/*.cu`` is compiled to an object for sm_80 and sm_90 with warnings
from our code as errors (``-Werror all-warnings``, host side ``-Wall -Wextra
-Werror``; the .cu files include no torch header), and ``csrc/bindings.cpp`` is
compiled with its CUDA glue enabled (``-DLLMKIT_WITH_CUDA``; torch's headers as
system headers, so their warnings are theirs). All of it runs as one ninja build in
parallel (``MAX_JOBS`` or the CPU count), once per session. The SASS of the objects
is then inspected with the ``cuobjdump`` shipped in the Triton wheel: the attention
kernels must use tensor cores (HMMA) and the int8 GEMM the integer ones (IMMA).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmkit import _ext

ARCHS = ("80", "90")
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)
CSRC = _ext.csrc_dir()
CU_FILES = sorted(p.name for p in (CSRC / "cuda").glob("*.cu"))

pytestmark = pytest.mark.skipif(NVCC is None or not Path(NVCC).exists(), reason="nvcc is not installed")


def _cuobjdump() -> str | None:
    try:
        import triton
    except Exception:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _cuda_home() -> Path:
    """The CUDA toolkit root holding include/cuda_runtime.h (nvcc may be a wrapper script)."""
    cands = [os.environ.get("CUDA_HOME"), str(Path(NVCC).resolve().parent.parent), "/usr/local/cuda"]
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    pytest.fail(f"no CUDA toolkit with include/cuda_runtime.h among {cands}")


def _ninja_file(out: Path) -> str:
    import torch.utils.cpp_extension as cpp

    cuda_home = _cuda_home()
    # torch's CPU wheel lacks this generated header of its CUDA build; the glue only
    # needs it to exist (it defines the shared-library export macro).
    shim = out / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_inc = " ".join(f"-isystem {p}" for p in cpp.include_paths())
    lines = [
        f"nvcc = {NVCC}",
        f"nvflags = -std=c++17 -O3 -lineinfo -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -I{CSRC}",
        f"cxxflags = -std=c++20 -fsyntax-only -Wall -Wextra -Werror -DLLMKIT_WITH_CUDA -I{CSRC} "
        f"-I{out / 'shim'} {torch_inc} -isystem {cuda_home / 'include'}",
        "rule nvcc",
        "  command = $nvcc $nvflags -gencode arch=compute_$arch,code=sm_$arch -Xptxas -v -c $in -o $out "
        "> $out.log 2>&1 || { cat $out.log; exit 1; }",
        "  description = nvcc sm_$arch $in",
        "rule glue",
        "  command = c++ $cxxflags $in > $out.log 2>&1 && touch $out || { cat $out.log; exit 1; }",
        "  description = c++ (CUDA glue) $in",
    ]
    for cu in CU_FILES:
        for arch in ARCHS:
            lines += [f"build {out / f'{cu}.sm{arch}.o'}: nvcc {CSRC / 'cuda' / cu}", f"  arch = {arch}"]
    lines.append(f"build {out / 'bindings_cuda.ok'}: glue {CSRC / 'bindings.cpp'}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs the whole compile once: {target name: (ok, log text)} and the wall time."""
    out = tmp_path_factory.mktemp("csrc_compile")
    (out / "build.ninja").write_text(_ninja_file(out))
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 2)
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
    t0 = time.perf_counter()
    proc = subprocess.run([ninja, "-k", "0", "-j", jobs], cwd=out, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    results = {}
    for target in [f"{cu}.sm{a}.o" for cu in CU_FILES for a in ARCHS] + ["bindings_cuda.ok"]:
        log = out / f"{target}.log"
        text = log.read_text(errors="replace") if log.exists() else proc.stdout[-4000:]
        results[target] = ((out / target).exists(), text)
    print(f"\ncsrc compile check: {len(results)} targets, {seconds:.1f} s with -j {jobs}")
    return out, results


def test_cuda_sources_are_found():
    assert {"layer_norm.cu", "gelu.cu", "int8_matmul.cu", "attention_fwd.cu", "attention_bwd.cu"} <= set(CU_FILES)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES)
def test_cu_compiles_without_warnings(compiled, cu, arch):
    _, results = compiled
    ok, log = results[f"{cu}.sm{arch}.o"]
    assert ok, f"nvcc failed on {cu} for sm_{arch}:\n{log[-4000:]}"
    assert "warning" not in log.lower(), log


def test_cuda_glue_compiles(compiled):
    ok, log = compiled[1]["bindings_cuda.ok"]
    assert ok, f"bindings.cpp with LLMKIT_WITH_CUDA failed:\n{log[-4000:]}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "cu, instruction", [("attention_fwd.cu", "HMMA"), ("attention_bwd.cu", "HMMA"), ("int8_matmul.cu", "IMMA")]
)
def test_kernels_use_tensor_cores(compiled, cu, instruction, arch):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump (shipped in the Triton wheel) is not available")
    out, results = compiled
    assert results[f"{cu}.sm{arch}.o"][0]
    sass = subprocess.run(
        [tool, "-sass", str(out / f"{cu}.sm{arch}.o")], capture_output=True, text=True, check=True
    ).stdout
    assert f"sm_{arch}" in sass
    found = re.findall(rf"\b{instruction}\.\S+", sass)
    assert found, f"no {instruction} instruction in the SASS of {cu} for sm_{arch}"


def test_register_use_is_reported(compiled):
    """ptxas' resource report for every kernel (printed with -s); spills stay small."""
    _, results = compiled
    worst = 0
    for target, (ok, log) in results.items():
        if not target.endswith(".o"):
            continue
        assert ok
        regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
        spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
        assert regs, f"no ptxas report for {target}"
        worst = max([worst] + spills)
        print(f"{target}: {len(regs)} kernels, registers {min(regs)}..{max(regs)}, max spill {max(spills or [0])} B")
    assert worst <= 256, f"a kernel spills {worst} bytes"
