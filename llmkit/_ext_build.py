"""Building the C++/CUDA extension (``csrc/``) into its cache: keys, compiler runs, checksums.

The extension is compiled with ninja through :func:`torch.utils.cpp_extension.load`
into a cache directory whose name holds everything the binary depends on: the torch
version, the Python version, a hash of the sources, the CPU instruction set and,
for a CUDA build, the GPU architectures. Each finished build records in its
``build_info.json`` a fingerprint of those inputs and the library's size and SHA-256:
:func:`build` skips a build that is already there and intact, and :mod:`llmkit._ext`
(which loads builds) never loads a library that does not match its record.

This module imports nothing from llmkit, so ``setup.py`` can load it by path; the rest
of llmkit reaches it through :mod:`llmkit._ext`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

AUTOBUILD_ENV = "LLMKIT_EXT_AUTOBUILD"
CACHE_ENV = "LLMKIT_EXT_CACHE_DIR"
BUILD_COMMAND = "llmkit build-ext"
LIBRARY_NAMESPACE = "llmkit_ext"
MIN_CUDA_CAPABILITY = (8, 0)

# Bump when the compiler flags below change, so old builds are not reused.
_FLAGS_VERSION = "2"
_SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")
_PREBUILT_DIR = Path(__file__).resolve().parent / "_ext_prebuilt"
_INFO_FILE = "build_info.json"
_FAILED_FILE = "build_failed.json"
_LOG_FILE = "build.log"


# --------------------------------------------------------------------------------------
# sources and build keys
# --------------------------------------------------------------------------------------


def csrc_dir() -> Path:
    """The C++/CUDA sources: ``llmkit/csrc`` in an installed wheel, ``csrc/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "bindings.cpp").is_file():
            return cand
    raise FileNotFoundError(
        f"the extension sources (csrc/bindings.cpp) are neither in {here / 'csrc'} nor in "
        f"{here.parent / 'csrc'}: this installation does not ship them"
    )


def source_files(root: Path | None = None) -> list[Path]:
    """Every source and header file under csrc/, sorted."""
    root = root or csrc_dir()
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _SOURCE_SUFFIXES)


def source_hash(root: Path | None = None) -> str:
    """12 hex digits hashing every source's relative path and bytes, and the flags version."""
    root = root or csrc_dir()
    h = hashlib.sha256(_FLAGS_VERSION.encode())
    for p in source_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _torch_tag() -> str:
    ver = torch.__version__.replace("+", "_")
    return f"torch{ver}-py{sys.version_info.major}{sys.version_info.minor}"


# The CPU kernels are compiled for one x86 vector ISA, like ATen's own per-capability
# kernels (same -m flags and CPU_CAPABILITY macros as torch's build, so at::vec::Vectorized
# takes its AVX2 / AVX512 implementation instead of its scalar DEFAULT one). The ISA is
# what torch detects on the machine that builds (torch.backends.cpu.get_cpu_capability(),
# which honours ATEN_CPU_CAPABILITY), it is part of the build directory's name, and a
# build is only loaded on a CPU whose capability covers it (see find_builds).
_ISA_ORDER = ("default", "avx2", "avx512")
_ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
}


def cpu_isa() -> str:
    """The x86 vector ISA the CPU kernels are compiled for here: 'avx512', 'avx2' or 'default'."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "default")


def _cpu_flags(isa: str) -> list[str]:
    return ["-O3", "-fopenmp"] + _ISA_FLAGS[isa]


def cuda_arch_list() -> list[str]:
    """Architectures of a CUDA build: TORCH_CUDA_ARCH_LIST, else the GPUs here, else 8.0 and 9.0."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        archs = [a for a in re.split(r"[;, ]+", env) if a]
    else:
        archs = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                cap = torch.cuda.get_device_capability(i)
                if cap >= MIN_CUDA_CAPABILITY:
                    archs.append(f"{cap[0]}.{cap[1]}")
        if not archs:
            archs = ["8.0", "9.0"]
    return sorted(set(archs), key=lambda a: tuple(int(x) for x in re.findall(r"\d+", a)))


def _arch_tag(archs: list[str]) -> str:
    return "_".join("sm" + re.sub(r"[^0-9a-zA-Z]", "", a).replace("PTX", "ptx") for a in archs)


def _variant(cuda: bool, archs: list[str], isa: str) -> str:
    return (f"cuda{torch.version.cuda}-{_arch_tag(archs)}" if cuda else "cpu") + f"-{isa}"


def cache_root() -> Path:
    """Where builds live: $LLMKIT_EXT_CACHE_DIR, else $XDG_CACHE_HOME/llmkit/ext."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llmkit" / "ext"


def _key_prefix(src_hash: str) -> str:
    return f"{_torch_tag()}-{src_hash}-"


def build_dir_for(
    cuda: bool, root: Path | None = None, archs: list[str] | None = None, sources: Path | None = None
) -> Path:
    """The directory a build with these settings goes to."""
    archs = archs if archs is not None else (cuda_arch_list() if cuda else [])
    key = _key_prefix(source_hash(sources)) + _variant(cuda, archs, cpu_isa())
    return (root or cache_root()) / key


# --------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class BuildResult:
    """What :func:`build` did."""

    ok: bool
    directory: Path
    seconds: float
    cuda: bool
    archs: list[str]
    first_error: str | None = None
    log: Path | None = None
    up_to_date: bool = False
    """True when nothing was compiled: the build in ``directory`` already had these
    sources, torch, Python, flags and GPU architectures, and its library checked out."""

    def summary(self) -> str:
        """One paragraph for people."""
        what = f"CPU + CUDA ({', '.join('sm_' + a.replace('.', '') for a in self.archs)})" if self.cuda else "CPU only"
        if self.up_to_date:
            return (
                f"the llmkit extension ({what}) in {self.directory} is up to date (same sources, torch, "
                "Python, compiler flags and GPU architectures; its library matches its checksum); "
                "--force rebuilds it"
            )
        if self.ok:
            return f"built the llmkit extension ({what}) in {self.seconds:.0f} s into {self.directory}"
        return (
            f"building the llmkit extension ({what}) failed after {self.seconds:.0f} s\n"
            f"  first error: {self.first_error}\n  full log: {self.log}"
        )


# A compiler's or linker's own error line: gcc / clang / nvcc "file:line:col: error:",
# nvcc's front end "file.cu(12): error", the linker's "undefined reference", the loader's
# "undefined symbol" (the worker loads the library once).
_COMPILER_ERROR = re.compile(
    r"(^|[\s:])(fatal )?error( [A-Z]?\d+)?:|\(\d+\): error|undefined reference to|cannot find -l"
    r"|undefined symbol:",
    re.IGNORECASE,
)
_ANY_ERROR = re.compile(r"\berror\b", re.IGNORECASE)
_NOT_THE_CAUSE = ("FAILED:", "ninja: build stopped", "subcommand failed", "Traceback", "collect2:")


def first_error(log_text: str) -> str | None:
    """The compiler's first error line in a build log (None if there is none)."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_NOT_THE_CAUSE)]
    for pat in (_COMPILER_ERROR, _ANY_ERROR):
        for ln in lines:
            if pat.search(ln):
                return ln[:500]
    return None


def _check_can_build_cuda() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: the CUDA kernels need a CUDA build of torch"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _want_cuda(cuda: bool | None) -> bool:
    if cuda is None:
        return _check_can_build_cuda() is None
    return bool(cuda)


def build(
    verbose: bool = True,
    cuda: bool | None = None,
    root: Path | None = None,
    stream=None,
    sources: Path | None = None,
    force: bool = False,
) -> BuildResult:
    """Compile the extension (a few minutes), unless the same build is already there.

    Args:
        verbose: print progress (``[3/7] compiling gelu.cpp``) and, on failure,
            the compiler's first error and the log's path.
        cuda: build the CUDA kernels too; None: when torch is a CUDA build and nvcc
            is found. True on a machine that cannot raises RuntimeError.
        root: the cache root (default :func:`cache_root`).
        stream: where progress goes (default sys.stderr).
        sources: the csrc directory to build (default :func:`csrc_dir`).
        force: compile from scratch even when an identical build exists.

    A build whose fingerprint (sources, torch, Python, compiler flags, GPU
    architectures: :func:`_build_key`) equals the one recorded in the directory's
    ``build_info.json``, and whose library still has the recorded size and SHA-256,
    is up to date: nothing runs and the result says so (``up_to_date``). Otherwise the
    compiler runs in a subprocess; its full output goes to ``build.log`` in the build
    directory, and the library's size and SHA-256 go into ``build_info.json`` so that
    :func:`load` never loads a truncated or altered file. Returns a
    :class:`BuildResult`; never raises for a compile error (the result carries the
    first error). An unusable cache directory raises OSError.
    """
    out = stream or sys.stderr
    want_cuda = _want_cuda(cuda)
    if want_cuda:
        why = _check_can_build_cuda()
        if why:
            raise RuntimeError(f"cannot build the CUDA part of the llmkit extension: {why}")
    archs = cuda_arch_list() if want_cuda else []
    isa = cpu_isa()
    src = sources or csrc_dir()
    directory = build_dir_for(want_cuda, root, archs, src)
    config: dict[str, Any] = {
        "name": f"{LIBRARY_NAMESPACE}_{source_hash(src)}",
        "directory": str(directory),
        "sources": [str(p) for p in _compiled_sources(src, want_cuda)],
        "include": str(src),
        "cflags": _cpu_flags(isa) + (["-DLLMKIT_WITH_CUDA"] if want_cuda else []),
        "cuda_cflags": ["-O3", "-lineinfo", "-std=c++17"],
        "ldflags": ["-fopenmp"],
        "cuda": want_cuda,
        "archs": archs,
    }
    key = _build_key(config, src)
    if not force and _up_to_date(directory, key, src):
        result = BuildResult(True, directory, 0.0, want_cuda, archs, up_to_date=True)
        if verbose:
            print("llmkit: " + result.summary(), file=out, flush=True)
        return result
    if force and directory.is_dir():
        shutil.rmtree(directory)  # every object recompiled, not just what ninja thinks changed
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (_INFO_FILE, _FAILED_FILE):
        (directory / stale).unlink(missing_ok=True)
    # ninja relinks only a library older than its objects: a truncated or altered one
    # (newer) would stay, so the library goes before every build
    (directory / _library_name(src)).unlink(missing_ok=True)
    log_path = directory / _LOG_FILE
    if verbose:
        print(
            f"llmkit: building the C++{'/CUDA' if want_cuda else ''} extension "
            f"({len(config['sources'])} sources{', CUDA archs ' + ';'.join(archs) if want_cuda else ''}) "
            f"into {directory}",
            file=out,
            flush=True,
        )
    t0 = time.perf_counter()
    env = dict(os.environ)
    if want_cuda:
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    cmd = [sys.executable, "-c", _WORKER, json.dumps(config)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if verbose:
                m = re.match(r"^\[(\d+)/(\d+)\]\s+(.*)$", line.strip())
                if m:
                    print(f"  [{m.group(1)}/{m.group(2)}] {_describe_step(m.group(3))}", file=out, flush=True)
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    ok = rc == 0 and f"{_WORKER_OK} " in text
    result = BuildResult(ok, directory, seconds, want_cuda, archs, None, log_path)
    if ok:
        lib = Path(text.split(f"{_WORKER_OK} ", 1)[1].splitlines()[0].strip())
        info = {
            "library": lib.name,
            "library_bytes": lib.stat().st_size,
            "library_sha256": _file_sha256(lib),
            "build_key": key,
            "torch": torch.__version__,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "sources": source_hash(src),
            "cpu_isa": isa,
            "cuda": torch.version.cuda if want_cuda else None,
            "cuda_archs": archs,
            "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (directory / _INFO_FILE).write_text(json.dumps(info, indent=1))
    else:
        result.first_error = first_error(text) or f"the build exited with status {rc} (no error line found)"
        (directory / _FAILED_FILE).write_text(
            json.dumps({"first_error": result.first_error, "log": str(log_path), "seconds": round(seconds, 1)})
        )
    if verbose:
        print(("llmkit: " if ok else "llmkit: ERROR: ") + result.summary(), file=out, flush=True)
    return result


def _library_name(src: Path | None = None) -> str:
    """The file name of the library built from ``src``: ``llmkit_ext_<source hash>.so``."""
    return f"{LIBRARY_NAMESPACE}_{source_hash(src)}.so"


def _build_key(config: dict, src: Path) -> str:
    """A fingerprint of everything a build's binary depends on: the sources' hash, the
    compiler flags, the GPU architectures, the torch / CUDA / Python versions."""
    parts = {k: v for k, v in config.items() if k not in ("directory", "sources", "include")}
    parts.update(
        sources=[p.relative_to(src).as_posix() for p in map(Path, config["sources"])],
        source_hash=source_hash(src),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        python=list(sys.version_info[:3]),
    )
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _up_to_date(directory: Path, key: str, sources: Path) -> bool:
    """True when ``directory`` holds a build with fingerprint ``key`` whose library checks out."""
    info = _read_json(directory / _INFO_FILE)
    return info is not None and info.get("build_key") == key and verify_build(directory, info, sources) is None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verify_build(directory: Path, info: dict, sources: Path | None = None) -> str | None:
    """None when the library ``info`` names in ``directory`` is the file that was built
    there: the expected name for the sources (default :func:`csrc_dir`), the recorded size
    and SHA-256. Otherwise why not, in a sentence. Reads the file; loads nothing."""
    name = info.get("library")
    try:
        expected = _library_name(sources)
    except OSError:
        expected = None
    if not isinstance(name, str) or name != expected:
        return f"its build_info.json names the library {name!r}, not {expected!r} (an llmkit build of these sources)"
    size, digest = info.get("library_bytes"), info.get("library_sha256")
    if not isinstance(size, int) or not isinstance(digest, str):
        return "its build_info.json records no size and checksum of the library (an older llmkit built it)"
    lib = directory / name
    try:
        got_size = lib.stat().st_size
        if got_size != size:
            return f"{lib} has {got_size} bytes, the build wrote {size} (truncated or replaced)"
        if _file_sha256(lib) != digest:
            return f"{lib} does not match the SHA-256 recorded at build time (the file was altered)"
    except OSError as exc:
        return f"{lib} cannot be read: {exc}"
    return None


def _compiled_sources(src: Path, cuda: bool) -> list[Path]:
    files = [src / "bindings.cpp"] + sorted((src / "cpu").glob("*.cpp"))
    if cuda:
        files += sorted((src / "cuda").glob("*.cu"))
    return files


def _describe_step(cmd: str) -> str:
    m = re.search(r"\s-c\s+(\S+)", cmd)
    if m:
        return f"compiling {Path(m.group(1)).name}"
    if " -shared " in f" {cmd} " or cmd.rstrip().endswith(".so"):
        return "linking"
    return cmd[:80]


_WORKER_OK = "LLMKIT_EXT_BUILD_OK"

# Runs in a fresh interpreter: compile with ninja (verbose, so the parent sees the
# progress lines), then load the library once to prove it links.
_WORKER = f"""
import json, sys
cfg = json.loads(sys.argv[1])
from torch.utils import cpp_extension
cpp_extension.load(
    name=cfg["name"], sources=cfg["sources"], extra_cflags=cfg["cflags"],
    extra_cuda_cflags=cfg["cuda_cflags"], extra_ldflags=cfg["ldflags"],
    extra_include_paths=[cfg["include"]], build_directory=cfg["directory"],
    verbose=True, with_cuda=cfg["cuda"], is_python_module=False,
)
import os
print("{_WORKER_OK} " + os.path.join(cfg["directory"], cfg["name"] + ".so"), flush=True)
"""
