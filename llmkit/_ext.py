"""Building and loading the C++/CUDA extension (``csrc/``), backend ``cuda_ext``.

The extension is compiled with ninja through :func:`torch.utils.cpp_extension.load`
into a cache directory whose name holds everything the binary depends on: the torch
version, the Python version, a hash of the sources, the CPU instruction set and,
for a CUDA build, the GPU architectures. A build never happens behind the user's
back: the first use of the backend loads an existing build (a ``dlopen``, no
compiler) or reports "not built" with the command that builds it, unless the user
opted in with ``LLMKIT_EXT_AUTOBUILD=1``.

Public functions (used by :mod:`llmkit.dispatch`, ``llmkit info`` and
``llmkit build-ext``):

* :func:`unavailable_reason` ``(device_type) -> str | None``
* :func:`details` ``() -> dict[str, str]``
* :func:`build` ``(verbose=True, cuda=None) -> BuildResult``
* :func:`load` ``() -> str | None`` (the reason it could not, or None)

Environment variables:

* ``LLMKIT_EXT_AUTOBUILD=1``: build on first use when no build exists.
* ``LLMKIT_EXT_CACHE_DIR``: the cache root (default ``$XDG_CACHE_HOME/llmkit/ext``,
  i.e. ``~/.cache/llmkit/ext``).
* ``LLMKIT_BUILD_EXT=1`` at install time (``pip install --no-build-isolation .``):
  ``setup.py`` builds the extension into the installed package.
* ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``): GPU architectures of a CUDA build;
  default: those of the GPUs present (compute capability >= 8.0), else 8.0 and 9.0.
* ``MAX_JOBS``: parallel compiler jobs (ninja's default otherwise).

This module imports nothing from llmkit, so ``setup.py`` can load it by path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

__all__ = [
    "unavailable_reason",
    "details",
    "build",
    "load",
    "BuildResult",
    "csrc_dir",
    "source_files",
    "source_hash",
    "cache_root",
]

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
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
}


def cpu_isa() -> str:
    """The x86 vector ISA the CPU kernels are compiled for here: 'avx512', 'avx2' or 'default'."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "default")


def _isa_runs_here(isa: str | None) -> bool:
    """True when a build for ``isa`` can run on this CPU (its ISA is at most this CPU's)."""
    if isa not in _ISA_ORDER:
        return False
    return _ISA_ORDER.index(isa) <= _ISA_ORDER.index(cpu_isa())


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

    def summary(self) -> str:
        """One paragraph for people."""
        what = f"CPU + CUDA ({', '.join('sm_' + a.replace('.', '') for a in self.archs)})" if self.cuda else "CPU only"
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
        return (
            f"torch {torch.__version__} is a CPU-only build: the CUDA kernels need a CUDA build "
            "of torch"
        )
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
) -> BuildResult:
    """Compile the extension (a few minutes) and load it into this process.

    Args:
        verbose: print progress (``[3/7] compiling gelu_cpu.cpp``) and, on failure,
            the compiler's first error and the log's path.
        cuda: build the CUDA kernels too; None: when torch is a CUDA build and nvcc
            is found. True on a machine that cannot raises RuntimeError.
        root: the cache root (default :func:`cache_root`).
        stream: where progress goes (default sys.stderr).
        sources: the csrc directory to build (default :func:`csrc_dir`).

    The compiler runs in a subprocess (``python -m llmkit._ext``); its full output
    goes to ``build.log`` in the build directory. Returns a :class:`BuildResult`;
    never raises for a compile error (the result carries the first error).
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
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (_INFO_FILE, _FAILED_FILE):
        (directory / stale).unlink(missing_ok=True)
    log_path = directory / _LOG_FILE
    config = {
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
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        )
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
        lib = text.split(f"{_WORKER_OK} ", 1)[1].splitlines()[0].strip()
        info = {
            "library": Path(lib).name,
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
        _reset_state()
    else:
        result.first_error = first_error(text) or f"the build exited with status {rc} (no error line found)"
        (directory / _FAILED_FILE).write_text(
            json.dumps({"first_error": result.first_error, "log": str(log_path), "seconds": round(seconds, 1)})
        )
        _reset_state()
    if verbose:
        print(("llmkit: " if ok else "llmkit: ERROR: ") + result.summary(), file=out, flush=True)
    return result


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


# --------------------------------------------------------------------------------------
# finding and loading a build
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    loaded: bool = False
    reason: str | None = None
    """Why the extension is not loaded (None when loaded)."""
    directory: Path | None = None
    info: dict = dataclasses.field(default_factory=dict)


_lock = threading.RLock()
_state: _State | None = None
_reasons: dict[str, str | None] = {}


def _reset_state() -> None:
    global _state
    with _lock:
        if _state is not None and _state.loaded:
            return  # a loaded library stays loaded; a new build is picked up next process
        _state = None
        _reasons.clear()


def _search_roots() -> list[Path]:
    return [_PREBUILT_DIR, cache_root()]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def find_builds() -> list[tuple[Path, dict]]:
    """Finished builds for this torch, Python and these sources, best first.

    Builds for a vector ISA this CPU lacks (e.g. an AVX512 build in a cache shared
    with an AVX2 machine) are left out. A CUDA build that covers the GPUs here comes
    before a CPU-only one, then the widest ISA first.
    """
    try:
        prefix = _key_prefix(source_hash())
    except FileNotFoundError:
        return []
    found: list[tuple[Path, dict]] = []
    for root in _search_roots():
        if not root.is_dir():
            continue
        for d in sorted(root.glob(prefix + "*")):
            info = _read_json(d / _INFO_FILE)
            if info and (d / info.get("library", "")).is_file() and _isa_runs_here(info.get("cpu_isa")):
                found.append((d, info))

    def rank(item: tuple[Path, dict]) -> tuple[int, int, int]:
        info = item[1]
        cuda = bool(info.get("cuda")) and torch.cuda.is_available() and torch.version.cuda is not None
        return (
            0 if cuda and not _arch_mismatch(info) else 1,
            -_ISA_ORDER.index(info["cpu_isa"]),  # the widest vector ISA this CPU runs
            0 if item[0].parent == _PREBUILT_DIR else 1,
        )

    return sorted(found, key=rank)


def _failed_builds() -> list[dict]:
    try:
        prefix = _key_prefix(source_hash())
    except FileNotFoundError:
        return []
    root = cache_root()
    out = []
    if root.is_dir():
        for d in sorted(root.glob(prefix + "*")):
            f = _read_json(d / _FAILED_FILE)
            if f:
                out.append(f)
    return out


def _device_archs() -> list[tuple[int, int]]:
    if not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def _arch_mismatch(info: dict) -> str | None:
    built = set()
    for a in info.get("cuda_archs", []):
        nums = re.findall(r"\d+", a)
        if len(nums) >= 2:
            built.add((int(nums[0]), int(nums[1])))
    missing = []
    for cap in _device_archs():
        if cap < MIN_CUDA_CAPABILITY:
            continue
        # a cubin runs on the same major with an equal or higher minor
        if not any(b[0] == cap[0] and b[1] <= cap[1] for b in built):
            missing.append(f"sm_{cap[0]}{cap[1]}")
    if missing:
        have = ", ".join(f"sm_{a[0]}{a[1]}" for a in sorted(built)) or "none"
        return f"built for {have}, not for this GPU ({', '.join(missing)}): run `{BUILD_COMMAND}` here"
    return None


def _not_built_reason() -> str:
    try:
        h = source_hash()
    except FileNotFoundError as exc:
        return str(exc)
    failed = _failed_builds()
    if failed:
        f = failed[0]
        return (
            f"the last build failed: {f.get('first_error')} (log: {f.get('log')}); fix it and run "
            f"`{BUILD_COMMAND}`"
        )
    return (
        f"not built for torch {torch.__version__} (sources {h}): run `{BUILD_COMMAND}` "
        f"(a few minutes), or set {AUTOBUILD_ENV}=1 to build on first use"
    )


def load() -> str | None:
    """Load the best existing build into this process; None on success, else why not.

    Cheap: a directory listing, a hash of the sources and a ``dlopen``. Builds only
    when ``LLMKIT_EXT_AUTOBUILD=1`` is set and nothing is built yet.
    """
    global _state
    with _lock:
        if _state is not None:
            return _state.reason
        state = _State()
        builds = find_builds()
        if not builds and os.environ.get(AUTOBUILD_ENV, "0").lower() in ("1", "true", "yes", "on"):
            res = build(verbose=True)
            builds = find_builds() if res.ok else []
            if not res.ok:
                state.reason = f"the build ({AUTOBUILD_ENV}=1) failed: {res.first_error} (log: {res.log})"
        if builds:
            directory, info = builds[0]
            lib = directory / info["library"]
            try:
                torch.ops.load_library(str(lib))
            except Exception as exc:
                state.reason = f"the build in {directory} failed to load: {exc}"
            else:
                state.loaded = True
                state.directory = directory
                state.info = info
        elif state.reason is None:
            state.reason = _not_built_reason()
        _state = state
        return state.reason


def has_cuda_kernels() -> bool:
    """True when the loaded library registered its CUDA kernels."""
    if load() is not None:
        return False
    from llmkit._compat import dispatch_has_kernel  # lazily: setup.py loads this file alone

    return dispatch_has_kernel(f"{LIBRARY_NAMESPACE}::norm_fwd", "CUDA")


def unavailable_reason(device_type: str) -> str | None:
    """None when the extension can run on ``device_type`` ('cpu' or 'cuda'), else why not."""
    with _lock:
        if device_type in _reasons and _state is not None:
            return _reasons[device_type]
    if device_type not in ("cpu", "cuda"):
        return f"the C++/CUDA extension runs on cpu and cuda tensors, not {device_type}"
    reason = load()
    if reason is None and device_type == "cuda":
        if not torch.cuda.is_available():
            reason = "no CUDA GPU is available"
        elif not has_cuda_kernels():
            reason = (
                "the extension was built without its CUDA kernels (CPU only): run "
                f"`{BUILD_COMMAND}` with a CUDA build of torch and nvcc"
            )
        elif torch.version.hip is not None:
            reason = "the CUDA kernels do not support ROCm"
        else:
            caps = _device_archs()
            low = [c for c in caps if c < MIN_CUDA_CAPABILITY]
            if low:
                reason = (
                    "the CUDA kernels need compute capability >= 8.0 (bfloat16 tensor cores), got "
                    + ", ".join(f"{c[0]}.{c[1]}" for c in low)
                )
            else:
                reason = _arch_mismatch(_state.info if _state else {})
    with _lock:
        _reasons[device_type] = reason
    return reason


def details() -> dict[str, str]:
    """What ``llmkit info`` shows: built or not, where, for which CPU ISA and GPU archs."""
    reason = load()
    out: dict[str, str] = {}
    if reason is None and _state is not None:
        info = _state.info
        archs = info.get("cuda_archs") or []
        out["build"] = (
            f"built {info.get('built_at', '?')} in {info.get('build_seconds', '?')} s, torch "
            f"{info.get('torch')}, sources {info.get('sources')}"
        )
        out["cpu kernels"] = f"yes ({info.get('cpu_isa')})"
        out["cuda kernels"] = (
            f"yes, CUDA {info.get('cuda')}, " + ", ".join(f"sm_{a.replace('.', '')}" for a in archs)
            if info.get("cuda")
            else "no (CPU-only build)"
        )
        out["path"] = str(_state.directory)
    else:
        out["build"] = f"not loaded: {reason}"
        try:
            out["sources"] = f"{csrc_dir()} ({source_hash()})"
        except FileNotFoundError as exc:
            out["sources"] = str(exc)
        out["cache"] = str(cache_root())
        can_cuda = _check_can_build_cuda()
        out["cuda build"] = "possible here" if can_cuda is None else f"not possible here: {can_cuda}"
    return out


# --------------------------------------------------------------------------------------
# `llmkit build-ext`
# --------------------------------------------------------------------------------------


def add_build_ext_arguments(p) -> None:
    """Options of ``llmkit build-ext`` (an argparse parser)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cpu-only", action="store_true", help="build the C++ CPU kernels only")
    mode.add_argument(
        "--cuda", action="store_true", help="require the CUDA kernels (fail if they cannot be built)"
    )
    p.add_argument(
        "--arch",
        metavar="LIST",
        help='GPU architectures, e.g. "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST, else the GPUs here, else 8.0;9.0)',
    )
    p.add_argument("--jobs", type=int, metavar="N", help="parallel compiler jobs (MAX_JOBS)")
    p.add_argument("--cache-dir", metavar="DIR", help=f"cache root (default ${CACHE_ENV} or {cache_root()})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def run_build_ext_cli(args) -> int:
    """``llmkit build-ext``: build, load, and report; exit 1 with the first error on failure."""
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    if args.jobs:
        os.environ["MAX_JOBS"] = str(args.jobs)
    if args.cache_dir:
        os.environ[CACHE_ENV] = str(Path(args.cache_dir).expanduser())
    cuda: bool | None = False if args.cpu_only else (True if args.cuda else None)
    if cuda is None and _check_can_build_cuda() is not None:
        print(f"llmkit: CPU kernels only: {_check_can_build_cuda()}", file=sys.stderr)
    try:
        res = build(verbose=not args.quiet, cuda=cuda)
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"llmkit: ERROR: {exc}", file=sys.stderr)
        return 1
    if args.quiet:
        print(res.summary(), file=sys.stderr if not res.ok else sys.stdout)
    if not res.ok:
        return 1
    reason = load()
    if reason is not None:
        print(f"llmkit: built, but this process still uses an earlier load: {reason}", file=sys.stderr)
    for k, v in details().items():
        print(f"  {k}: {v}")
    return 0
