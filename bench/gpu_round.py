#!/usr/bin/env python3
"""llmkit's one-shot GPU acceptance run: a GPU CI job for a machine with one CUDA GPU.

From the repository root::

    python3 bench/gpu_round.py --out out/gpu-round          # ends within --budget (500 s)

Steps, each under its own timeout inside one global deadline (a step that fails or runs
out of time never stops the others; a timed-out step gets SIGINT first, so pytest,
``llmkit check`` and ``llmkit bench`` still write what they ran, then SIGKILL):

0. versions, ``nvidia-smi``, ``pip freeze``; ``pip install --no-index --no-deps
   --no-build-isolation -e .`` (no network); ``llmkit bench --list`` (validates
   ``bench/shapes.json``); ``llmkit info``.
1. In parallel: ``llmkit build-ext --cuda`` for this GPU's architecture (``CUDA_HOME``
   set to the toolkit found on disk: torch guesses wrong where ``nvcc`` is a wrapper),
   the Triton kernel tests (``LLMKIT_TEST_GPU=1``; without it ``tests/conftest.py``
   runs every kernel through the interpreter on the CPU), ``llmkit check --device cuda
   --backend triton``.
2. In parallel, once the extension is built: its tests, ``llmkit check --device cuda
   --backend cuda_ext``, and the rest of the test suite.
3. One at a time (timing): ``llmkit bench`` on the shape set ``round`` of
   ``bench/shapes.json`` in bfloat16 without torch.compile baselines: norms, GELU and
   quantization; attention forward / backward and decode; W8A8 and W8A16; GPT-2 prefill
   and decode, BERT.

Results, in one flat folder (``--out``; 7 files):

* ``summary.md``: per op, whether it ran on the GPU, tests passed / failed, ``llmkit
  check`` PASS / FAIL, measured speed against PyTorch eager; every step with its status,
  time and timeout; the failures.
* ``summary.json``: the same, machine-readable, with the versions.
* ``round.log``: this run's console.
* ``junit.xml``, ``check.json``, ``bench.json``: every pytest run's JUnit XML, every
  check run's and every bench run's JSON, merged (one entry per step).
* ``logs.tar.gz``: every step's full output and the raw files above, ``pip freeze``,
  ``nvidia-smi``, the extension's build log.

The summary files are rewritten after every step, so a run cut short still leaves them.
Without a CUDA GPU (or with ``--dry-run``) nothing is installed or built and no GPU step
runs: each runs a CPU smoke version instead (test collection, a small test file, a quick
CPU check and bench), which exercises the tools and the summary; the summary says that
the GPU steps did not run. Only the standard library is used here: llmkit, torch and
pytest run in the steps' own processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpu_round_env import VERSIONS_CODE, find_cuda_home, has_module, tests_matching, tests_using_extension
from gpu_round_report import RESULT_FILES, write_results

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 500
KILL_AFTER_S = 10  # SIGKILL this long after a timeout's SIGINT
GRACE_S = KILL_AFTER_S + 2
SUMMARY_RESERVE_S = 15  # the summary files and the tarball at the end

# Test files by step. Everything else under tests/ runs in the step "pytest-rest", except
# NOT_ON_GPU: compile-only checks that need no GPU and minutes of CPU (verified on CPU
# machines), and the dry-run test of this script. The extension's step also takes every
# test file that uses it (see tests_using_extension): they run once it is built, never
# building it a second time beside the build step.
ROW_TESTS = ("test_layer_norm.py", "test_llm_norms.py", "test_gelu.py", "test_glu.py", "test_int8_matmul.py",
             "test_int8_linear.py")
ATTENTION_TESTS = ("test_attention.py", "test_decode_attention.py", "test_varlen_attention.py")
EXT_TESTS = ("test_cuda_ext*.py", "test_nn_backends.py")
NOT_ON_GPU = ("test_compile_report.py", "test_csrc_compile.py", "test_gpu_round.py")
SMOKE_TESTS = ("test_reference.py",)  # the dry run's real pytest run: small, pure CPU

CHECK_GROUPS = {
    "attention": ("attention", "decode_attention", "varlen_attention"),
    "rows": ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "gelu", "bias_gelu", "geglu", "swiglu",
             "quantize_int8", "int8_matmul", "int8_linear"),
}
# bench groups, in the order they run, with the least time each needs (seconds)
BENCH_GROUPS = (
    ("attention", ("attention", "attention_window", "attention_llm", "varlen_attention", "decode_attention",
                   "decode_paged"), 45),
    ("norms", ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "gelu", "bias_gelu", "swiglu", "geglu",
               "quantize_int8"), 30),
    ("int8", ("int8_w8a8", "int8_w8a16"), 25),
    ("models", ("gpt2_prefill", "gpt2_decode", "bert", "llama_prefill"), 45),
)


# --------------------------------------------------------------------------------------
# steps and their processes
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    """One command of the round, its limits and what became of it."""

    name: str
    kind: str  # versions, install, info, build, pytest, collect, check, bench
    cmd: list[str] | None
    """None: not run (``note`` says why)."""
    cap_s: float = 60.0
    reserve_s: float = 0.0
    """Seconds the later steps need: the timeout never eats into them."""
    min_s: float = 10.0
    """A step with less time than this left is skipped."""
    gpu: bool = True
    """The step needs the GPU (a dry run replaces or skips it)."""
    output: str | None = None
    """The file (in the work folder) the step writes its results to: JUnit XML or JSON."""
    status: str = "pending"  # pending, running, ok, failed, timeout, skipped, not run
    rc: int | None = None
    seconds: float = 0.0
    timeout_s: float = 0.0
    note: str = ""
    proc: Any = dataclasses.field(default=None, repr=False)
    t0: float = 0.0
    interrupted_at: float | None = None
    log: Path | None = None

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "gpu": self.gpu, "status": self.status, "rc": self.rc,
                "seconds": round(self.seconds, 1), "timeout_s": round(self.timeout_s), "note": self.note,
                "command": shlex.join(self.cmd) if self.cmd else None,
                "log": f"logs/{self.log.name}" if self.log else None}


def _child_setup() -> None:
    # Steps start with SIGINT at its default even where this script inherited it ignored
    # (a background job of a non-interactive shell): Python then turns a timeout's SIGINT
    # into KeyboardInterrupt, and pytest / check / bench write what they ran.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Round:
    """Runs steps against one deadline and keeps the console, the logs and the summary."""

    def __init__(self, out: Path, work: Path, budget_s: float, dry_run: bool, env: dict[str, str]):
        self.out, self.work, self.logs = out, work, work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        self.t_start = time.monotonic()
        self.deadline = self.t_start + budget_s
        self.budget_s = budget_s
        self.dry_run = dry_run
        self.env = env
        self.steps: list[Step] = []
        self.running: list[Step] = []
        self.console: list[str] = []
        self.info: dict[str, Any] = {}

    # -- console --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t_start:5.0f}s] {text}"
        print(line, flush=True)
        self.console.append(line)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # -- running --------------------------------------------------------------------------

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        step.log = self.logs / f"{len(self.steps):02d}-{step.name}.log"
        return step

    def not_run(self, step: Step, why: str) -> Step:
        self.add(step)
        step.status, step.note = "not run", why
        self.say(f"{step.name}: not run ({why})")
        return step

    def start(self, step: Step) -> Step:
        """Start ``step`` in the background with its timeout (or skip it: no time left)."""
        self.add(step)
        if step.cmd is None:
            step.status = "not run"
            return step
        t = min(step.cap_s, self.left() - step.reserve_s - GRACE_S)
        if t < step.min_s:
            step.status = "skipped"
            step.note = f"no time left ({self.left():.0f} s, {step.reserve_s:.0f} s kept for later steps)"
            self.say(f"{step.name}: skipped, {step.note}")
            return step
        step.timeout_s = t
        self.say(f"{step.name}: start (timeout {t:.0f} s): {shlex.join(step.cmd)}")
        with open(step.log, "w") as log:
            log.write(f"$ {shlex.join(step.cmd)}\n")
            log.flush()
            step.proc = subprocess.Popen(step.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_child_setup)
        step.t0 = time.monotonic()
        step.status = "running"
        self.running.append(step)
        return step

    def _signal(self, step: Step, sig: int) -> None:
        try:
            os.killpg(step.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _poll(self) -> None:
        now = time.monotonic()
        for step in list(self.running):
            rc = step.proc.poll()
            if rc is None:
                if step.interrupted_at is None and now - step.t0 > step.timeout_s:
                    step.interrupted_at = now
                    self.say(f"{step.name}: time limit ({step.timeout_s:.0f} s): SIGINT")
                    self._signal(step, signal.SIGINT)
                elif step.interrupted_at is not None and now - step.interrupted_at > KILL_AFTER_S:
                    self.say(f"{step.name}: still running {KILL_AFTER_S} s after SIGINT: SIGKILL")
                    self._signal(step, signal.SIGKILL)
                    step.interrupted_at = math.inf  # killed: wait for the exit
                continue
            self._signal(step, signal.SIGKILL)  # what the step left running (xdist workers, compilers)
            step.rc, step.seconds = rc, now - step.t0
            step.status = "timeout" if step.interrupted_at is not None else ("ok" if rc == 0 else "failed")
            self.running.remove(step)
            if step.kind == "collect":
                found = re.findall(r"(\d+) tests? collected", step.log.read_text(errors="replace"))
                step.note = f"{found[-1]} tests collected" if found else step.note
            elif step.status != "ok" and not step.note:
                step.note = _tail(step.log, 1)[:200]
            tail = _tail(step.log, 3)
            self.say(
                f"{step.name}: {step.status} (rc {rc}) in {step.seconds:.0f} s" + (f"\n      {tail}" if tail else "")
            )
            self.snapshot()

    def wait(self, *steps: Step) -> None:
        """Wait for ``steps`` (every running step's limits are enforced meanwhile)."""
        while any(s in self.running for s in steps):
            self._poll()
            time.sleep(0.2)

    def run(self, step: Step) -> Step:
        self.start(step)
        self.wait(step)
        return step

    def stop_all(self) -> None:
        for step in list(self.running):
            self._signal(step, signal.SIGKILL)
            step.proc.wait()
            step.status, step.rc, step.seconds = "timeout", step.proc.returncode, time.monotonic() - step.t0
            step.note = (step.note + " " if step.note else "") + "stopped: the round was interrupted"
            self.running.remove(step)

    # -- results --------------------------------------------------------------------------

    def snapshot(self) -> None:
        """The summary files as of now (a run cut off later still leaves these)."""
        try:
            write_results(self)
        except Exception as exc:  # the summary must never stop the round
            self.say(f"summary failed: {type(exc).__name__}: {exc}")


def _tail(path: Path | None, n: int) -> str:
    if path is None or not path.is_file():
        return ""
    lines = [ln.rstrip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return "\n      ".join(ln[:200] for ln in lines[-n:])


# --------------------------------------------------------------------------------------
# the environment of the steps
# --------------------------------------------------------------------------------------


def read_versions(rnd: Round, py: str) -> dict[str, Any]:
    """Versions of the stack and the GPU (in a subprocess: this script imports no torch)."""
    step = rnd.run(Step("versions", "versions", [py, "-c", VERSIONS_CODE], cap_s=90, min_s=5, gpu=False))
    text = step.log.read_text(errors="replace") if step.log else ""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {"error": f"could not read the versions (step {step.status}); see {step.log.name if step.log else '?'}"}


def _tool_output(rnd: Round, name: str, cmd: list[str], timeout: float = 30) -> None:
    """A diagnostic command's output into the logs (never fails the round)."""
    path = rnd.logs / name
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        path.write_text(f"$ {shlex.join(cmd)}\n{res.stdout}{res.stderr}")
    except (OSError, subprocess.SubprocessError) as exc:
        path.write_text(f"$ {shlex.join(cmd)}\nfailed: {type(exc).__name__}: {exc}\n")


# --------------------------------------------------------------------------------------
# the round
# --------------------------------------------------------------------------------------


def run_round(args: argparse.Namespace) -> int:
    py = args.python or sys.executable
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="llmkit-gpu-round-"))
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    env = dict(os.environ)
    env.update({"LLMKIT_TEST_SEED": str(seed), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(work / "triton-cache")})
    rnd = Round(out, work, args.budget, dry_run=True, env=env)
    for name in RESULT_FILES:  # results of an earlier round in this folder are not this round's
        (out / name).unlink(missing_ok=True)
    rnd.info.update({"seed": seed, "work": str(work), "out": str(out), "budget_s": args.budget,
                     "command": shlex.join([Path(py).name, *sys.argv]), "python_used": py,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    rnd.say(f"llmkit GPU round: budget {args.budget:.0f} s, work {work}, results {out}, LLMKIT_TEST_SEED={seed}")
    try:
        _run_steps(rnd, args, py, env)
    except KeyboardInterrupt as exc:
        rnd.say(f"interrupted ({exc}): stopping the running steps")
        rnd.stop_all()
    finally:
        rnd.info["elapsed_s"] = round(time.monotonic() - rnd.t_start, 1)
        rnd.say(f"done in {rnd.info['elapsed_s']:.0f} s")
        write_results(rnd)
        print("\n" + (out / "summary.md").read_text(), flush=True)
    bad = [s for s in rnd.steps if s.status in ("failed", "timeout", "skipped")]
    return 1 if bad or rnd.info.get("tests_failed") else 0


def _run_steps(rnd: Round, args: argparse.Namespace, py: str, env: dict[str, str]) -> None:
    versions = read_versions(rnd, py)
    rnd.info["versions"] = versions
    gpu = versions.get("gpu")
    rnd.dry_run = bool(args.dry_run or not gpu)
    if rnd.dry_run:
        why = "--dry-run" if args.dry_run else "no CUDA GPU is available"
        rnd.info["dry_run_reason"] = why
        rnd.say(f"DRY RUN ({why}): nothing is installed or built, the GPU steps do not run; CPU smoke steps do")
    else:
        rnd.say(f"GPU: {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['sms']} SMs, "
                f"{gpu['memory_gib']} GiB), torch {versions.get('torch')}, triton {versions.get('triton')}")
        env["LLMKIT_TEST_GPU"] = "1"  # tests/conftest.py: real kernels, not the interpreter
        env.pop("TRITON_INTERPRET", None)
        env["LLMKIT_EXT_CACHE_DIR"] = str(rnd.work / "ext-cache")  # this round's build only
        cuda_home = find_cuda_home(env)
        rnd.info["cuda_home"] = cuda_home
        if cuda_home:
            env["CUDA_HOME"] = cuda_home
            env["PATH"] = f"{cuda_home}/bin{os.pathsep}{env.get('PATH', '')}"
        rnd.say(f"CUDA_HOME={cuda_home or '(no toolkit found: the extension build will fail)'}")
    _tool_output(rnd, "nvidia-smi.txt", ["nvidia-smi"], 20)
    _tool_output(rnd, "nvcc.txt", [os.path.join(env.get("CUDA_HOME", ""), "bin", "nvcc") if env.get("CUDA_HOME")
                                   else "nvcc", "--version"], 20)
    _tool_output(rnd, "pip-freeze.txt", [py, "-m", "pip", "freeze"], 60)
    rnd.snapshot()

    llmkit = [py, "-m", "llmkit.cli"]
    # 0. install (no network), shapes, info
    install = Step("install", "install", [py, "-m", "pip", "install", "--no-index", "--no-deps",
                                          "--no-build-isolation", "--no-input", "-e", str(ROOT)], cap_s=150, min_s=20)
    if rnd.dry_run:
        rnd.not_run(install, "dry run: the environment is left as it is")
    else:
        rnd.run(install)
        if install.status != "ok":  # the steps still import llmkit: they run in the repository root
            rnd.say("install failed: the steps import llmkit from the repository root")
    rnd.run(Step("shapes", "info", [*llmkit, "bench", "--list"], cap_s=90, min_s=5, gpu=False))
    rnd.run(Step("info", "info", [*llmkit, "info"], cap_s=90, min_s=5, gpu=False))

    if rnd.dry_run:
        _dry_run(rnd, args, py, llmkit)
    else:
        _gpu_run(rnd, args, py, llmkit, gpu)


def _bench_reserve(budget: float) -> float:
    """Seconds kept for the benchmarks and the summary at the end."""
    least = sum(m for _, _, m in BENCH_GROUPS) + len(BENCH_GROUPS) * GRACE_S
    return max(0.36 * budget, least) + SUMMARY_RESERVE_S


def _test_steps(rnd: Round, args: argparse.Namespace, py: str, llmkit: list[str], arch: str) -> dict[str, Any]:
    """The GPU round's build, test and check steps (not started)."""
    reserve = _bench_reserve(rnd.budget_s)
    pytest = _pytest_command(py)
    if args.test_timeout > 0 and has_module(py, "pytest_timeout"):
        pytest += [f"--timeout={args.test_timeout:.0f}"]
    has_xdist = args.xdist > 0 and has_module(py, "xdist")
    xdist = ["-n", str(args.xdist), "--dist", "load"] if has_xdist else []
    ext_files = sorted(set(tests_matching(EXT_TESTS) + tests_using_extension()) - set(tests_matching(NOT_ON_GPU)))
    ignored = [
        f"--ignore={f}" for f in sorted(set(tests_matching(ROW_TESTS + ATTENTION_TESTS + NOT_ON_GPU)) | set(ext_files))
    ]
    nice = ["nice", "-n", "5"] if shutil.which("nice") else []
    kernels = [_pytest_step(rnd, f"pytest-{group}", pytest, xdist, tests_matching(files), cap_s=300, reserve_s=reserve)
               for group, files in (("rows", ROW_TESTS), ("attention", ATTENTION_TESTS))]
    checks = []
    for group, ops in CHECK_GROUPS.items():
        name = f"check-triton-{group}"
        out = rnd.logs / f"{name}.json"
        cmd = [*llmkit, "check", "--device", "cuda", "--backend", "triton", "--json", str(out)]
        checks.append(Step(name, "check", cmd + [a for op in ops for a in ("--op", op)], cap_s=300,
                           reserve_s=reserve, output=str(out)))
    two = ["-n", "2", "--dist", "load"] if has_xdist else []
    # the rest of the suite: mostly CPU work, at lower priority
    rest = _pytest_step(rnd, "pytest-rest", [*nice, *pytest], two, ["tests"], cap_s=330, reserve_s=reserve,
                        extra=ignored)
    ext_out = rnd.logs / "check-cuda-ext.json"
    return {
        # the extension's own tests and check need time after the build
        "build": Step("build-ext", "build", [*llmkit, "build-ext", "--cuda", "--arch", arch, "--jobs", str(args.jobs)],
                      cap_s=300, reserve_s=reserve + 60, min_s=30),
        "kernels": kernels,
        "checks": checks,
        "rest": rest,
        "ext_tests": _pytest_step(rnd, "pytest-ext", pytest, two, ext_files, cap_s=300,
                                  reserve_s=reserve, extra=["-k", "not test_cli_build_ext_reports_what_it_built"]),
        "ext_check": Step("check-cuda-ext", "check", [*llmkit, "check", "--device", "cuda", "--backend", "cuda_ext",
                                                      "--json", str(ext_out)],
                          cap_s=300, reserve_s=reserve, output=str(ext_out)),
    }


def _bench_steps(rnd: Round, llmkit: list[str], built: bool) -> list[Step]:
    """The benchmark steps, run one after the other; each keeps the least time of the later ones."""
    backends = ["--backend", "triton"] + (["--backend", "cuda_ext"] if built else [])
    steps = []
    later = sum(m + GRACE_S for _, _, m in BENCH_GROUPS)
    for group, suites, least in BENCH_GROUPS:
        later -= least + GRACE_S
        name = f"bench-{group}"
        cmd = [*llmkit, "bench", "--device", "cuda", "--shapes", "round", "--dtype", "bfloat16", "--no-compile",
               "--no-plots", *backends, "--out", str(rnd.logs), "--name", name, "--op", ",".join(suites)]
        steps.append(Step(name, "bench", cmd, cap_s=200, reserve_s=later + SUMMARY_RESERVE_S, min_s=least,
                          output=str(rnd.logs / f"{name}.json")))
    return steps


def _gpu_run(rnd: Round, args: argparse.Namespace, py: str, llmkit: list[str], gpu: dict[str, Any]) -> None:
    """Build | kernel tests | check triton | the rest of the suite, all at once; the extension's
    tests and check as soon as it is built; then the benchmarks, one at a time."""
    plan = _test_steps(rnd, args, py, llmkit, gpu.get("capability", "9.0"))
    build = rnd.start(plan["build"])
    running = [build] + [rnd.start(s) for s in plan["kernels"] + plan["checks"] + [plan["rest"]]]
    rnd.wait(build)
    log = build.log.read_text(errors="replace") if build.log and build.log.is_file() else ""
    built = build.status == "ok" and "cuda kernels: yes" in log
    _keep_build_log(rnd)
    rnd.info["extension_built"] = built
    if built:
        running += [rnd.start(plan["ext_tests"]), rnd.start(plan["ext_check"])]
    else:
        why = "the extension did not build (see build-ext); its tests would build it again"
        rnd.not_run(plan["ext_tests"], why)
        rnd.not_run(plan["ext_check"], why)
    rnd.wait(*running)
    for step in _bench_steps(rnd, llmkit, built):  # timing: alone on the GPU
        rnd.run(step)


def _dry_run(rnd: Round, args: argparse.Namespace, py: str, llmkit: list[str]) -> None:
    """The GPU steps listed as not run; CPU smoke versions of them run instead (seconds
    each): every test module collects, a small test file, a quick check and bench."""
    plan = _test_steps(rnd, args, py, llmkit, "9.0")
    for step in [plan["build"], *plan["kernels"], *plan["checks"], plan["rest"], plan["ext_tests"],
                 plan["ext_check"], *_bench_steps(rnd, llmkit, True)]:
        rnd.not_run(step, "dry run")
    not_here = [f"--ignore={f}" for f in tests_matching(NOT_ON_GPU)]
    collect = [py, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *not_here, "tests"]
    check_out = rnd.logs / "check-smoke.json"
    smoke = [
        Step("pytest-collect", "collect", collect, cap_s=120, min_s=5, gpu=False),
        _pytest_step(rnd, "pytest-smoke", _pytest_command(py), [], tests_matching(SMOKE_TESTS), cap_s=120, reserve_s=0,
                     gpu=False),
        Step("check-smoke", "check", [*llmkit, "check", "--device", "cpu", "--backend", "reference", "--op", "gelu",
                                      "--quick", "--dtype", "float32", "--json", str(check_out)],
             cap_s=120, min_s=5, gpu=False, output=str(check_out)),
    ]
    rnd.wait(*[rnd.start(s) for s in smoke])
    rnd.run(Step("bench-smoke", "bench", [*llmkit, "bench", "--device", "cpu", "--quick", "--op", "gelu", "--dtype",
                                          "float32", "--backend", "reference", "--no-compile", "--no-plots",
                                          "--seconds", "0.01", "--out", str(rnd.logs), "--name", "bench-smoke"],
                 cap_s=120, min_s=5, gpu=False, output=str(rnd.logs / "bench-smoke.json")))


def _pytest_command(py: str) -> list[str]:
    return [py, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfE", "--durations=15"]


def _pytest_step(rnd: Round, name: str, pytest: list[str], xdist: list[str], files: list[str], cap_s: float,
                 reserve_s: float, extra: list[str] | None = None, gpu: bool = True) -> Step:
    """A pytest step writing JUnit XML."""
    if not files:
        return Step(name, "pytest", None, note="no test files")
    xml = rnd.logs / f"{name}.xml"
    cmd = [*pytest, f"--junitxml={xml}", *xdist, *(extra or []), *files]
    return Step(name, "pytest", cmd, cap_s=cap_s, reserve_s=reserve_s, gpu=gpu, output=str(xml))


def _keep_build_log(rnd: Round) -> None:
    cache = rnd.env.get("LLMKIT_EXT_CACHE_DIR")
    if not cache:
        return
    for log in sorted(Path(cache).glob("*/build.log")):
        shutil.copy(log, rnd.logs / f"build-ext-{log.parent.name}.log")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_round.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/gpu-round", help="folder for the result files (default out/gpu-round)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("LLMKIT_ROUND_BUDGET_S", DEFAULT_BUDGET_S)),
                   help="seconds for the whole round, every step included (default $LLMKIT_ROUND_BUDGET_S or 500)")
    p.add_argument("--dry-run", action="store_true",
                   help="install, build and run nothing on a GPU; CPU smoke steps only (the default without a GPU)")
    p.add_argument("--work", help="folder for logs, caches and the extension build (default: a new temporary one)")
    p.add_argument("--python", help="the Python that runs the steps (default: this one)")
    p.add_argument("--seed", type=int, help="LLMKIT_TEST_SEED for the tests (default: a fresh one, printed)")
    p.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="compiler jobs of the extension build (default: half the CPUs, at most 8)")
    p.add_argument("--xdist", type=int, default=4,
                   help="pytest-xdist workers per kernel test step when pytest-xdist is installed (0: none)")
    p.add_argument("--test-timeout", type=float, default=150,
                   help="per-test limit in seconds when pytest-timeout is installed (0: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_round(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
