"""Every Triton kernel of the package compiles for sm_80 and sm_90 without a GPU.

The report (llmkit.compile_report) runs once per session in a subprocess without
TRITON_INTERPRET: it compiles every ``compile_specs()`` entry of every kernel module in
``kernels/`` for both targets and reads registers, spills and matrix instructions from
the cubins with the cuobjdump / nvdisasm of the Triton wheel. The CI rule: every spec
compiles for both targets, nothing spills, matrix kernels use tensor cores.
"""

from __future__ import annotations

import importlib

import pytest

from llmkit import compile_report as C

ARCHS = (80, 90)

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _norm_fwd_kernel:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_res_usage():
    assert C.parse_res_usage(RES_USAGE) == {"REG": 40, "STACK": 0, "SHARED": 0, "LOCAL": 0}
    spilled = RES_USAGE.replace("STACK:0", "STACK:24").replace("LOCAL:0", "LOCAL:16").replace("SHARED:0", "SHARED:1024")
    assert C.parse_res_usage(spilled) == {"REG": 40, "STACK": 24, "SHARED": 1024, "LOCAL": 16}
    two = RES_USAGE + " Function helper:\n  REG:255 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:0\n"
    assert C.parse_res_usage(two)["REG"] == 255 and C.parse_res_usage(two)["STACK"] == 8
    assert C.parse_res_usage("cuobjdump fatal : Could not open input file") == {}


def _report(name, **kw):
    base = dict(module="llmkit.kernels.x", name=name, arch=90, ok=True, registers=64)
    return C.KernelReport(**(base | kw))


def test_problems():
    clean = _report("clean")
    assert not clean.spills
    assert C.problems([clean, _report("mma", matrix=True, sass_matrix=["HGMMA"])]) == []
    found = C.problems([
        _report("failed", ok=False, error="CompilationError: boom"),
        _report("stack", stack=16),
        _report("local", local=8, arch=80),
        _report("no_mma", matrix=True, sass_matrix=[]),
    ])
    assert len(found) == 4
    assert "llmkit.kernels.x:failed sm_90: compile failed: CompilationError: boom" in found
    assert "llmkit.kernels.x:stack sm_90: spills (local 0 B, stack 16 B, 64 registers)" in found
    assert "llmkit.kernels.x:local sm_80: spills (local 8 B, stack 0 B, 64 registers)" in found
    assert "llmkit.kernels.x:no_mma sm_90: matrix kernel without tensor-core instructions in its SASS" in found


def _expected_specs():
    """(module, spec name, arch) of every spec the kernel modules declare, and the matrix ones."""
    expected, matrix = set(), set()
    for name in C.kernel_modules():
        mod = importlib.import_module(name)
        if not hasattr(mod, "compile_specs"):
            continue
        for spec in mod.compile_specs():
            for arch in ARCHS:
                if arch in spec.archs:
                    expected.add((name, spec.name, arch))
                    if spec.matrix:
                        matrix.add((name, spec.name, arch))
    return expected, matrix


@pytest.fixture(scope="module")
def reports():
    return C.run_report(ARCHS)


def test_every_spec_was_compiled(reports):
    expected, _ = _expected_specs()
    got = [(r.module, r.name, r.arch) for r in reports]
    assert len(got) == len(set(got)), "duplicate spec names in a module"
    assert set(got) == expected
    assert {"llmkit.kernels.layer_norm", "llmkit.kernels.gelu"} <= {m for m, _, _ in expected}


def test_every_kernel_compiles_without_spills(reports):
    failed = [f"{r.module}:{r.name} sm_{r.arch}: {r.error}" for r in reports if not r.ok]
    assert not failed, "\n".join(failed)
    spilled = [f"{r.module}:{r.name} sm_{r.arch}: local {r.local} B, stack {r.stack} B" for r in reports if r.spills]
    assert not spilled, "\n".join(spilled)
    assert all(0 < r.registers <= 255 for r in reports)
    assert C.problems(reports) == []


def test_matrix_kernels_use_tensor_cores(reports):
    _, matrix = _expected_specs()
    by_key = {(r.module, r.name, r.arch): r for r in reports}
    for key in matrix:
        r = by_key[key]
        assert r.sass_matrix, f"{key}: no HMMA/IMMA/HGMMA/IGMMA in the SASS"
    for r in reports:
        if (r.module, r.name, r.arch) not in matrix:
            assert not r.matrix


def test_norm_and_gelu_kernels_fit_in_registers(reports):
    """The memory-bound kernels of this package stay well inside the register file."""
    mine = [r for r in reports if r.module in ("llmkit.kernels.layer_norm", "llmkit.kernels.gelu")]
    assert len(mine) >= 2 * 40
    for r in mine:
        assert r.registers * r.num_warps * 32 <= 65536, (r.name, r.arch, r.registers, r.num_warps)


VECTOR_CHECK = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmkit.compile_report import _tools_dir
from llmkit.kernels import gelu, layer_norm

# Pointers and strides/sizes divisible by 16, as the Triton JIT specializes them at run
# time for aligned tensors whose row length is a multiple of 16.
UNALIGNED = {"M", "G", "rows_per_group", "col_blocks", "inner_rows"}
wanted = set(sys.argv[1].split(","))
out = {}
for mod in (layer_norm, gelu):
    for spec in mod.compile_specs():
        if spec.name not in wanted:
            continue
        constexprs, warps, stages = spec.for_arch(90)
        attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(spec.signature.items())
                 if ty.startswith("*") or (ty in ("i32", "i64") and name not in UNALIGNED)}
        src = ASTSource(fn=spec.kernel, signature=dict(spec.signature), constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            sass = subprocess.run([os.path.join(_tools_dir(), "nvdisasm"), path],
                                  capture_output=True, text=True).stdout
        out[spec.name] = sorted(set(re.findall(r"\b((?:LDG|STG)\.E[.\w]*)", sass)))
print(json.dumps(out))
'''


def test_memory_bound_kernels_use_128bit_accesses():
    """With aligned pointers and row lengths (what the JIT specializes at run time), the
    bulk loads and stores of the norm and GELU kernels are 128-bit (LDG/STG.E.128 on sm_90)."""
    import json
    import os
    import subprocess
    import sys

    names = ["ln_fwd_bf16_n4096", "ln_fwd_looped_bf16_n262144", "ln_bwd_fused_bf16_n8192",
             "ln_bwd_tiled_bf16_n16384_dres", "gelu_fwd_flat_erf_bf16", "gelu_bwd_bias_n4096_tanh_bf16"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", VECTOR_CHECK, ",".join(names)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(found) == set(names)
    for name, ops in found.items():
        assert "LDG.E.128" in ops and "STG.E.128" in ops, (name, ops)
