"""Compile every Triton kernel for sm_80 and sm_90 without a GPU and report its resources.

For each :class:`~llmkit.kernels._compile.CompileSpec` that a kernel module lists
in ``compile_specs()``, this records the launch its launcher makes for that shape on an
sm_80 (108 SMs) / sm_90 (132 SMs) GPU, compiles it with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)`` with the argument specializations Triton's JIT derives
at launch (16-byte divisibility of pointers and integers, integers equal to 1) and the
launch's options, and reads the cubin with the ``cuobjdump`` and
``nvdisasm`` that ship in the Triton wheel: registers, stack, local memory (any
local memory or stack in a Triton kernel is register spilling), shared memory, and
for matrix kernels which tensor-core instructions appear in the SASS (HMMA / IMMA
on sm_80; HGMMA / IGMMA, i.e. wgmma, on sm_90).

Run it as ``python -m llmkit.compile_report [--json FILE] [--arch 80 90]`` or
through ``llmkit check --compile``. It must run without ``TRITON_INTERPRET`` (the
interpreter replaces kernels by Python functions); :func:`run_report` starts a
subprocess with the variable removed when needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

MATRIX_SASS = ("HGMMA", "IGMMA", "HMMA", "IMMA")


@dataclasses.dataclass
class KernelReport:
    """Resources of one kernel configuration on one architecture."""

    module: str
    name: str
    arch: int
    ok: bool
    error: str = ""
    registers: int = 0
    stack: int = 0
    local: int = 0
    shared_static: int = 0
    shared_dynamic: int = 0
    num_warps: int = 0
    num_stages: int = 0
    matrix: bool = False
    sass_matrix: list[str] = dataclasses.field(default_factory=list)
    ptx_matrix: list[str] = dataclasses.field(default_factory=list)
    sass_memory: list[str] = dataclasses.field(default_factory=list)
    """The global load / store instructions in the SASS (``LDG.E.128``: 16-byte vectors)."""
    compile_s: float = 0.0

    @property
    def spills(self) -> bool:
        """Local memory or stack in use: register spilling."""
        return self.local > 0 or self.stack > 0


def _tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


_RES_RE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_res_usage(text: str) -> dict[str, int]:
    """Parse ``cuobjdump -res-usage`` output (first function) into REG/STACK/SHARED/LOCAL."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if "REG:" in line:
            for key, val in _RES_RE.findall(line):
                out[key] = max(out.get(key, 0), int(val))
    return out


def kernel_modules() -> list[str]:
    """Every module of ``llmkit.kernels`` (imported by name, so new ops are found)."""
    import llmkit.kernels as pkg

    return sorted(f"llmkit.kernels.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def compile_spec(module: str, spec: Any, arch: int) -> KernelReport:
    """Compile one spec for one architecture and read its resources.

    The spec's launch (its launcher's call, recorded for that architecture) is compiled with
    what Triton's JIT would derive from its arguments (:func:`llmkit._compat.triton_launch_specialization`)
    and with its launch options.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llmkit._compat import triton_launch_specialization

    rep = KernelReport(module, spec.name, arch, ok=False, matrix=spec.matrix)
    t0 = time.perf_counter()
    try:
        launch = spec.launch(arch)
        rep.num_warps = int(launch.options.get("num_warps", 4))
        rep.num_stages = int(launch.options.get("num_stages", 3))
        signature, constexprs, attrs = triton_launch_specialization(launch.kernel, launch.args, launch.options, arch)
        src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    except Exception as exc:  # report, do not stop the whole run
        rep.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        rep.compile_s = time.perf_counter() - t0
        return rep
    rep.compile_s = time.perf_counter() - t0
    rep.shared_dynamic = int(getattr(compiled.metadata, "shared", 0) or 0)
    ptx = compiled.asm.get("ptx", "")
    rep.ptx_matrix = [w for w in ("wgmma.mma_async", "mma.sync") if w in ptx]
    tools = _tools_dir()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True, text=True)
        usage = parse_res_usage(res.stdout)
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), path], capture_output=True, text=True)
    if not usage:
        rep.error = f"cuobjdump gave no resource usage: {res.stderr.strip()[:200]}"
        return rep
    rep.registers = usage.get("REG", 0)
    rep.stack = usage.get("STACK", 0)
    rep.local = usage.get("LOCAL", 0)
    rep.shared_static = usage.get("SHARED", 0)
    words = set(re.findall(r"\b([A-Z]+MMA)\b", sass.stdout))
    rep.sass_matrix = sorted(w for w in words if w in MATRIX_SASS)
    rep.sass_memory = sorted(set(re.findall(r"\b((?:LDG|STG)\.E[.\w]*)", sass.stdout)))
    rep.ok = True
    return rep


def sampled(specs: list[Any], sample: tuple[int, int] | None) -> list[Any]:
    """``sample=(cap, phase)``: at most about ``cap`` of a module's specs, evenly spread (every
    ``ceil(n / cap)``-th, from the ``phase``-th); None: all of them."""
    if sample is None or sample[0] <= 0 or len(specs) <= sample[0]:
        return specs
    stride = -(-len(specs) // sample[0])
    return specs[sample[1] % stride :: stride]


def parse_sample(text: str, name: str = "--sample") -> tuple[int, int] | None:
    """``'<cap>[/<phase>]'`` as :func:`sampled` takes it; ``'all'``: None (every spec)."""
    text = text.strip()
    if text == "all":
        return None
    cap, _, phase = text.partition("/")
    try:
        return int(cap), int(phase or 0)
    except ValueError:
        raise ValueError(f"{name} must be 'all' or '<cap>[/<phase>]' (e.g. 24/1), got {text!r}") from None


def sample_from_env() -> tuple[int, int] | None:
    """The sample the tests compile: ``LLMKIT_COMPILE_SAMPLE=<cap>[/<phase>]`` (default 32/0: the
    attention module's ~140 specs would take most of the suite's time); ``all``: every spec."""
    return parse_sample(os.environ.get("LLMKIT_COMPILE_SAMPLE", "32/0"), "LLMKIT_COMPILE_SAMPLE")


def collect(
    archs: tuple[int, ...] = (80, 90),
    modules: list[str] | None = None,
    only: str | None = None,
    shard: tuple[int, int] = (0, 1),
    sample: tuple[int, int] | None = None,
) -> list[KernelReport]:
    """Compile every spec of every kernel module (or of ``modules``; only the specs whose name
    contains ``only``) for ``archs``. ``shard=(i, n)``: only every n-th compile, from the i-th
    (what one of n worker processes compiles). ``sample``: see :func:`sampled`."""
    index = -1
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile report cannot run with TRITON_INTERPRET set; use run_report()")
    reports: list[KernelReport] = []
    for name in modules or kernel_modules():
        try:
            mod = importlib.import_module(name)
        except Exception as exc:
            if shard[0] == 0:  # said once, by the first worker
                reports.append(KernelReport(name, "<import>", 0, ok=False, error=repr(exc)))
            continue
        specs_fn = getattr(mod, "compile_specs", None)
        if specs_fn is None:
            continue
        try:
            specs = list(specs_fn())
        except Exception as exc:  # one broken module must not hide the others' reports
            if shard[0] == 0:
                reports.append(KernelReport(name, "<compile_specs>", 0, ok=False, error=repr(exc)))
            continue
        for spec in sampled(specs, sample):
            if only and only not in spec.name:
                continue
            for arch in archs:
                if arch in spec.archs:
                    index += 1
                    if index % shard[1] == shard[0]:
                        reports.append(compile_spec(name, spec, arch))
    return reports


def problems(reports: list[KernelReport]) -> list[str]:
    """What the CI rule rejects: failed compiles, spills, matrix kernels without tensor cores."""
    out = []
    for r in reports:
        tag = f"{r.module}:{r.name} sm_{r.arch}"
        if not r.ok:
            out.append(f"{tag}: compile failed: {r.error}")
            continue
        if r.spills:
            out.append(f"{tag}: spills (local {r.local} B, stack {r.stack} B, {r.registers} registers)")
        if r.matrix and not r.sass_matrix:
            out.append(f"{tag}: matrix kernel without tensor-core instructions in its SASS")
    return out


def format_table(reports: list[KernelReport]) -> str:
    """A plain-text table of the reports."""
    head = (
        f"{'kernel':44} {'arch':>5} {'warps':>5} {'stages':>6} {'regs':>5} {'spill':>6} {'smem KB':>8} "
        f"{'matrix':>14} {'s':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        if not r.ok:
            lines.append(f"{(r.module.split('.')[-1] + ':' + r.name)[:44]:44} {r.arch:>5}  FAILED: {r.error[:80]}")
            continue
        smem = (r.shared_static + r.shared_dynamic) / 1024
        mat = ",".join(r.sass_matrix) if r.sass_matrix else ("none" if r.matrix else "-")
        spill = f"{r.local + r.stack}B" if r.spills else "0"
        lines.append(
            f"{(r.module.split('.')[-1] + ':' + r.name)[:44]:44} {r.arch:>5} {r.num_warps:>5} {r.num_stages:>6} "
            f"{r.registers:>5} {spill:>6} {smem:>8.1f} {mat:>14} {r.compile_s:>5.1f}"
        )
    return "\n".join(lines)


def default_jobs() -> int:
    """Worker processes of :func:`run_report`: ``LLMKIT_COMPILE_JOBS``, else the CPUs available."""
    env = os.environ.get("LLMKIT_COMPILE_JOBS")
    if env:
        return max(1, int(env))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8))


def run_report(
    archs: tuple[int, ...] = (80, 90),
    timeout: float = 1800,
    jobs: int | None = None,
    modules: list[str] | None = None,
    only: str | None = None,
    sample: tuple[int, int] | None = None,
) -> list[KernelReport]:
    """Run the report without TRITON_INTERPRET in ``jobs`` fresh interpreters (each compiles a
    shard of the specs: compiling is CPU-bound and single-threaded) and return it, in spec order."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    jobs = jobs or default_jobs()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"report{i}.json") for i in range(jobs)]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llmkit.compile_report",
                    "--json",
                    path,
                    "--quiet",
                    "--shard",
                    f"{i}/{jobs}",
                    "--arch",
                    *[str(a) for a in archs],
                    *(["--module", *modules] if modules else []),
                    *(["--only", only] if only else []),
                    *(["--sample", f"{sample[0]}/{sample[1]}"] if sample else []),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, path in enumerate(paths)
        ]
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
        shards = []
        for proc, path, err in zip(procs, paths, errors, strict=True):
            if not os.path.exists(path):
                raise RuntimeError(f"compile report failed (exit {proc.returncode}):\n{err[-2000:]}")
            with open(path) as f:
                shards.append(json.load(f)["kernels"])
    merged = [
        d for i in range(max(map(len, shards), default=0)) for shard in shards if i < len(shard) for d in [shard[i]]
    ]
    return [KernelReport(**{k: v for k, v in d.items() if k in KernelReport.__dataclass_fields__}) for d in merged]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmkit.compile_report", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    p.add_argument("--json", help="write the report as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    p.add_argument("--module", nargs="+", help="only these kernel modules (e.g. attention int8_matmul)")
    p.add_argument("--only", help="only the specs whose name contains this text")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="compile only every N-th spec, from the I-th")
    p.add_argument(
        "--sample", metavar="CAP/PHASE", help="at most about CAP specs per module, evenly spread (default: all)"
    )
    args = p.parse_args(argv)
    shard_i, _, shard_n = args.shard.partition("/")
    modules = [m if m.startswith("llmkit.kernels.") else f"llmkit.kernels.{m}" for m in args.module or []]
    sample = parse_sample(args.sample) if args.sample else None
    reports = collect(tuple(args.arch), modules or None, args.only, (int(shard_i), int(shard_n or 1)), sample)
    bad = problems(reports)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"kernels": [dataclasses.asdict(r) | {"spills": r.spills} for r in reports], "problems": bad},
                f,
                indent=1,
            )
    if not args.quiet:
        print(format_table(reports))
        for b in bad:
            print("PROBLEM:", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
