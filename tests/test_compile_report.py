"""Every Triton kernel of the package compiles for sm_80 and sm_90 without a GPU.

The report (llmkit.compile_report) runs once per session in a subprocess without
TRITON_INTERPRET: it records the launch behind every ``compile_specs()`` entry of every
kernel module in ``kernels/`` (the launcher run on meta tensors, planning for an A100 /
H100), compiles it for both targets with the argument specializations Triton's JIT would
derive, and reads registers, spills and matrix instructions from the cubins with the
cuobjdump / nvdisasm of the Triton wheel. The CI rule: every spec
compiles for both targets, nothing spills, matrix kernels use tensor cores.

The suite compiles an even sample of each module's specs (``LLMKIT_COMPILE_SAMPLE``, default
32 per module: all of them but attention's); ``LLMKIT_COMPILE_SAMPLE=all`` compiles every spec,
as ``python -m llmkit.compile_report`` does. CI's two stacks compile different samples.
"""

from __future__ import annotations

import importlib
import inspect

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
    found = C.problems(
        [
            _report("failed", ok=False, error="CompilationError: boom"),
            _report("stack", stack=16),
            _report("local", local=8, arch=80),
            _report("no_mma", matrix=True, sass_matrix=[]),
        ]
    )
    assert len(found) == 4
    assert "llmkit.kernels.x:failed sm_90: compile failed: CompilationError: boom" in found
    assert "llmkit.kernels.x:stack sm_90: spills (local 0 B, stack 16 B, 64 registers)" in found
    assert "llmkit.kernels.x:local sm_80: spills (local 8 B, stack 0 B, 64 registers)" in found
    assert "llmkit.kernels.x:no_mma sm_90: matrix kernel without tensor-core instructions in its SASS" in found


SAMPLE = C.sample_from_env()


def _expected_specs():
    """(module, spec name, arch) of every spec of the sample, and the matrix ones."""
    expected, matrix = set(), set()
    for name in C.kernel_modules():
        mod = importlib.import_module(name)
        if not hasattr(mod, "compile_specs"):
            continue
        for spec in C.sampled(list(mod.compile_specs()), SAMPLE):
            for arch in ARCHS:
                if arch in spec.archs:
                    expected.add((name, spec.name, arch))
                    if spec.matrix:
                        matrix.add((name, spec.name, arch))
    return expected, matrix


def test_every_spec_records_a_launch_of_its_kernel():
    """Each spec's launcher call, planned for sm_80 (108 SMs) and sm_90 (132 SMs), launches its
    kernel with a value for every parameter and a grid CUDA accepts (checked by the launch)."""
    from llmkit.kernels._launch import STANDARD_TARGETS

    for name in C.kernel_modules():
        mod = importlib.import_module(name)
        # modules without specs hold kernels another module's specs launch (attention_backward)
        for spec in mod.compile_specs() if hasattr(mod, "compile_specs") else ():
            for arch in spec.archs:
                launch = spec.launch(arch)
                assert launch.kernel is spec.kernel, (name, spec.name)
                assert launch.programs >= 1 and set(launch.options) <= {"num_warps", "num_stages", "enable_fp_fusion"}
                fn = getattr(spec.kernel, "fn", spec.kernel)
                assert set(launch.args) == set(inspect.signature(fn).parameters)
    assert set(STANDARD_TARGETS) == set(ARCHS)


@pytest.fixture(scope="module")
def reports():
    return C.run_report(ARCHS, sample=SAMPLE)


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
    mine = [
        r
        for r in reports
        if r.module
        in (
            "llmkit.kernels.layer_norm",
            "llmkit.kernels.layer_norm_backward",
            "llmkit.kernels.gelu",
            "llmkit.kernels.glu",
        )
    ]
    assert len(mine) >= 2 * 72
    for r in mine:
        assert r.registers * r.num_warps * 32 <= 65536, (r.name, r.arch, r.registers, r.num_warps)


def test_memory_bound_kernels_use_128bit_accesses(reports):
    """Compiled with the specializations of a real launch (aligned pointers and row lengths
    divisible by 16), the bulk loads and stores of the norm and GELU kernels are 128-bit
    (LDG/STG.E.128). Without those attributes the compiler cannot prove 16-byte alignment
    and emits narrower accesses: this also checks that the report compiles what runs."""
    names = [
        "ln_fwd_bf16_n4096",
        "ln_fwd_looped_bf16_n262144",
        "ln_bwd_fused_bf16_n8192",
        "ln_bwd_tiled_bf16_n16384_dres",
        "gelu_fwd_flat_erf_bf16",
        "gelu_bwd_bias_n4096_tanh_bf16",
        "glu_fwd_flat_silu_bf16",
        "glu_bwd_halves_n11008_gelu_tanh_bf16",
    ]
    found = {r.name: r.sass_memory for r in reports if r.name in names and r.arch == 90}
    assert set(found) == set(names)
    for name, ops in found.items():
        assert "LDG.E.128" in ops and "STG.E.128" in ops, (name, ops)


def test_sharded_report_compiles_the_same_specs_in_the_same_order():
    """run_report splits the compiles over worker processes; merged, they are the one-process
    report's compiles, in spec order."""
    kw = dict(archs=(80,), modules=["llmkit.kernels.gelu"], only="fwd")
    one = C.run_report(jobs=1, **kw)
    two = C.run_report(jobs=2, **kw)
    assert len(one) >= 2 and all(r.ok for r in one)
    assert [(r.module, r.name, r.arch) for r in two] == [(r.module, r.name, r.arch) for r in one]
    assert [r.registers for r in two] == [r.registers for r in one]
