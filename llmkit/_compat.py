"""Every private or version-dependent torch / Triton / transformers API llmkit uses, in one place.

Each entry has a feature check (a module-level ``HAS_*`` flag or a probe), a fallback that
keeps llmkit correct where the API is missing (slower at worst), and a test in
``tests/test_compat.py`` that fails loudly when an upgrade of a tested version removes or
changes it. Nothing else in llmkit touches these APIs directly.

torch
    ``torch._int_mm`` (int8 GEMM, int32 accumulation), ATen's CPU flash attention
    (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward),
    ``aten._fused_rms_norm``, oneDNN's ``mkldnn._linear_pointwise``, the dispatcher's
    mode stacks (``torch._C``), ``torch._C._dispatch_has_kernel_for_dispatch_key``,
    DTensor's op-strategy registry (``DTensor._op_dispatcher.sharding_propagator``,
    ``RuntimeSchemaInfo``, ``expand_to_full_mesh_op_strategy``).
Triton
    a fix for the interpreter of Triton < 3.7 under numpy >= 1.25
    (``triton.runtime.interpreter._patch_lang_tensor``); the JIT's launch-time specialization
    (``triton.runtime.jit.create_function_from_signature``, ``JITFunction._pack_args``) for the
    compile report.
transformers
    ``config._attn_implementation``, ``PreTrainedModel._can_set_attn_implementation``,
    and the name of the cache argument of attention modules (``past_key_values`` before
    5.2x, ``cache`` after).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger("llmkit")

# --------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------

HAS_INT_MM = hasattr(torch, "_int_mm")


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for int8 ``a (M, K)`` and ``b (K, N)`` of any strides, exact, as int32 ``(M, N)``.

    ``torch._int_mm`` where it exists, given its operands in a layout it reads correctly
    (:func:`int_mm_operand`); otherwise a float64 matmul, exact for ``K < 2**53 / 127**2``
    (the products and their sums are integers below 2**53).
    """
    if HAS_INT_MM:
        return torch._int_mm(int_mm_operand(a), int_mm_operand(b))
    return torch.matmul(a.double(), b.double()).to(torch.int32)


def int_mm_operand(t: Tensor) -> Tensor:
    """``t`` (2-D) as ``torch._int_mm`` reads it correctly: row-major (strides ``(ld, 1)``,
    ``ld >= max(1, columns)``), column-major (``(1, ld)``, ``ld >= max(1, rows)``) or with
    both strides positive and neither 1; a free view where only the stride of a size-1
    dimension is off, else a contiguous copy.

    Why: with oneDNN (x86 CPUs with AVX512-VNNI) ``torch._int_mm`` hands operands with a
    unit stride to a BLAS-style int8 GEMM as row- or column-major with the other stride as
    the leading dimension, without checking it. An expanded operand (stride 0) or a size-1
    dimension with stride 1 (the weight of an ``in_features == 1`` linear, transposed: shape
    ``(1, N)``, strides ``(1, 1)``) gives a leading dimension below the matrix's extent; the
    GEMM rejects the call and the output is left unwritten (uninitialized memory returned,
    torch 2.13). The canonical layouts above are what every BLAS accepts; other strides go
    to oneDNN's matmul primitive, which takes them as they are.
    """
    rows, cols = t.shape
    s0, s1 = t.stride()
    # the stride of a size-1 dimension is never used to address an element: make it canonical
    if cols == 1:
        s1 = 1
    if rows == 1:
        s0 = max(cols, 1) if s1 == 1 else 1
    if (s1 == 1 and s0 >= max(cols, 1)) or (s0 == 1 and s1 >= max(rows, 1)) or (s0 > 1 and s1 > 1):
        return t if (s0, s1) == t.stride() else t.as_strided((rows, cols), (s0, s1))
    return t.clone(memory_format=torch.contiguous_format)


def _aten_op(name: str) -> Any | None:
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


_CPU_FLASH = _aten_op("_scaled_dot_product_flash_attention_for_cpu")
_CPU_FLASH_BWD = _aten_op("_scaled_dot_product_flash_attention_for_cpu_backward")
HAS_CPU_FLASH_ATTENTION = _CPU_FLASH is not None and _CPU_FLASH_BWD is not None
"""ATen's fused CPU attention (forward and backward) exists in this torch."""


def cpu_flash_attention(
    query: Tensor, key: Tensor, value: Tensor, is_causal: bool, attn_mask: Tensor | None, scale: float | None
) -> tuple[Tensor, Tensor]:
    """ATen's CPU flash attention without dropout: ``(out, lse)``; callers check
    :data:`HAS_CPU_FLASH_ATTENTION` and take their math path without it."""
    assert _CPU_FLASH is not None
    out, lse = _CPU_FLASH(query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
    return out, lse


def cpu_flash_attention_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    is_causal: bool,
    attn_mask: Tensor | None,
    scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`cpu_flash_attention`: ``(dq, dk, dv)``."""
    assert _CPU_FLASH_BWD is not None
    dq, dk, dv = _CPU_FLASH_BWD(grad_out, query, key, value, out, lse, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
    return dq, dk, dv


def causal_bias_variant(mask: Any) -> tuple[str, int, int] | None:
    """``(alignment, Sq, Sk)`` of torch's ``torch.nn.attention.bias.CausalBias`` mask objects
    (``causal_upper_left`` -> ``"top_left"``, ``causal_lower_right`` -> ``"bottom_right"``),
    None for anything else. Such an object is a tensor subclass without real storage: it
    must be recognized before anything reads it as data."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # a torch without them cannot have made one
        return None
    if not isinstance(mask, CausalBias):
        return None
    variant = "bottom_right" if mask.variant == CausalVariant.LOWER_RIGHT else "top_left"
    return variant, int(mask.seq_len_q), int(mask.seq_len_kv)


def tensor_version(t: Tensor) -> int | None:
    """``t``'s in-place version counter (``Tensor._version``, private: it moves on every in-place
    write), or None where there is none: inference tensors (``torch.inference_mode``) have no
    counter, and a torch without the attribute gives None too. Callers that cache a value
    computed from a tensor's contents cache nothing then."""
    if t.is_inference():
        return None
    version = getattr(t, "_version", None)
    return version if isinstance(version, int) else None


_FUSED_RMS_NORM = _aten_op("_fused_rms_norm")
HAS_FUSED_RMS_NORM = _FUSED_RMS_NORM is not None


def fused_rms_norm(x: Tensor, normalized_shape: list[int], weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm of ``x`` over its last ``len(normalized_shape)`` dims in ``x``'s dtype:
    ``(out, rstd)``, ``rstd`` of the leading shape with the normalized dims kept as 1.

    ATen's fused op where it exists, the same formula in ATen ops otherwise.
    """
    if _FUSED_RMS_NORM is not None:
        out, rstd = _FUSED_RMS_NORM(x, normalized_shape, weight, eps)
        return out, rstd
    dims = tuple(range(-len(normalized_shape), 0))
    rstd = torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    out = x * rstd
    return (out * weight if weight is not None else out), rstd


def _find_onednn_linear() -> Callable[..., Tensor] | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):  # a torch build without the op
        return None


ONEDNN_LINEAR: Callable[..., Tensor] | None = _find_onednn_linear()
"""oneDNN's linear with a fused pointwise epilogue,
``(x, weight, bias, attr, scalars, algorithm) -> out``, or None where this torch lacks it."""


def _has_mode_stacks() -> bool:
    c = torch._C
    return all(hasattr(c, n) for n in ("_is_torch_function_mode_enabled", "_len_torch_dispatch_stack")) and hasattr(
        getattr(c, "_functorch", None), "peek_interpreter_stack"
    )


HAS_MODE_STACKS = _has_mode_stacks()


def no_active_modes() -> bool:
    """True when no torch function mode, dispatch mode or functorch transform (vmap, grad)
    is active. Without the probes (a torch that lacks them) False: callers then take the
    custom-op path, which is always correct."""
    if not HAS_MODE_STACKS:
        return False
    c = torch._C
    return (
        not c._is_torch_function_mode_enabled()
        and c._len_torch_dispatch_stack() == 0
        and c._functorch.peek_interpreter_stack() is None
    )


def dispatch_has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``op`` (``"ns::name"``) has a kernel for ``dispatch_key``; False where this torch
    cannot tell."""
    probe = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if probe is None:
        return False
    try:
        return bool(probe(op, dispatch_key))
    except RuntimeError:  # the op is not registered at all
        return False


# --------------------------------------------------------------------------------------
# torch.distributed.tensor (DTensor): sharding strategies of custom ops
# --------------------------------------------------------------------------------------

PlacementLists = list[tuple[list[Any], list[Any]]]
"""``[(output placements, input placements), ...]``: the strategies of one op for one mesh dimension."""


def dtensor_strategy_api() -> str | None:
    """None when DTensor's op-strategy registry can take llmkit's strategies, else why not.

    Imports ``torch.distributed.tensor`` (about a second): call it only where DTensor is used.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch build has no torch.distributed"
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._op_schema import OpStrategy, RuntimeSchemaInfo, TupleStrategy  # noqa: F401
        from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy
    except ImportError as exc:
        return f"torch.distributed.tensor lacks the op-strategy API ({exc})"
    propagator = getattr(getattr(DTensor, "_op_dispatcher", None), "sharding_propagator", None)
    if not callable(getattr(propagator, "register_op_strategy", None)):
        return "DTensor's sharding propagator has no register_op_strategy"
    params = inspect.signature(expand_to_full_mesh_op_strategy).parameters
    missing = {"input_index", "is_valid_strategy_cb"} - set(params)
    if missing:
        return f"expand_to_full_mesh_op_strategy lacks {', '.join(sorted(missing))}"
    return None


def register_dtensor_strategy(
    op: Any, placements: Callable[..., PlacementLists], is_valid: Callable[[list[Any], Any], bool] | None = None
) -> None:
    """Give the custom op ``op`` (an OpOverload) a DTensor sharding strategy.

    ``placements(*args, **kwargs)`` is called with the op's arguments, each DTensor
    replaced by its ``DTensorSpec`` (``.shape``, ``.ndim``, ``.placements``, ``.mesh``), and
    returns ``[(output placements, input placements), ...]`` for one mesh dimension, one
    entry per output and per argument (None for non-tensor and absent arguments); DTensor
    expands them to every mesh dimension, drops the combinations ``is_valid(input_specs,
    output_specs)`` refuses and redistributes the inputs to the cheapest one left.

    DTensor caches a strategy per call signature, and leaves out of that key every
    non-tensor argument before the op's ``static_argnum``;
    ``torch.distributed.tensor.experimental.register_sharding`` puts it at the first ``int``
    argument, so a strategy cached for one ``normalized_shape``, ``dropout_p`` or
    ``activation`` would be reused for another. Here it is the first argument that is not
    a tensor: every value the rules read is in the key.

    Callers check :func:`dtensor_strategy_api` first; there is no fallback (without the
    registry DTensor refuses the op with its own "no sharding strategy" error).
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import OpStrategy, RuntimeSchemaInfo, TupleStrategy
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy

    def as_spec(arg: Any) -> Any:
        if isinstance(arg, OpStrategy):
            return arg.strategies[0].output_spec
        if isinstance(arg, TupleStrategy):
            return tuple(as_spec(a) for a in arg.children)
        return arg

    n_out, n_in = len(op._schema.returns), len(op._schema.arguments)

    def strategy(op_schema: Any) -> Any:
        args = tuple(as_spec(a) for a in op_schema.args_schema)
        kwargs = {k: as_spec(v) for k, v in op_schema.kwargs_schema.items()}
        single = []
        for out, inp in placements(*args, **kwargs):
            if len(out) != n_out or len(inp) != n_in:  # a rule's bug: say so, do not mis-pair placements
                raise ValueError(
                    f"{op}: a sharding rule gave {len(out)} output and {len(inp)} input "
                    f"placements; the op has {n_out} outputs and {n_in} arguments"
                )
            single.append(list(out) + list(inp))
        return expand_to_full_mesh_op_strategy(
            op_schema.get_mesh_from_args(), op_schema, single, input_index=n_out, is_valid_strategy_cb=is_valid
        )

    DTensor._op_dispatcher.sharding_propagator.register_op_strategy(
        op, strategy, RuntimeSchemaInfo(static_argnum=first_value_arg(op), needs_pytree=True)
    )


def first_value_arg(op: Any) -> int:
    """Index of the first argument of ``op`` (an OpOverload) that is not a tensor or an
    optional tensor; the number of arguments when all are."""
    for i, arg in enumerate(op._schema.arguments):
        t = arg.type
        if isinstance(t, torch.OptionalType):
            t = t.getElementType()
        if not isinstance(t, torch.TensorType):
            return i
    return len(op._schema.arguments)


# --------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the interpreter: ``TRITON_INTERPRET=1``, the variable
    every tested Triton reads (``triton.knobs``, Triton >= 3.3, reads it too). Imports nothing."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _version(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``"3.7.0rc1"`` -> ``(3, 7, 0)``."""
    m = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(p) for p in m.group().split(".")) if m else ()


def numpy_objects_to_int_of_1d() -> bool:
    """numpy >= 1.25 objects to ``int()`` of a one-element 1-D array: a DeprecationWarning
    up to 2.3, a TypeError from 2.4."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            int(np.ones(1))
        except (TypeError, DeprecationWarning):
            return True
    return False


def _interpreter_index_is_broken() -> bool:
    """Triton < 3.7's interpreter gives its scalars ``__index__ = int(array of shape (1,))``,
    which numpy >= 2.4 refuses (every ``range()`` over a runtime scalar fails) and numpy
    1.25 - 2.3 warn about on every such loop."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return False
    return (
        _version(triton.__version__) < (3, 7)
        and hasattr(interpreter, "_patch_lang_tensor")
        and numpy_objects_to_int_of_1d()
    )


INTERPRETER_FIX = (
    "Triton < 3.7 interpreter: scalar __index__ patched to go through .item() "
    "(numpy >= 2.4 refuses int() of a 1-element array, 1.25 - 2.3 warn)"
)


def triton_interpreter_note() -> str:
    """What ``llmkit info`` says about the interpreter on this stack."""
    if _interpreter_index_is_broken():
        return f"patched when llmkit loads its kernels ({INTERPRETER_FIX})"
    return "works as installed"


@functools.cache
def fix_triton_interpreter() -> str | None:
    """Make Triton's interpreter work with the installed numpy, where it needs it.

    Returns a line saying what was patched, or None when nothing needed patching. The patch
    keeps the interpreter's own semantics: a scalar's ``__index__`` converts its single
    element, through ``.item()`` instead of ``int(ndarray)``.
    """
    if not _interpreter_index_is_broken():
        return None
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    logger.info("llmkit: %s", INTERPRETER_FIX)
    return INTERPRETER_FIX


_TRITON_POINTER_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "u1",
}


def _jit_binder() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """Triton's own launch-time specialization: ``create_function_from_signature`` (the
    argument binder a JITFunction builds) and ``JITFunction._pack_args``; None where absent."""
    try:
        from triton.runtime import jit
    except ImportError:
        return None
    make = getattr(jit, "create_function_from_signature", None)
    pack = getattr(getattr(jit, "JITFunction", None), "_pack_args", None)
    if make is None or pack is None:
        return None
    return make, pack


def has_triton_jit_binder() -> bool:
    """Triton's JIT binder is reachable (Triton >= 3.3); without it the rules are applied here.
    A function, not a flag: importing llmkit must not import Triton."""
    return _jit_binder() is not None


def _specialize_by_rule(kernel: Any, args: dict[str, Any]) -> tuple[dict, dict, dict]:
    """The JIT's specialization rules, written out: a constexpr parameter or a None argument is
    a constant; an integer equal to 1 is the constant 1; integers are i32 (i64 outside its
    range), marked divisible by 16 when they are; pointers are marked 16-byte aligned when
    their address is. ``do_not_specialize`` turns both marks off for a parameter,
    ``do_not_specialize_on_alignment`` the divisibility mark."""
    fn = getattr(kernel, "fn", kernel)
    no_spec = set(getattr(kernel, "do_not_specialize", None) or ())
    no_align = set(getattr(kernel, "do_not_specialize_on_alignment", None) or ())
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, (name, param) in enumerate(inspect.signature(fn).parameters.items()):
        value = args[name]
        specialize = name not in no_spec and i not in no_spec
        align = specialize and name not in no_align and i not in no_align
        divisible = False
        if "constexpr" in str(param.annotation) or value is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
            continue
        if isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if specialize and value == 1:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else ("i64" if value < 2**63 else "u64")
            divisible = align and value % 16 == 0
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif hasattr(value, "data_ptr"):
            signature[name] = "*" + _TRITON_POINTER_TYPES[value.dtype]
            divisible = align and value.data_ptr() % 16 == 0
        else:
            raise TypeError(f"no Triton specialization rule for argument {name}={value!r}")
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def triton_launch_specialization(
    kernel: Any, args: dict[str, Any], options: dict[str, Any], arch: int
) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` that Triton's JIT compiles for a launch of ``kernel``
    (a JITFunction) with ``args`` (every parameter by name, tensors or any object with
    ``data_ptr()`` and ``dtype``) and launch ``options`` on ``sm_<arch>``: the arguments of
    ``triton.compiler.ASTSource``.

    Through the JIT's own binder where it exists (the same code a launch runs, so the same
    result on every Triton version), else by :func:`_specialize_by_rule`.
    """
    binder = _jit_binder()
    if binder is None or not hasattr(kernel, "params"):  # no binder, or an interpreted kernel
        return _specialize_by_rule(kernel, args)
    make, pack = binder
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = {**args, **options}
    bound, specialization, opts = make(kernel.signature, kernel.params, backend)(**kwargs)
    _, signature, constexprs, attrs = pack(kernel, backend, kwargs, bound, specialization, opts)
    return signature, constexprs, {k: v for k, v in attrs.items() if v}


# --------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a transformers config is set to (``_attn_implementation``)."""
    return getattr(config, "_attn_implementation", None)


def can_set_attn_implementation(model: Any) -> bool:
    """Whether a transformers model's attention goes through ``AttentionInterface``.

    ``PreTrainedModel._can_set_attn_implementation()`` where it exists; without it, whether
    the class declares attention-backend support.
    """
    probe = getattr(model, "_can_set_attn_implementation", None)
    if callable(probe):
        return bool(probe())
    return bool(getattr(model, "_supports_attention_backend", False))


CACHE_KWARGS = ("cache", "past_key_values")


@functools.cache
def cache_kwarg(forward: Callable[..., Any]) -> str:
    """The name under which ``forward`` (a transformers module's forward) takes its KV cache:
    ``"cache"`` (transformers >= 5.2x) or ``"past_key_values"`` (before)."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "cache"
    for name in CACHE_KWARGS:
        if name in params:
            return name
    return "cache"


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Take the KV cache out of ``kwargs`` under either name (None when absent)."""
    found = None
    for name in CACHE_KWARGS:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found
