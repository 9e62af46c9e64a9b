"""``llmkit.swap`` / ``llmkit.unswap``: put llmkit's fused layers into an existing model.

``swap(model)`` changes the model in place and returns a :class:`SwapReport` naming each
module swapped and each module left with its reason (``print(report)`` gives a table).
Nothing is copied: parameters stay the same objects, so optimizers, tied weights and
``state_dict`` keys are unaffected, and ``unswap(model)`` restores the original
modules exactly (outputs are bit-identical to before the swap).

What is swapped, by kind (``swap(model, kinds=[...])`` picks some):

``norm``
    ``torch.nn.LayerNorm`` / ``RMSNorm`` -> :class:`llmkit.nn.LayerNorm` / ``RMSNorm``;
    transformers' RMSNorms of T5 (``T5LayerNorm``), Llama, Mistral, Qwen2 (``weight *
    x_hat.to(dtype)``) and Gemma (``x_hat * (1 + weight)``) compute through
    :func:`llmkit.ops.rms_norm` with their model's offset, casting order and dtypes.
``gelu``
    ``torch.nn.GELU`` and transformers' ``GELUActivation`` (exact),
    ``NewGELUActivation`` / ``GELUTanh`` / ``FastGELUActivation`` (tanh form) ->
    :class:`llmkit.nn.GELU`.
``attention``
    ``torch.nn.MultiheadAttention`` -> :class:`llmkit.nn.MultiheadAttention`; a
    transformers model switches to ``attn_implementation="llmkit"`` (the function
    registered with ``AttentionInterface``; it handles causal masks, padding,
    ``past_key_values`` caches, GQA and T5's relative-position bias).
``transformer``
    ``torch.nn.TransformerEncoderLayer`` / ``DecoderLayer`` / ``Encoder`` / ``Decoder`` /
    ``Transformer`` -> the :mod:`llmkit.nn` classes.
``fused``
    transformers BERT-family ``*SelfOutput`` / ``*Output`` (residual add fused into
    LayerNorm), ``*Intermediate`` (bias fused into GELU) and ``*SelfAttention`` (its
    projections, transformers >= 5), GPT-2's ``GPT2MLP`` (bias + GELU) and ``GPT2Block``
    (attention residual fused into ``ln_2``); the Llama / Mistral / Qwen2 / Gemma MLPs and T5's
    ``T5DenseGatedActDense`` (activation * up as one SwiGLU / GeGLU op) and their decoder layers
    (attention residual fused into ``post_attention_layernorm``, with the ``norm`` kind). Their
    class is reassigned to a subclass whose ``forward`` calls the fused ops; the bias + GELU
    and GeGLU fusions need the ``gelu`` kind too. On
    float32 CPU inference their linears run as oneDNN GEMMs with the bias and GELU in the
    epilogue (:func:`llmkit.nn._fused.dense`; on an Intel CPU with MKL, those without a GELU
    stay on MKL's GEMM). Swapped models pickle and deep-copy.

torch.nn modules are converted by reassigning their class to the llmkit subclass
(only exact torch.nn types: a subclass with its own ``forward`` is left, and reported).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import nn

from ._compat import attn_implementation, can_set_attn_implementation
from .integrations import hf
from .nn._fused import gelu_approximate
from .nn.transformer import TORCH_TO_LLMKIT

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["swap", "unswap", "SwapReport", "SwapEntry", "KINDS"]

KINDS: tuple[str, ...] = ("norm", "gelu", "attention", "transformer", "fused")
"""Every kind of swap, in the order they are applied."""

_TORCH_KIND: dict[type, str] = {
    nn.LayerNorm: "norm",
    nn.RMSNorm: "norm",
    nn.GELU: "gelu",
    nn.MultiheadAttention: "attention",
    nn.TransformerEncoderLayer: "transformer",
    nn.TransformerDecoderLayer: "transformer",
    nn.TransformerEncoder: "transformer",
    nn.TransformerDecoder: "transformer",
    nn.Transformer: "transformer",
}
_LLMKIT_CLASSES = frozenset(TORCH_TO_LLMKIT.values())
_UNDO_ATTR = "_llmkit_swap_undo"


@dataclasses.dataclass
class SwapEntry:
    """One row of a :class:`SwapReport`."""

    name: str
    """The module's path in the model (``""`` is the model itself)."""
    kind: str
    before: str
    """The module's class before the swap."""
    after: str
    """What it became (swapped) or why it was left (left)."""


@dataclasses.dataclass
class SwapReport:
    """What ``swap`` / ``unswap`` did: ``swapped`` and ``left`` entries; ``str()`` is a table."""

    swapped: list[SwapEntry] = dataclasses.field(default_factory=list)
    left: list[SwapEntry] = dataclasses.field(default_factory=list)
    title: str = "llmkit.swap"
    verb: str = "swapped"
    already: int = 0
    """Modules (and models' attention) that were llmkit's before this call: an earlier swap,
    or built with llmkit.nn."""

    def __len__(self) -> int:
        return len(self.swapped)

    def counts(self) -> dict[str, int]:
        """Number of swapped modules per kind."""
        out: dict[str, int] = {}
        for e in self.swapped:
            out[e.kind] = out.get(e.kind, 0) + 1
        return out

    def __str__(self) -> str:
        head = f"{self.title}: {len(self.swapped)} {self.verb}, {len(self.left)} left"
        if self.already:
            head += (
                f"; {self.already} already llmkit's (swapped before, or built with llmkit.nn; "
                "llmkit.unswap restores what a swap replaced)"
            )
        if not self.swapped and not self.left:
            return head if self.already else head + " (nothing llmkit knows in this model)"
        rows = [("", "module", "kind", "class", "now / reason")]
        rows += [(self.verb, e.name or "(model)", e.kind, e.before, e.after) for e in self.swapped]
        rows += [("left", e.name or "(model)", e.kind, e.before, e.after) for e in self.left]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [head]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 12)
        return "\n".join(lines)


@dataclasses.dataclass
class _Undo:
    how: str  # "class" | "replace" | "attn"
    target: Any
    value: Any
    where: tuple[tuple[nn.Module, str], ...] = ()
    name: str = ""
    kind: str = ""

    def restore(self) -> SwapEntry:
        if self.how == "class":
            now = type(self.target).__name__
            self.target.__class__ = self.value
            return SwapEntry(self.name, self.kind, now, self.value.__name__)
        if self.how == "replace":
            now = type(getattr(*self.where[0])).__name__
            for parent, attr in self.where:
                setattr(parent, attr, self.value)
            return SwapEntry(self.name, self.kind, now, type(self.value).__name__)
        current = attn_implementation(self.target.config)
        self.target.set_attn_implementation(self.value)
        return SwapEntry(
            self.name, self.kind, f"attn_implementation={current!r}", f"attn_implementation={self.value!r}"
        )


def _check_kinds(kinds: Iterable[str] | str | None) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"swap: unknown kind(s) {bad}; kinds are {', '.join(KINDS)}")
    return kinds


def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(child) -> every (parent, attribute) that holds it (shared modules included)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, attr))
    return out


def _torch_base(cls: type) -> type | None:
    for base in cls.__mro__[1:]:
        if base in _TORCH_KIND:
            return base
    return None


def swap(model: nn.Module, kinds: Iterable[str] | str | None = None, *, exclude: Iterable[str] = ()) -> SwapReport:
    """Replace the supported submodules of ``model`` with llmkit's, in place.

    Args:
        model: any ``nn.Module``: a torch.nn model, a transformers model, or a mix.
        kinds: which kinds to swap (see the module docstring): any of ``"norm"``,
            ``"gelu"``, ``"attention"``, ``"transformer"``, ``"fused"``; None means all.
        exclude: module paths (as in ``named_modules()``) to leave alone, with their
            submodules.

    Returns:
        A :class:`SwapReport`; empty when the model has nothing llmkit knows. Swapping
        twice swaps only what is new; :func:`unswap` undoes every swap.
    """
    kinds = _check_kinds(kinds)
    excluded = tuple(exclude)
    report = SwapReport()
    undo: list[_Undo] = model.__dict__.setdefault(_UNDO_ATTR, [])

    def skipped(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in excluded)

    if "attention" in kinds:
        handled: list[str] = []
        for name, module in model.named_modules():
            inside = any(name.startswith(h + ".") or h == "" for h in handled)
            if not inside and not skipped(name) and hf.is_pretrained_model(module):
                _swap_hf_attention(name, module, report, undo)
                handled.append(name)

    parents = _parents(model)
    later: list[tuple[str, nn.Module, hf.Plan]] = []
    for name, module in list(model.named_modules()):
        if skipped(name):
            continue
        cls = type(module)
        if cls in _LLMKIT_CLASSES or hf.fused_original(cls) is not None:
            report.already += 1
            continue
        kind = _TORCH_KIND.get(cls)
        if kind is not None:
            if kind in kinds:
                module.__class__ = TORCH_TO_LLMKIT[cls]
                undo.append(_Undo("class", module, cls, name=name, kind=kind))
                report.swapped.append(SwapEntry(name, kind, cls.__name__, "llmkit.nn." + cls.__name__))
            continue
        base = _torch_base(cls)
        if base is not None:
            if _TORCH_KIND[base] in kinds:
                report.left.append(
                    SwapEntry(
                        name,
                        _TORCH_KIND[base],
                        cls.__name__,
                        f"subclass of torch.nn.{base.__name__} with its own code; not swapped",
                    )
                )
            continue
        plan = hf.plan_module(module)
        if plan is None or plan.kind not in kinds:
            continue
        if plan.action == "left":
            report.left.append(SwapEntry(name, plan.kind, cls.__name__, plan.note))
        elif plan.action == "reclass":
            later.append((name, module, plan))  # after their children are swapped
        else:
            assert plan.make is not None  # a "replace" plan builds the new module
            new = plan.make()
            where = tuple(parents.get(id(module), ()))
            for parent, attr in where:
                setattr(parent, attr, new)
            undo.append(_Undo("replace", new, module, where, name=name, kind=plan.kind))
            report.swapped.append(SwapEntry(name, plan.kind, cls.__name__, plan.note))

    for name, module, plan in later:
        cls = type(module)
        missing = [c for c in plan.needs if gelu_approximate(getattr(module, c, None)) is None]
        if missing:
            report.left.append(
                SwapEntry(
                    name,
                    plan.kind,
                    cls.__name__,
                    f"its {missing[0]} is not an llmkit GELU (swap kind 'gelu' too to fuse it)",
                )
            )
            continue
        assert plan.new_class is not None  # a "reclass" plan names the class
        module.__class__ = plan.new_class
        undo.append(_Undo("class", module, cls, name=name, kind=plan.kind))
        report.swapped.append(SwapEntry(name, plan.kind, cls.__name__, plan.note))
    if not undo:
        model.__dict__.pop(_UNDO_ATTR, None)
    return report


def _swap_hf_attention(prefix: str, model: PreTrainedModel, report: SwapReport, undo: list[_Undo]) -> None:
    """Switch a transformers model (at ``prefix``) to ``attn_implementation="llmkit"``."""
    hf.ensure_registered()
    cls = type(model)
    before = attn_implementation(model.config)
    if before == hf.NAME:
        report.already += 1
        return
    if not can_set_attn_implementation(model):
        report.left.append(
            SwapEntry(
                prefix, "attention", cls.__name__, "this model's attention does not go through AttentionInterface"
            )
        )
        return
    model.set_attn_implementation(hf.NAME)
    if attn_implementation(model.config) != hf.NAME:
        report.left.append(
            SwapEntry(
                prefix,
                "attention",
                cls.__name__,
                f"transformers kept attn_implementation={attn_implementation(model.config)!r}",
            )
        )
        return
    undo.append(_Undo("attn", model, before, name=prefix, kind="attention"))
    report.swapped.append(SwapEntry(prefix, "attention", cls.__name__, f"attn_implementation {before!r} -> 'llmkit'"))
    for name, m in model.named_modules(prefix=prefix):
        config = getattr(m, "config", None)
        if type(m).__name__.endswith("Attention") and attn_implementation(config) == hf.NAME:
            entry = SwapEntry(name, "attention", type(m).__name__, "llmkit attention (AttentionInterface)")
            report.swapped.append(entry)


def unswap(model: nn.Module) -> SwapReport:
    """Undo every :func:`swap` of ``model``: the original modules and attention are back.

    Returns a report of what was restored (empty if nothing had been swapped).
    """
    report = SwapReport(title="llmkit.unswap", verb="restored")
    undo: list[_Undo] = model.__dict__.pop(_UNDO_ATTR, [])
    for record in reversed(undo):
        report.swapped.append(record.restore())
    return report
