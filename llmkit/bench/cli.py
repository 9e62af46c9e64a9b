"""``llmkit bench``: arguments, the run with its progress bar, and the files it writes.

Writes, into ``--out`` (default ``llmkit-bench-results/<device>/``): ``<name>.json`` (every
sample, the environment and the exact command), ``<name>.md`` (the tables) and
``<name>-plots/*.png``; prints the table to stdout. Exit code: 0 everything ran, 1 a
failure or a wrong output, 2 nothing could run (or a bad shapes file), 3 something asked
for was skipped (the reasons are printed and recorded).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from ..dispatch import BACKEND_NAMES
from .progress import progress_callback


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``llmkit bench``."""
    p.add_argument(
        "--op",
        action="append",
        dest="ops",
        metavar="SUITE",
        help="run only this suite (repeatable or comma-separated); see --list. Default: every suite",
    )
    p.add_argument(
        "--shapes",
        metavar="SET",
        help="shape set of bench/shapes.json (default: gpu on CUDA, "
        "cpu on the CPU, quick with --quick; model suites also have e.g. bert-base, gpt2-medium)",
    )
    p.add_argument("--shapes-file", metavar="FILE", help="another shapes file (default: bench/shapes.json)")
    p.add_argument(
        "--dtype",
        action="append",
        dest="dtypes",
        metavar="DTYPE",
        help="float32, float16, bfloat16 (repeatable; default bfloat16 on CUDA, float32 on the CPU)",
    )
    p.add_argument(
        "--backend",
        action="append",
        dest="backends",
        metavar="NAME",
        help=f"llmkit backends to measure (repeatable): {', '.join(BACKEND_NAMES)}; default: every one available here",
    )
    p.add_argument(
        "--pass",
        action="append",
        dest="passes",
        metavar="PASS",
        help="fwd, bwd, prefill or decode (repeatable; default: all of each suite)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, short timings, no torch.compile: a smoke run (about a minute on 2 CPU cores)",
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="include torch.compile baselines (default: on, off with --quick)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave torch.compile baselines out")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is available")
    p.add_argument(
        "--seconds",
        type=float,
        metavar="S",
        help="CPU: timed seconds per implementation and case (default 0.4; 0.02 with --quick)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU: torch threads while timing (default: torch's default; 1 with --quick, which keeps "
        "a shared machine's load from stalling multi-threaded regions)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the JSON, markdown and PNGs "
        "(default llmkit-bench-results/<device>; committed results go to bench/results/<device>)",
    )
    p.add_argument("--name", metavar="NAME", help="file name stem (default: bench, or quick with --quick)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG")
    p.add_argument("--list", action="store_true", help="list the suites and their shape sets, then exit")


def _command(args: argparse.Namespace) -> list[str]:
    """The command as typed when run as ``llmkit bench ...``, else rebuilt from the options."""
    if sys.argv[1:2] == ["bench"]:
        return sys.argv[1:]
    out = ["bench"]
    for flag, dest in (("--op", "ops"), ("--dtype", "dtypes"), ("--backend", "backends"), ("--pass", "passes")):
        for v in getattr(args, dest) or []:
            out += [flag, v]
    for flag, dest in (
        ("--shapes", "shapes"),
        ("--shapes-file", "shapes_file"),
        ("--device", "device"),
        ("--seconds", "seconds"),
        ("--threads", "threads"),
        ("--out", "out"),
        ("--name", "name"),
    ):
        if getattr(args, dest) is not None:
            out += [flag, str(getattr(args, dest))]
    if args.quick:
        out.append("--quick")
    if args.compile is not None:
        out.append("--compile" if args.compile else "--no-compile")
    if args.no_plots:
        out.append("--no-plots")
    return out


def _list_suites(shapes_file: str | None) -> int:
    from .runner import CUDA_ONLY
    from .shapes import load_shapes
    from .suite import SUITES

    shapes = load_shapes(shapes_file)
    print(f"shapes file {shapes.path} (version {shapes.version})")
    for name, s in SUITES.items():
        print(f"  {name:18} passes {','.join(s.passes):12} sets {', '.join(shapes.set_names(name))}: {s.description}")
    for name in CUDA_ONLY:
        print(f"  {name:18} CUDA only; measured at the start of every CUDA run")
    return 0


def run_bench_cli(args: argparse.Namespace) -> int:
    """``llmkit bench``: run, print the table, write JSON / markdown / PNG."""
    from .env import device_slug
    from .plot import write_plots
    from .report import format_markdown, format_table, write_json
    from .runner import EXIT_NOTHING, Options, run_bench
    from .shapes import ShapesError

    if args.list:
        try:
            return _list_suites(args.shapes_file)
        except ShapesError as exc:
            print(f"llmkit bench: {exc}", file=sys.stderr)
            return EXIT_NOTHING
    opts = Options(
        ops=_split(args.ops),
        shapes=args.shapes,
        shapes_file=args.shapes_file,
        dtypes=_split(args.dtypes),
        backends=_split(args.backends),
        passes=_split(args.passes),
        quick=args.quick,
        compile=args.compile,
        device=args.device,
        seconds=args.seconds,
        threads=args.threads,
    )
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("llmkit bench: --device cuda, but no CUDA GPU is available", file=sys.stderr)
        return EXIT_NOTHING
    try:
        report = run_bench(opts, _command(args), progress_callback())
    except ShapesError as exc:
        print(f"llmkit bench: {exc}", file=sys.stderr)
        return EXIT_NOTHING
    print(format_table(report))
    if report.exit_code == EXIT_NOTHING:  # no result to keep: leave --out as it was
        print("\nnothing ran: no result files written")
        return report.exit_code

    device = torch.device(report.env["device"])
    out = Path(args.out) if args.out else Path("llmkit-bench-results") / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("quick" if args.quick else "bench")
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    write_json(report, json_path)
    md_path.write_text(format_markdown(report))
    print(f"\nwrote {json_path}\nwrote {md_path}")
    if not args.no_plots:
        pngs, why = write_plots(report, out / f"{name}-plots")
        if why:
            print(f"no plots: {why}")
        else:
            print(f"wrote {len(pngs)} PNG plot(s) in {out / (name + '-plots')}")
    print(f"command: {shlex.join(['llmkit', *_command(args)])}")
    return report.exit_code
