"""What a benchmark suite is: cases built from shape points, each with implementations.

A :class:`Suite` (``layer_norm``, ``attention``, ``bert``, ...) has passes (``fwd``,
``bwd``, ``prefill``, ``decode``) and a builder that turns one shape point, pass and dtype
on a device into a :class:`Case`: the :class:`~llmkit.bench.formulas.Work` of one call and
the :class:`Impl` list to time. Every implementation is run once and its output checked
against the suite's baseline (PyTorch eager) before it is timed, so a fast wrong answer
is reported as an error, never as a speed-up. An implementation that cannot run here
(a backend unavailable, an llmkit module not built yet, a peer library missing) carries
the reason in ``skip``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..dispatch import BACKEND_NAMES, BACKENDS, OPS, use_backend
from .formulas import Work
from .shapes import Point, Shapes

BASELINE = "eager"
"""Name of the implementation every ratio is taken against (PyTorch eager)."""


@dataclasses.dataclass
class Impl:
    """One implementation of a case.

    ``fn`` (or what ``make`` returns) is the timed call. ``output`` (default ``fn``) gives what is checked against
    the baseline: a tensor, a tuple of tensors, or token ids. ``check`` says how:
    'close' (relative max error within the dtype's tolerance), 'sqnr' (int8: signal to
    noise of at least ``min_sqnr_db``), 'cosine' (quantized models: cosine similarity of at
    least ``min_cosine``), or 'none' (the baseline itself).
    """

    name: str
    fn: Callable[[], Any] | None = None
    make: Callable[[], Callable[[], Any]] | None = None
    """Builds ``fn`` when set (run by the harness, so that set-up errors are reported)."""
    output: Callable[[], Any] | None = None
    skip: str | None = None
    check: str = "close"
    min_sqnr_db: float = 20.0
    min_cosine: float = 0.98
    note: str = ""
    truth: Callable[[], Any] | None = None
    """Baseline only: the same computation on the inputs converted to float64. The harness
    runs it when an implementation misses the 'close' check against the baseline, to tell
    which of the two is off (the rule of :mod:`llmkit.testing`: an implementation is right when its error
    against float64 is at most twice the baseline's own, plus a floor)."""

    @classmethod
    def skipped(cls, name: str, reason: str) -> Impl:
        return cls(name, skip=reason)

    def run_once(self) -> tuple[Callable[[], Any], Any]:
        """Build the timed call, run it once; (the call, what is checked)."""
        fn = self.make() if self.make is not None else self.fn
        if fn is None:
            raise ValueError(f"implementation {self.name} has nothing to run")
        warm = fn()
        return fn, (self.output() if self.output is not None else warm)


@dataclasses.dataclass
class Case:
    """One point of one suite: what a call costs and how each implementation makes it."""

    suite: str
    pass_: str
    point: Point
    dtype: torch.dtype
    work: Work | None
    bound: str | None
    """'memory', 'compute', 'int8' (which roofline judges it), or None (end to end)."""
    impls: list[Impl]
    tokens: int | None = None
    """Tokens produced or processed per call, for tokens/s (model suites)."""
    cuda_graph: bool | None = None
    """CUDA: True forces graphs, None lets the launch-overhead rule decide, False never."""


@dataclasses.dataclass
class Context:
    """What builders need to know about the run."""

    device: torch.device
    backends: list[str]
    """llmkit backends to measure (available on this device)."""
    compile: bool
    """Include ``torch.compile`` baselines."""
    shapes: Shapes
    explicit_backends: bool = False
    """The backends were named with --backend (then "cannot take this case" counts as skipped)."""


Builder = Callable[[Context, Point, str, torch.dtype], Case]


@dataclasses.dataclass
class Suite:
    """A benchmark suite (see module doc)."""

    name: str
    kind: str  # 'op' or 'model'
    passes: tuple[str, ...]
    build: Builder
    description: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    """Add ``suite`` to :data:`SUITES`."""
    SUITES[suite.name] = suite
    return suite


# --------------------------------------------------------------------------------------
# helpers for builders
# --------------------------------------------------------------------------------------


class _Selected:
    """A private context in which ``use_backend(backend)`` was entered once."""

    def __init__(self, backend: str):
        self.ctx = contextvars.copy_context()
        self.cm = use_backend(backend)
        self.ctx.run(self.cm.__enter__)

    def __del__(self) -> None:
        try:
            self.ctx.run(self.cm.__exit__, None, None, None)
        except Exception:
            pass


def in_backend(backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with ``use_backend(backend)`` in force, without re-entering it per call.

    The selection lives in a context variable; the returned function runs ``fn`` inside
    a private copy of the context in which the backend was selected once.
    """
    sel = _Selected(backend)
    return lambda: sel.ctx.run(fn)


def pass_impl(
    name: str,
    f: Callable[..., Any],
    inputs: Sequence[Any],
    pass_: str,
    wrt: Sequence[int] = (),
    grads: Sequence[torch.Tensor] | None = None,
    backend: str | None = None,
    **kw: Any,
) -> Impl:
    """An implementation timing ``f(*inputs)`` (pass 'fwd') or its backward (pass 'bwd').

    Backward: the inputs at positions ``wrt`` become leaves that require grad, ``f`` runs
    once at set-up, and the timed call is ``torch.autograd.grad`` of its outputs with
    ``grads``, keeping the graph. With ``backend`` both run under ``use_backend(backend)``.
    """

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        return in_backend(backend, fn) if backend else fn

    if pass_ == "fwd":
        return Impl(name, fn=wrap(lambda: f(*inputs)), **kw)
    if pass_ != "bwd":
        raise ValueError(f"pass must be 'fwd' or 'bwd', got {pass_!r}")

    def make() -> Callable[[], Any]:
        leaves = list(inputs)
        for i in wrt:
            leaves[i] = inputs[i].detach().requires_grad_(True)
        outs = wrap(lambda: f(*leaves))()
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        targets = [leaves[i] for i in wrt]
        return wrap(lambda: torch.autograd.grad(outs, targets, grads, retain_graph=True))

    return Impl(name, make=make, **kw)


@dataclasses.dataclass
class OpCall:
    """How an op suite's case calls things: inputs, pass, and the backward's targets."""

    inputs: Sequence[Any]
    pass_: str
    wrt: Sequence[int] = ()
    grads: Sequence[torch.Tensor] | None = None

    def impl(self, name: str, f: Callable[..., Any], backend: str | None = None, **kw: Any) -> Impl:
        """:func:`pass_impl` of ``f`` on these inputs."""
        return pass_impl(name, f, self.inputs, self.pass_, self.wrt, self.grads, backend, **kw)

    def float64(self) -> OpCall:
        """The same call with every floating-point tensor (inputs and gradients) in float64."""

        def up(t: Any) -> Any:
            return t.detach().to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        grads = None if self.grads is None else [up(g) for g in self.grads]
        return OpCall([up(t) for t in self.inputs], self.pass_, self.wrt, grads)

    def truth(self, f: Callable[..., Any]) -> Callable[[], Any]:
        """Runs ``f`` (the baseline) on :meth:`float64` of this call: the outputs in float64."""
        return lambda: self.float64().impl(BASELINE, f).run_once()[1]


def standard_impls(
    ctx: Context, op: str, call: OpCall, eager: Callable[..., Any], llmkit_fn: Callable[..., Any], **kw: Any
) -> list[Impl]:
    """PyTorch eager (the baseline), ``torch.compile`` of it when the run includes it, and
    llmkit's op on every backend of the run (``llmkit[<backend>]``; a backend without an
    implementation of ``op`` is reported skipped). ``kw`` goes to the llmkit impls."""
    out = [call.impl(BASELINE, eager, check="none", truth=call.truth(eager))]
    if ctx.compile:
        out.append(call.impl("torch.compile", torch.compile(eager)))
    for b in ctx.backends:
        name = f"llmkit[{b}]"
        stages = OPS.get(op, {})
        if stages and not any(b in p.impls for p in stages.values()):
            out.append(Impl.skipped(name, f"the {b} backend has no implementation of {op} yet"))
            continue
        out.append(call.impl(name, llmkit_fn, backend=b, **kw))
    return out


def optional_module(name: str) -> Any | None:
    """Import ``name`` if it is installed, else None (an error inside it propagates)."""
    if importlib.util.find_spec(name.split(".")[0]) is None:
        return None
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except ModuleNotFoundError:
        return None
    return importlib.import_module(name)


def llmkit_attr(path: str) -> tuple[Any, str | None]:
    """(``llmkit.<path>``, None) (e.g. 'nn.Int8Linear', 'swap') or (None, 'llmkit.<path> is missing')."""
    mod_name, _, attr = ("llmkit." + path).rpartition(".")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        return None, f"llmkit.{path} is missing ({exc})"
    obj = getattr(mod, attr, None)
    if obj is None:
        return None, f"llmkit.{path} is missing (not built yet)"
    return obj, None


def available_backends(device: torch.device, asked: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The llmkit backends to measure on ``device`` and, for those left out, why.

    Triton through its interpreter is left out on the CPU: interpreted kernels say
    nothing about speed.
    """
    names = asked or list(BACKEND_NAMES)
    ok: list[str] = []
    why: dict[str, str] = {}
    for n in names:
        if n not in BACKENDS:
            why[n] = f"unknown backend (llmkit knows {', '.join(BACKEND_NAMES)})"
            continue
        if n == "triton" and device.type == "cpu":
            why[n] = "Triton runs CPU tensors only through its interpreter, whose timings say nothing about speed"
            continue
        r = BACKENDS[n].unavailable_reason(device.type)
        if r:
            why[n] = r
        else:
            ok.append(n)
    return ok, why


def elem_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()
