"""The ``llmkit`` command line.

Subcommands: ``info`` (versions, devices, backends and why they are unavailable),
``check`` (every op against an independent float64 reference on this machine).
Each subcommand lives in its own module; this file only wires argument parsing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info

    print(format_info())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .check import run_check_cli

    return run_check_cli(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.cli import run_bench_cli

    return run_bench_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args)


def _cmd_build_ext(args: argparse.Namespace) -> int:
    from ._ext import run_build_ext_cli

    return run_build_ext_cli(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``llmkit``."""
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="llmkit", description="Fused GPU kernels for PyTorch Transformers.")
    parser.add_argument("--version", action="version", version=f"llmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions, devices, and which backends can run here")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "check",
        help="check every op on every available backend against a float64 reference",
        description=(
            "Runs every op on a sweep of shapes and dtypes with fresh random inputs, "
            "forward and backward, on every backend available here (Triton through its "
            "interpreter on a machine without a GPU), compares with an independent "
            "float64 computation and prints a table. Exits 1 if anything fails."
        ),
    )
    from .check import add_check_arguments

    add_check_arguments(p)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "bench",
        help="benchmark every op and end-to-end model against PyTorch (table, JSON, markdown, PNG)",
        description=(
            "Times llmkit's ops on every available backend and end-to-end models against "
            "PyTorch eager, torch.compile and peers in the same run (GPU: do_bench with the "
            "roofline measured in the same run; CPU: interleaved torch.utils.benchmark), "
            "checks each output first, and writes a table, JSON, markdown and PNG plots. "
            "Exit code 3 when something asked for was skipped, 1 on a failure."
        ),
    )
    from .bench.cli import add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "demo",
        help="swap llmkit into a GPT-2-small-shaped model, check it against the original, time both",
        description=(
            "Builds a GPT-2-small-shaped model with random weights (a HuggingFace GPT-2 from a "
            "config, no download, when transformers is installed, and llmkit's GPT with the same "
            "weights), swaps llmkit in, checks logits and greedy tokens against the original and "
            "the reference backend, and times prefill and decoding on this machine. "
            "--model bert does the same for a BERT-base-shaped encoder. Exits 1 if a check fails."
        ),
    )
    from .demo import add_arguments as add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "build-ext",
        help="compile the C++/CUDA extension (backend cuda_ext) into its cache, with progress",
        description=(
            "Compiles csrc/ with ninja through torch.utils.cpp_extension into a cache directory "
            "keyed by the torch version and a hash of the sources: the C++ CPU kernels always, "
            "the CUDA kernels when torch is a CUDA build and nvcc is found. Prints each compile "
            "step, then what was built; on failure the compiler's first error and the log's path "
            "(exit 1)."
        ),
    )
    from ._ext import add_build_ext_arguments

    add_build_ext_arguments(p)
    p.set_defaults(func=_cmd_build_ext)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmkit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"] and not _has_gpu_quick():
        # Triton kernels must be decorated in interpreter mode to run on CPU tensors;
        # set it before anything imports Triton. An explicit setting is respected.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import UnknownBackendError, UsageError

    try:
        return int(args.func(args) or 0)
    except (UsageError, UnknownBackendError) as exc:
        # an argument (or LLMKIT_BACKEND) llmkit cannot use: one line, no traceback
        print(f"llmkit {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _has_gpu_quick() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
