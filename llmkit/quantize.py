"""``llmkit.quantize``: int8 linears in place, and SmoothQuant-style ``calibrate``.

``quantize(model, mode)`` replaces every ``nn.Linear`` and HuggingFace ``Conv1D`` of a
model by :class:`llmkit.nn.Int8Linear` in place, except

* the output head: the module ``get_output_embeddings()`` returns (HuggingFace), modules
  named ``lm_head``, linears whose weight is tied to another parameter (an input
  embedding); when a model has none of these, its last linear (a classifier or pooler);
* what ``skip`` names (exact names, name prefixes, or ``fnmatch`` patterns);
* what cannot be swapped safely: subclasses of ``nn.Linear`` (``MultiheadAttention``'s
  ``out_proj`` among them: its owner reads the weight directly), non-float or
  unmaterialized weights, weights holding NaN / inf, and for W8A8 K beyond the int32
  accumulator's range.

It returns a :class:`QuantizeReport` (what was quantized, what was skipped and why,
bytes before and after), printable as a table.

``calibrate(model, batches)`` runs the model on calibration batches, records each
linear's per-input-channel activation absmax, and for every LayerNorm / RMSNorm whose
output feeds only linears, folds SmoothQuant scales ``s = amax_x**alpha /
amax_w**(1 - alpha)`` into the model: the norm's weight and bias divided by ``s``, the
linears' weight columns multiplied by ``s``. The float model computes the same function
(checked on the first batch); the activation outliers move into the weights, where
per-channel int8 handles them, which helps W8A8 on models with outlier channels.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .nn.int8_linear import Int8Linear, is_conv1d
from .ops.int8_matmul import MAX_K, MODES

__all__ = ["quantize", "calibrate", "QuantizeReport", "CalibrationReport"]


# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------


def _kind(module: nn.Module) -> str | None:
    """ "Linear" / "Conv1D" for the modules quantize() swaps, else None."""
    if type(module) is nn.Linear:
        return "Linear"
    if is_conv1d(module):
        return "Conv1D"
    return None


def _weight(module: nn.Module) -> Tensor:
    """``module.weight`` of a Linear, a Conv1D or a norm (``nn.Module`` types its attributes
    ``Tensor | Module``)."""
    return cast(Tensor, module.weight)


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    w = _weight(module)
    return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])


def _patterns(skip: str | Iterable[str] | None) -> list[str]:
    if skip is None:
        return []
    if isinstance(skip, str):
        return [skip]
    out = list(skip)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"skip must hold module names or patterns (str), got {type(p).__name__}: {p!r}")
    return out


def _skip_match(name: str, patterns: Sequence[str]) -> str | None:
    for p in patterns:
        if name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p):
            return p
    return None


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            total += t.numel() * t.element_size()
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return out


# --------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class QuantizedLayer:
    """One linear replaced by an :class:`~llmkit.nn.Int8Linear`."""

    name: str
    kind: str
    in_features: int
    out_features: int
    bytes_before: int
    bytes_after: int


@dataclasses.dataclass
class SkippedLayer:
    """One linear left in float, and why."""

    name: str
    kind: str
    reason: str


@dataclasses.dataclass
class QuantizeReport:
    """What :func:`quantize` did. ``str(report)`` is a table."""

    mode: str
    quantized: list[QuantizedLayer] = dataclasses.field(default_factory=list)
    skipped: list[SkippedLayer] = dataclasses.field(default_factory=list)
    model_bytes_before: int = 0
    """Parameters and buffers of the whole model before, each storage counted once."""
    model_bytes_after: int = 0

    @property
    def empty(self) -> bool:
        """True when nothing was quantized."""
        return not self.quantized

    @property
    def layer_bytes_before(self) -> int:
        """Bytes of the quantized layers' float weights and biases."""
        return sum(q.bytes_before for q in self.quantized)

    @property
    def layer_bytes_after(self) -> int:
        """Bytes of their int8 weights, float32 scales and biases."""
        return sum(q.bytes_after for q in self.quantized)

    def __str__(self) -> str:
        lines = [f"llmkit.quantize(mode={self.mode!r}): {len(self.quantized)} quantized, {len(self.skipped)} skipped"]
        if self.quantized:
            rows = [
                [
                    q.name,
                    q.kind,
                    f"{q.in_features}x{q.out_features}",
                    _format_bytes(q.bytes_before),
                    _format_bytes(q.bytes_after),
                ]
                for q in self.quantized
            ]
            lines += _table(["quantized", "kind", "in x out", "before", "after"], rows)
        if self.skipped:
            lines.append("")
            lines += _table(["left in float", "kind", "reason"], [[s.name, s.kind, s.reason] for s in self.skipped])
        if self.quantized:
            ratio = self.layer_bytes_after / self.layer_bytes_before if self.layer_bytes_before else 0.0
            mratio = self.model_bytes_after / self.model_bytes_before if self.model_bytes_before else 0.0
            lines += [
                "",
                f"quantized layers: {_format_bytes(self.layer_bytes_before)} -> "
                f"{_format_bytes(self.layer_bytes_after)} ({ratio:.3f}x)",
                f"whole model:      {_format_bytes(self.model_bytes_before)} -> "
                f"{_format_bytes(self.model_bytes_after)} ({mratio:.3f}x)",
            ]
        return "\n".join(lines)


def _head_reasons(model: nn.Module, linears: dict[str, nn.Module]) -> dict[str, str]:
    """Names of linears that are output heads, with the reason."""
    heads: dict[str, str] = {}
    by_id = {id(m): n for n, m in linears.items()}
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out = getter()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None and id(out) in by_id:
            heads[by_id[id(out)]] = "output head (get_output_embeddings)"
    for name in linears:
        if name.rpartition(".")[2] == "lm_head":
            heads.setdefault(name, "output head (lm_head)")
    # weights shared with a parameter outside the swappable linears (tied embeddings)
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name, m in linears.items():
        others = [p for p in owners.get(id(m.weight), []) if p != f"{name}.weight"]
        if others:
            heads.setdefault(name, f"weight tied to {others[0]}")
    if not heads and linears:
        last = list(linears)[-1]
        heads[last] = "last linear of the model, kept as the output head"
    return heads


def quantize(
    model: nn.Module, mode: str = "w8a8", skip: str | Iterable[str] | None = None, *, keep_head: bool = True
) -> QuantizeReport:
    """Replace the model's linears by :class:`~llmkit.nn.Int8Linear` in place.

    Args:
        model: any ``nn.Module`` (a HuggingFace model included).
        mode: ``"w8a8"`` (int8 activations and weights) or ``"w8a16"`` (weight-only).
        skip: module names to leave in float: exact names, prefixes (``"encoder.layer.0"``)
            or ``fnmatch`` patterns (``"*.attention.*"``).
        keep_head: leave the output head in float (the default; see the module docstring).

    Returns:
        A :class:`QuantizeReport`; an empty one (not an error) for a model without linears.
    """
    if mode not in MODES:
        raise ValueError(f"quantize: mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize: model must be a torch.nn.Module, got {type(model).__name__}")
    patterns = _patterns(skip)
    report = QuantizeReport(mode, model_bytes_before=_tensor_bytes(model))

    linears: dict[str, nn.Module] = {}
    kinds: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        kind = _kind(m)
        if kind is not None:
            linears[name], kinds[name] = m, kind
        elif isinstance(m, nn.Linear):
            report.skipped.append(
                SkippedLayer(
                    name,
                    type(m).__name__,
                    f"subclass of nn.Linear ({type(m).__name__}): its owner or forward may use the weight directly",
                )
            )
    heads = _head_reasons(model, linears) if keep_head else {}

    replaced: dict[int, Int8Linear] = {}
    for name, m in linears.items():
        kind = kinds[name]
        reason = None
        pattern = _skip_match(name, patterns)
        in_f, out_f = _features(m)
        w = _weight(m)
        if pattern is not None:
            reason = f"named in skip ({pattern!r})"
        elif name in heads:
            reason = heads[name]
        elif not w.dtype.is_floating_point:
            reason = f"weight dtype {w.dtype} is not floating point"
        elif w.device.type == "meta":
            reason = "weight on the meta device (not materialized)"
        elif in_f == 0 or out_f == 0:
            reason = f"empty layer ({in_f} x {out_f})"
        elif mode == "w8a8" and in_f > MAX_K:
            reason = f"in_features {in_f} > {MAX_K}: the int32 accumulator could overflow"
        elif not bool(torch.isfinite(w.detach()).all()):
            reason = "weight holds NaN or inf"
        if reason is not None:
            report.skipped.append(SkippedLayer(name, kind, reason))
            continue
        new = replaced.get(id(m))
        if new is None:
            new = Int8Linear.from_float(m, mode=mode)
            new.train(m.training)
            replaced[id(m)] = new
        parent, child = _parent(model, name)
        setattr(parent, child, new)
        report.quantized.append(QuantizedLayer(name, kind, in_f, out_f, _module_bytes(m), _module_bytes(new)))
    report.model_bytes_after = _tensor_bytes(model)
    return report


# --------------------------------------------------------------------------------------
# calibrate (SmoothQuant-style)
# --------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    """An elementwise-affine LayerNorm / RMSNorm whose weight can absorb 1 / s."""
    norm_types = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)
    named_like = type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    if not (isinstance(module, norm_types) or named_like):
        return False
    w = getattr(module, "weight", None)
    return isinstance(w, Tensor) and w.dim() == 1 and w.dtype.is_floating_point


@dataclasses.dataclass
class SmoothedGroup:
    """A norm and the linears its output feeds, smoothed with one scale vector."""

    norm: str
    linears: list[str]
    act_absmax_before: float
    """Largest per-channel activation absmax before smoothing."""
    act_absmax_after: float
    channel_ratio_before: float
    """max / median of the per-channel activation absmax (the outlier ratio)."""
    channel_ratio_after: float


@dataclasses.dataclass
class CalibrationReport:
    """What :func:`calibrate` did. ``str(report)`` is a table."""

    alpha: float
    batches: int
    smoothed: list[SmoothedGroup] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(linear name, why it was not smoothed)."""
    output_cosine: float = 1.0
    """Cosine similarity of the model's float outputs on the first batch, after vs before."""

    def __str__(self) -> str:
        lines = [
            f"llmkit.calibrate(alpha={self.alpha}): {self.batches} batch(es), {len(self.smoothed)} norm(s) "
            f"folded, float output cosine after/before {self.output_cosine:.7f}"
        ]
        if self.smoothed:
            rows = [
                [g.norm, ", ".join(g.linears), f"{g.channel_ratio_before:.1f} -> {g.channel_ratio_after:.1f}"]
                for g in self.smoothed
            ]
            lines += _table(["norm", "linears", "outlier ratio (max/median)"], rows)
        if self.left:
            lines.append("")
            lines += _table(["not smoothed", "reason"], [[n, r] for n, r in self.left])
        return "\n".join(lines)


class _ConsumerWatch(TorchFunctionMode):
    """Records torch calls, made outside the watched linears, that read a norm's output."""

    def __init__(self, state: _CalibrationState):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        st = self.state
        if st.depth == 0 and not st.busy and st.norm_outputs:
            for a in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(a, Tensor) and id(a) in st.norm_outputs:
                    # a call that makes a new tensor from the norm's output (shape queries
                    # and identity pass-throughs such as eval-mode dropout do not count)
                    made = [r for r in torch.utils._pytree.tree_leaves(result) if isinstance(r, Tensor)]
                    if any(r is not a for r in made):
                        norm = st.norm_outputs[id(a)][0]
                        st.other_consumers.setdefault(norm, getattr(func, "__name__", str(func)))
        return result


class _CalibrationState:
    def __init__(self) -> None:
        self.depth = 0
        self.busy = False
        self.norm_outputs: dict[int, tuple[str, Tensor]] = {}
        self.feeds: dict[str, set[str | None]] = {}
        self.act_absmax: dict[str, Tensor] = {}
        self.other_consumers: dict[str, str] = {}


def _run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _float_leaves(out: Any) -> Tensor:
    """Every floating tensor of a model output, flattened and concatenated (float64)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]
    if not leaves:
        raise TypeError("calibrate: the model's output holds no floating point tensor to check the folding with")
    return torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for t in leaves])


def _cosine(a: Tensor, b: Tensor) -> float:
    fin = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[fin], b[fin]
    denom = float(a.norm() * b.norm())
    return float((a @ b) / denom) if denom > 0 else 1.0


def _weight_in_channels(module: nn.Module) -> Tensor:
    """Per-input-channel absmax of a Linear / Conv1D weight, float32 ``(K,)``."""
    w = _weight(module).detach().to(torch.float32)
    return w.abs().amax(dim=1) if is_conv1d(module) else w.abs().amax(dim=0)


def _scale_in_channels_(module: nn.Module, s: Tensor) -> None:
    w = _weight(module)
    ws = w.detach().to(torch.float32)
    ws = ws * (s[:, None] if is_conv1d(module) else s[None, :])
    w.data.copy_(ws.to(w.dtype))


def _ratio(v: Tensor) -> float:
    med = float(v.median())
    return float(v.max()) / med if med > 0 else math.inf


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    alpha: float = 0.5,
    skip: str | Iterable[str] | None = None,
    min_cosine: float = 0.999,
) -> CalibrationReport:
    """Fold SmoothQuant scales into ``model`` (float, before :func:`quantize`), in place.

    Args:
        model: the float model.
        batches: calibration inputs; each is passed as ``model(**b)`` for a dict,
            ``model(*b)`` for a tuple / list, ``model(b)`` otherwise.
        alpha: migration strength in [0, 1]: ``s = amax_x**alpha / amax_w**(1 - alpha)``.
        skip: linears (names, prefixes or patterns) to leave as they are; a norm feeding
            one of them is left too.
        min_cosine: after folding, the float outputs on the first batch must keep at least
            this cosine similarity to those before; otherwise every change is undone and
            ``RuntimeError`` raised.

    Only norms whose output is read by linears alone (checked while the batches run) are
    folded: in post-LN models such as BERT the norm output is also the residual stream,
    which the folding would change, so those are reported and left alone. The model runs
    in eval mode during calibration (its training flag is restored afterwards).
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"calibrate: alpha must be in [0, 1], got {alpha!r}")
    patterns = _patterns(skip)
    state = _CalibrationState()
    norms = {n: m for n, m in model.named_modules() if n and _is_norm(m)}
    linears = {n: m for n, m in model.named_modules() if n and _kind(m) is not None}
    handles = []

    def norm_hook(name):
        def hook(module, args, output):
            if isinstance(output, Tensor):
                state.norm_outputs[id(output)] = (name, output)

        return hook

    def linear_pre_hook(name):
        def hook(module, args):
            state.busy = True
            x = args[0] if args else None
            if isinstance(x, Tensor):
                src = state.norm_outputs.get(id(x))
                state.feeds.setdefault(name, set()).add(src[0] if src else None)
                amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).to(torch.float32)
                prev = state.act_absmax.get(name)
                state.act_absmax[name] = amax if prev is None else torch.maximum(prev, amax)
            state.busy = False
            state.depth += 1

        return hook

    def linear_hook(module, args, output):
        state.depth -= 1

    for n, m in norms.items():
        handles.append(m.register_forward_hook(norm_hook(n)))
    for n, m in linears.items():
        handles.append(m.register_forward_pre_hook(linear_pre_hook(n)))
        handles.append(m.register_forward_hook(linear_hook))
    first: tuple[Any, Tensor] | None = None  # the first batch and the model's float output on it
    count = 0
    was_training = model.training
    model.eval()  # dropout off: the statistics and the folding check need a deterministic model
    try:
        with _ConsumerWatch(state):
            for batch in batches:
                out = _run(model, batch)
                if first is None:
                    first = batch, _float_leaves(out)
                count += 1
                state.norm_outputs.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if first is None:
        raise ValueError("calibrate: batches gave no batch to run")

    report = CalibrationReport(float(alpha), count)
    groups: dict[str, list[str]] = {}
    for name in linears:
        feeds = state.feeds.get(name)
        if not feeds:
            report.left.append((name, "not called on the calibration batches"))
        elif None in feeds or len(feeds) > 1:
            report.left.append((name, "its input is not (always) a norm's output"))
        else:
            groups.setdefault(cast(str, next(iter(feeds))), []).append(name)  # one norm, not None
    saved: list[tuple[Tensor, Tensor]] = []
    for norm_name, members in groups.items():
        why = None
        if norm_name in state.other_consumers:
            why = f"{norm_name}'s output is also read outside linears ({state.other_consumers[norm_name]})"
        elif any(_skip_match(n, patterns) for n in members):
            why = f"{norm_name} also feeds a linear named in skip"
        if why:
            report.left += [(n, why) for n in members]
            continue
        norm = norms[norm_name]
        act = torch.stack([state.act_absmax[n] for n in members]).amax(dim=0)
        wmax = torch.stack([_weight_in_channels(linears[n]).to(act.device) for n in members]).amax(dim=0)
        usable = (act > 0) & (wmax > 0)
        s = torch.where(
            usable, act.clamp_min(1e-30).pow(alpha) / wmax.clamp_min(1e-30).pow(1.0 - alpha), torch.ones_like(act)
        ).clamp(1e-5, 1e5)
        bias = getattr(norm, "bias", None)
        norm_params = [_weight(norm)] + ([bias] if isinstance(bias, Tensor) else [])
        saved += [(p, p.detach().clone()) for p in norm_params + [_weight(linears[n]) for n in members]]
        for p in norm_params:
            p.data.copy_((p.detach().to(torch.float32) / s.to(p.device)).to(p.dtype))
        for n in members:
            _scale_in_channels_(linears[n], s.to(_weight(linears[n]).device))
        after = act / s
        report.smoothed.append(
            SmoothedGroup(norm_name, members, float(act.max()), float(after.max()), _ratio(act), _ratio(after))
        )

    if report.smoothed:
        model.eval()
        try:
            report.output_cosine = _cosine(first[1], _float_leaves(_run(model, first[0])))
        finally:
            model.train(was_training)
        if not report.output_cosine >= min_cosine:
            for p, old in saved:
                p.data.copy_(old)
            raise RuntimeError(
                f"calibrate: folding the smoothing scales changed the model's float output (cosine "
                f"{report.output_cosine:.6f} < {min_cosine}); every change was undone. A norm's output "
                "probably reaches something other than the linears it feeds."
            )
    return report
