"""Loading the C++/CUDA extension (``csrc/``), backend ``cuda_ext``.

Builds live in a cache directory (see :mod:`llmkit._ext_build`, which compiles them). A
build never happens behind the user's back: the first use of the backend loads an
existing build (a ``dlopen``, no compiler) or reports "not built" with the command that
builds it, unless the user opted in with ``LLMKIT_EXT_AUTOBUILD=1``.

Nothing about the extension can break llmkit. Before a library is loaded its name, size
and SHA-256 are checked against what its build recorded (:func:`verify_build`), so a
truncated, corrupted or foreign file is never mapped into the process (it would crash it:
SIGBUS / SIGSEGV); after loading, the library must register llmkit's CPU kernels. A build
that fails either check is skipped (the next one is tried) and reported: logged once, and
shown by ``llmkit info``. Every problem, an unwritable cache under
``LLMKIT_EXT_AUTOBUILD=1`` included, becomes the backend's unavailability reason: the
default dispatch order goes on to the next backend, and only a request for ``cuda_ext``
by name raises it (:class:`~llmkit.errors.BackendError`).

Public functions (used by :mod:`llmkit.dispatch`, ``llmkit info`` and
``llmkit build-ext``):

* :func:`unavailable_reason` ``(device_type) -> str | None``
* :func:`details` ``() -> dict[str, str]``
* :func:`build` ``(verbose=True, cuda=None, force=False) -> BuildResult``
* :func:`load` ``() -> str | None`` (the reason it could not, or None)

Environment variables:

* ``LLMKIT_EXT_AUTOBUILD=1``: build on first use when no usable build exists.
* ``LLMKIT_EXT_CACHE_DIR``: the cache root (default ``$XDG_CACHE_HOME/llmkit/ext``,
  i.e. ``~/.cache/llmkit/ext``).
* ``LLMKIT_BUILD_EXT=1`` at install time (``pip install --no-build-isolation .``):
  ``setup.py`` builds the extension into the installed package.
* ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``): GPU architectures of a CUDA build;
  default: those of the GPUs present (compute capability >= 8.0), else 8.0 and 9.0.
* ``MAX_JOBS``: parallel compiler jobs (ninja's default otherwise).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

import torch

from . import _ext_build
from ._compat import dispatch_has_kernel
from ._ext_build import (  # noqa: F401  (re-exported: llmkit._ext is the extension's one entry point)
    _FAILED_FILE,
    _INFO_FILE,
    _ISA_ORDER,
    _PREBUILT_DIR,
    AUTOBUILD_ENV,
    BUILD_COMMAND,
    CACHE_ENV,
    LIBRARY_NAMESPACE,
    MIN_CUDA_CAPABILITY,
    BuildResult,
    _check_can_build_cuda,
    _cpu_flags,
    _key_prefix,
    _read_json,
    build_dir_for,
    cache_root,
    cpu_isa,
    csrc_dir,
    cuda_arch_list,
    first_error,
    source_files,
    source_hash,
    verify_build,
)

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

logger = logging.getLogger("llmkit")

CPU_OPS = ("norm_fwd", "norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd", "quantize_rows")
"""The ``llmkit_ext`` ops every build registers CPU kernels for: a loaded library without
them is not an llmkit build of these sources."""


@functools.wraps(_ext_build.build)
def build(*args, **kwargs) -> BuildResult:
    result = _ext_build.build(*args, **kwargs)
    _reset_state()  # the next load() looks again (unless a library is loaded already)
    return result


# --------------------------------------------------------------------------------------
# finding, checking and loading a build
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    loaded: bool = False
    reason: str | None = None
    """Why the extension is not loaded (None when loaded)."""
    directory: Path | None = None
    info: dict = dataclasses.field(default_factory=dict)
    rejected: list[str] = dataclasses.field(default_factory=list)
    """Builds found but skipped: 'directory: why'."""


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


def _isa_runs_here(isa: str | None) -> bool:
    """True when a build for ``isa`` can run on this CPU (its ISA is at most this CPU's)."""
    if isa not in _ISA_ORDER:
        return False
    return _ISA_ORDER.index(isa) <= _ISA_ORDER.index(cpu_isa())


def find_builds() -> list[tuple[Path, dict]]:
    """Finished builds for this torch, Python and these sources, best first (unchecked:
    :func:`load` verifies each before loading it).

    Builds for a vector ISA this CPU lacks (e.g. an AVX512 build in a cache shared
    with an AVX2 machine) are left out. A CUDA build that covers the GPUs here comes
    before a CPU-only one, then the widest ISA first.
    """
    try:
        prefix = _key_prefix(source_hash())
    except OSError:
        return []
    found: list[tuple[Path, dict]] = []
    for root in _search_roots():
        if not root.is_dir():
            continue
        for d in sorted(root.glob(prefix + "*")):
            info = _read_json(d / _INFO_FILE)
            if (
                isinstance(info, dict)
                and isinstance(info.get("library"), str)
                and (d / info["library"]).is_file()
                and _isa_runs_here(info.get("cpu_isa"))
            ):
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
    except OSError:
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


def _not_built_reason(rejected: list[str]) -> str:
    try:
        h = source_hash()
    except OSError as exc:
        return str(exc)
    if rejected:
        return (
            f"no usable build: skipped {'; '.join(rejected)}; run `{BUILD_COMMAND}` to rebuild "
            f"(or set {AUTOBUILD_ENV}=1 to rebuild on first use)"
        )
    failed = _failed_builds()
    if failed:
        f = failed[0]
        return f"the last build failed: {f.get('first_error')} (log: {f.get('log')}); fix it and run `{BUILD_COMMAND}`"
    return (
        f"not built for torch {torch.__version__} (sources {h}): run `{BUILD_COMMAND}` "
        f"(a few minutes), or set {AUTOBUILD_ENV}=1 to build on first use"
    )


def _open_library(lib: Path) -> str | None:
    """``dlopen`` a verified library; None when it registered llmkit's kernels, else why not."""
    try:
        torch.ops.load_library(str(lib))
    except Exception as exc:  # noqa: BLE001 - whatever the loader says becomes the reason
        return f"it failed to load: {exc}"
    missing = [op for op in CPU_OPS if not dispatch_has_kernel(f"{LIBRARY_NAMESPACE}::{op}", "CPU")]
    if missing:
        return (
            f"it loaded but registers no CPU kernel for {', '.join(LIBRARY_NAMESPACE + '::' + m for m in missing)}"
            ": it is not an llmkit build of these sources"
        )
    return None


def _load_first_good(state: _State) -> None:
    """Load the best build that passes :func:`verify_build` and registers the kernels."""
    for directory, info in find_builds():
        why = verify_build(directory, info) or _open_library(directory / info["library"])
        if why is None:
            state.loaded, state.reason, state.directory, state.info = True, None, directory, info
            return
        state.rejected.append(f"{directory}: {why}")
        logger.warning(
            "llmkit: the C++/CUDA extension build in %s is not used: %s; `%s` rebuilds it",
            directory,
            why,
            BUILD_COMMAND,
        )


def _autobuild_wanted() -> bool:
    return os.environ.get(AUTOBUILD_ENV, "0").lower() in ("1", "true", "yes", "on")


def _load(state: _State) -> None:
    _load_first_good(state)
    if state.loaded or not _autobuild_wanted():
        if not state.loaded:
            state.reason = _not_built_reason(state.rejected)
        return
    try:
        res = _ext_build.build(verbose=True)
    except Exception as exc:  # noqa: BLE001 - an unwritable cache, no compiler, ...
        state.reason = f"the build ({AUTOBUILD_ENV}=1) could not run: {type(exc).__name__}: {exc}"
    else:
        if res.ok:
            state.rejected.clear()
            _load_first_good(state)
            if not state.loaded:
                state.reason = _not_built_reason(state.rejected)
        else:
            state.reason = f"the build ({AUTOBUILD_ENV}=1) failed: {res.first_error} (log: {res.log})"
    if state.reason is not None:
        logger.warning("llmkit: the C++/CUDA extension is not available: %s", state.reason)


def load() -> str | None:
    """Load the best usable build into this process; None on success, else why not.

    Cheap: a directory listing, a hash of the sources and of the library, a ``dlopen``.
    Builds only when ``LLMKIT_EXT_AUTOBUILD=1`` is set and no usable build exists. Never
    raises: every problem becomes the returned reason (logged once where it is news, i.e.
    anything but "not built yet").
    """
    global _state
    with _lock:
        if _state is not None:
            return _state.reason
        state = _State()
        try:
            _load(state)
        except Exception as exc:  # noqa: BLE001 - a broken extension never breaks llmkit
            state.loaded = False
            state.reason = f"the C++/CUDA extension could not be loaded: {type(exc).__name__}: {exc}"
            logger.warning("llmkit: %s", state.reason)
        _state = state
        return state.reason


def has_cuda_kernels() -> bool:
    """True when the loaded library registered its CUDA kernels."""
    if load() is not None:
        return False
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
                reason = "the CUDA kernels need compute capability >= 8.0 (bfloat16 tensor cores), got " + ", ".join(
                    f"{c[0]}.{c[1]}" for c in low
                )
            else:
                reason = _arch_mismatch(_state.info if _state else {})
    with _lock:
        _reasons[device_type] = reason
    return reason


def details() -> dict[str, str]:
    """What ``llmkit info`` shows: built or not, where, for which CPU ISA and GPU archs, and
    the builds that were found but skipped (with why)."""
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
        except OSError as exc:
            out["sources"] = str(exc)
        out["cache"] = str(cache_root())
        can_cuda = _check_can_build_cuda()
        out["cuda build"] = "possible here" if can_cuda is None else f"not possible here: {can_cuda}"
    for i, why in enumerate(_state.rejected if _state is not None else []):
        out[f"skipped build {i + 1}"] = why
    return out


# --------------------------------------------------------------------------------------
# `llmkit build-ext`
# --------------------------------------------------------------------------------------


def add_build_ext_arguments(p) -> None:
    """Options of ``llmkit build-ext`` (an argparse parser)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cpu-only", action="store_true", help="build the C++ CPU kernels only")
    mode.add_argument("--cuda", action="store_true", help="require the CUDA kernels (fail if they cannot be built)")
    p.add_argument(
        "--arch",
        metavar="LIST",
        help='GPU architectures, e.g. "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST, else the GPUs here, else 8.0;9.0)',
    )
    p.add_argument("--jobs", type=int, metavar="N", help="parallel compiler jobs (MAX_JOBS)")
    p.add_argument("--cache-dir", metavar="DIR", help=f"cache root (default ${CACHE_ENV} or {cache_root()})")
    p.add_argument(
        "--force", action="store_true", help="rebuild from scratch even when an identical build is in the cache"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def _cache_dir_problem(root: Path) -> str | None:
    """None when builds can be written under ``root``, else why not (one line)."""
    if root.exists() and not root.is_dir():
        return f"the cache directory {root} is a file, not a directory"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        return f"cannot write builds into the cache directory {root}: {exc.strerror or exc}"
    return None


def run_build_ext_cli(args) -> int:
    """``llmkit build-ext``: build (or find the identical build up to date), load, and report.

    Exit 0 when built or up to date, 1 on a failed build (with its first error); a cache
    directory that cannot be written raises :class:`~llmkit.errors.UsageError` (exit 2).
    """
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    if args.jobs:
        os.environ["MAX_JOBS"] = str(args.jobs)
    if args.cache_dir:
        os.environ[CACHE_ENV] = str(Path(args.cache_dir).expanduser())
    problem = _cache_dir_problem(cache_root())
    if problem:
        from .errors import UsageError

        raise UsageError(problem)
    cuda: bool | None = False if args.cpu_only else (True if args.cuda else None)
    if cuda is None and _check_can_build_cuda() is not None:
        print(f"llmkit: CPU kernels only: {_check_can_build_cuda()}", file=sys.stderr)
    try:
        res = build(verbose=not args.quiet, cuda=cuda, force=bool(getattr(args, "force", False)))
    except (RuntimeError, OSError) as exc:
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
