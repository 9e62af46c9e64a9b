"""``llmkit info``: versions, devices and each backend's availability with reasons."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .dispatch import backend_info, env_selection_summary, triton_interpreting


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # not installed or broken
        return f"not available ({type(exc).__name__})"


def devices() -> list[str]:
    """One line per device: the CPU and every CUDA GPU with its capability and memory."""
    out = [f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(
                f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                f"{p.multi_processor_count} SMs"
            )
    else:
        out.append("cuda: no CUDA GPU is available")
    return out


def format_info() -> str:
    """The text ``llmkit info`` prints."""
    lines = [
        f"llmkit {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA (torch build) {torch.version.cuda or 'none'}, triton {_triton_version()}",
    ]
    if triton_interpreting():
        lines.append("TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the interpreter")
    env = env_selection_summary()
    lines.append(env if env is not None else "LLMKIT_BACKEND is not set: each call takes the default order")
    lines.append("")
    lines.append("devices:")
    lines += [f"  {d}" for d in devices()]
    lines.append("")
    lines.append("backends:")
    for b in backend_info():
        lines.append(f"  {b.name} - {b.description}")
        for dev, reason in b.available.items():
            lines.append(f"    {dev:5} {'available' if reason is None else 'unavailable: ' + reason}")
        for k, v in b.details.items():
            lines.append(f"    {k}: {v}")
        ops = ", ".join(f"{op}({'+'.join(st)})" for op, st in b.ops.items()) or "none"
        lines.append(f"    ops: {ops}")
    return "\n".join(lines)
