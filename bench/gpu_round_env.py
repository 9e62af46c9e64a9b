"""The environment of ``bench/gpu_round.py``'s steps: the CUDA toolkit on disk, the stack's
versions (printed by a subprocess: the round itself imports no torch), which test files exist
and which of them use the C++/CUDA extension. Standard library only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_cuda_home(environ: dict[str, str] | None = None, roots: tuple[str, ...] = ("/usr/local/cuda",),
                   versioned: str = "/usr/local") -> str | None:
    """The CUDA toolkit root: a folder with ``bin/nvcc`` and ``include/cuda_runtime.h``.

    ``$CUDA_HOME`` if it is one, else the first of ``roots`` that is, else two levels above
    the real path of the ``nvcc`` on ``PATH``, else ``<versioned>/cuda-*`` (newest name
    first). torch's own guess (the folder above ``nvcc``'s) is wrong where ``nvcc`` is a
    wrapper script outside the toolkit.
    """
    env = os.environ if environ is None else environ
    cands = [env.get("CUDA_HOME", ""), *roots]
    nvcc = shutil.which("nvcc", path=env.get("PATH", ""))
    if nvcc:
        cands.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    cands += sorted((str(p) for p in Path(versioned).glob("cuda-*")), reverse=True)
    for c in cands:
        p = Path(c)
        if c and (p / "bin" / "nvcc").is_file() and (p / "include" / "cuda_runtime.h").is_file():
            return str(p)
    return None


VERSIONS_CODE = r"""
import importlib, json, platform, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
for m in ("torch", "triton", "transformers", "numpy", "pytest", "xdist", "pytest_timeout", "hypothesis"):
    try:
        out[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception:
        out[m] = None
gpu = None
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
               "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
               "smem_per_block_optin": getattr(p, "shared_memory_per_block_optin", None)}
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
out["gpu"] = gpu
print(json.dumps(out))
"""


def tests_matching(patterns: tuple[str, ...]) -> list[str]:
    """tests/<pattern> files that exist, as paths relative to the repository root."""
    out: list[str] = []
    for pat in patterns:
        out += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob(pat))
    return out


# the `ext` fixture as a parameter or by name, or a build of the extension
_USES_EXTENSION = re.compile(r"def \w+\([^)]*\bext\b|getfixturevalue\(\s*[\"']ext[\"']|_ext\.build\(")


def tests_using_extension(folder: Path | None = None) -> list[str]:
    """Test files (of ``folder``, default tests/) that load or build the C++/CUDA extension."""
    folder = folder or ROOT / "tests"
    out = []
    for p in sorted(folder.glob("test_*.py")):
        if _USES_EXTENSION.search(p.read_text(errors="replace")):
            out.append(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p))
    return out


def has_module(py: str, name: str) -> bool:
    try:
        return subprocess.run([py, "-c", f"import {name}"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
