"""What a benchmark result must say about where it was taken.

Device name, driver, CUDA, torch, Triton and llmkit versions, the git commit of the
llmkit checkout, the date and the exact command line: enough for a reader to tell
whether two result files can be compared.
"""

from __future__ import annotations

import datetime
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .._version import __version__

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the checkout llmkit runs from, with ``-dirty`` if files are modified."""
    if not (REPO_ROOT / ".git").exists():
        return None
    head = _run(["git", "rev-parse", "HEAD"], REPO_ROOT)
    if head is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], REPO_ROOT)
    return head + ("-dirty" if dirty else "")


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_driver() -> str | None:
    """The NVIDIA driver version (nvidia-smi), or None."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def device_name(device: torch.device) -> str:
    """The human name of ``device`` (GPU model, or the CPU model)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device: torch.device) -> str:
    """A folder name for ``bench/results/<device>/``: lower case, dashes."""
    name = device_name(device)
    if device.type == "cpu":
        name = "cpu " + name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:60] or device.type


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def environment(device: torch.device, argv: list[str] | None = None) -> dict[str, Any]:
    """Everything the JSON result records about the machine, software and command."""
    env: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "driver": cuda_driver() if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "llmkit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["llmkit", *argv] if argv is not None else sys.argv),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["capability"] = f"sm_{p.major}{p.minor}"
        env["memory_gib"] = round(p.total_memory / 2**30, 1)
        env["sms"] = p.multi_processor_count
    return env
