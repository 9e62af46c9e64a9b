"""DTensor sharding strategies of every ``llmkit::*`` custom op.

Each rule below receives the op's arguments as DTensor sees them (a DTensor argument is
its ``DTensorSpec``: ``.shape``, ``.ndim``, ``.placements``, ``.mesh``) and returns the
placements under which running the op on every rank's local shards gives exactly the
shards of the op's result on the whole tensors, for one mesh dimension:
``[(output placements, input placements), ...]``, one placement per output and per
argument (None for non-tensor and absent arguments). DTensor expands them to every mesh
dimension and redistributes the inputs to the cheapest; all-Replicate is always among
them, so a placement that fits no other rule is gathered, never computed wrong.

The rules, per op family:

* norms (``layer_norm``, ``rms_norm``, ``add_layer_norm``, ``add_rms_norm``): any dim before
  the normalized ones; weight and bias replicated. Backward: the same, ``dweight`` / ``dbias``
  ``Partial`` (each rank sums its rows), reduced by DTensor when read. The add variants with
  input dropout only replicated (the mask is a function of each element's global index).
* ``gelu``: any dim. ``bias_gelu``: any dim before the last with the bias replicated
  (``dbias`` Partial), or the last dim with the bias sharded alike (``ColwiseParallel``'s
  output and bias).
* ``geglu``, ``swiglu`` (and their backward): any dim, ``gate``, ``up`` and every output
  sharded alike (elementwise).
* ``scaled_dot_product_attention``: batch (dim 0) or heads (dim 1) of query, key, value,
  ``out``, ``lse`` alike, the mask sharded alike where it has that dim and replicated where
  it broadcasts; heads only when each shard holds whole GQA groups (the number of key/value
  heads divides evenly); ALiBi slopes sharded with the batch / heads they have. Without
  ``is_causal``, a window, the bottom-right alignment or ALiBi (which all depend on the
  query's global row index), also the query's rows (dim 2) with key and value replicated
  (backward: dK, dV Partial). With ``dropout_p > 0`` only replicated:
  the dropout mask is a function of each element's global index, which a shard does not know.
* ``decode_attention``: batch (query, caches, ``cache_seqlens``) or heads (GQA as above);
  with ``cache_batch_idx`` or a paged cache (``block_table``) the caches stay whole under a
  batch split (any sequence may read any row / block), heads split a paged cache's dim 2.
* ``varlen_attention`` (packed ``(total, H, D)``): heads (dim 1 of query, key, value, ``out``,
  ``dq`` / ``dk`` / ``dv``; dim 0 of ``lse (Hq, total_q)``), whole GQA groups as above,
  ``cu_seqlens`` replicated, ALiBi slopes sharded with their heads. The token dim holds several
  sequences, so it is never sharded. With ``dropout_p > 0`` only replicated (the keep mask
  is a function of the global head index).
* ``quantize_int8``: any dim but the quantized one.
* ``int8_matmul``: rows of ``a`` (a per-row ``a_scale`` alike), columns of ``b`` (a
  per-column ``b_scale`` and the bias alike), or, for the exact int32 product without
  scales, K (``Partial`` output).
* ``int8_linear``: rows of the input; column-wise (weight, ``weight_scale`` and bias
  ``Shard(0)``, input replicated, output ``Shard(-1)``: ``ColwiseParallel``); row-wise
  (input ``Shard(-1)``, weight ``Shard(1)``, output ``Partial``: ``RowwiseParallel``) only
  for ``mode="w8a16"`` without activation, the bias ``Partial`` (DTensor splits a replicated
  bias into ``bias / n`` per rank). W8A8 quantizes each input row with the absmax of the
  whole row, and an activation needs the full sum, so those are not row-wise: DTensor
  gathers instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ..ops.attention import AttentionBackwardCall, AttentionCall
from ..ops.decode_attention import DecodeAttentionCall
from ..ops.varlen_attention import VarlenAttentionBackwardCall, VarlenAttentionCall

__all__ = ["rules"]

Spec = Any  # torch.distributed.tensor._dtensor_spec.DTensorSpec (imported lazily)
Rule = list[tuple[list[Any], list[Any]]]


def rules() -> dict[str, tuple[Callable[..., Rule], Callable[[list[Spec], Any], bool] | None]]:
    """``{op name: (placement rule, validity check of a full-mesh combination or None)}``."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    R, P = Replicate(), Partial()

    def S(d: int) -> Any:
        return Shard(d)

    def opt(t: Spec | None, p: Any) -> Any:
        return None if t is None else p

    def replicated(n_out: int, args: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """Everything replicated; ``args``: all of the op's arguments, in order."""
        return [R] * n_out, [R if _is_spec(a) else None for a in args]

    # -- norms --------------------------------------------------------------------------

    def lead(input: Spec, normalized_shape: Sequence[int]) -> range:
        return range(input.ndim - len(normalized_shape))

    def grad_p(param: Spec | None, wanted: bool) -> Any:
        # an absent or unrequested gradient is an empty / unwritten placeholder: Replicate
        return P if param is not None and wanted else R

    def layer_norm(input, normalized_shape, weight, bias, eps) -> Rule:
        out = [replicated(3, (input, normalized_shape, weight, bias, eps))]
        for d in lead(input, normalized_shape):
            out.append(([S(d)] * 3, [S(d), None, opt(weight, R), opt(bias, R), None]))
        return out

    def layer_norm_backward(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask) -> Rule:
        out = [replicated(3, (grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask))]
        for d in lead(input, normalized_shape):
            out.append(
                (
                    [S(d), grad_p(weight, output_mask[1]), grad_p(bias, output_mask[2])],
                    [S(d), S(d), None, opt(weight, R), opt(bias, R), S(d), S(d), None],
                )
            )
        return out

    def rms_norm(input, normalized_shape, weight, eps, offset=0.0, cast_before_weight=False) -> Rule:
        out = [replicated(2, (input, normalized_shape, weight, eps, offset, cast_before_weight))]
        for d in lead(input, normalized_shape):
            out.append(([S(d)] * 2, [S(d), None, opt(weight, R), None, None, None]))
        return out

    def rms_norm_backward(
        grad_out, input, normalized_shape, weight, rstd, output_mask, offset=0.0, cast_before_weight=False
    ) -> Rule:
        out = [
            replicated(2, (grad_out, input, normalized_shape, weight, rstd, output_mask, offset, cast_before_weight))
        ]
        for d in lead(input, normalized_shape):
            out.append(
                ([S(d), grad_p(weight, output_mask[1])], [S(d), S(d), None, opt(weight, R), S(d), None, None, None])
            )
        return out

    # add + norm: the input's dropout mask is a function of each element's global index, which
    # a shard does not know, so with dropout_p > 0 only everything replicated

    def add_layer_norm(
        input, residual, normalized_shape, weight, bias, eps, residual_in_fp32=False, dropout_p=0.0, seed=0
    ) -> Rule:
        out = [replicated(4, (input, residual, normalized_shape, weight, bias, eps, residual_in_fp32, dropout_p, seed))]
        for d in lead(input, normalized_shape) if dropout_p == 0.0 else ():
            out.append(([S(d)] * 4, [S(d), S(d), None, opt(weight, R), opt(bias, R), None, None, None, None]))
        return out

    def add_layer_norm_backward(
        grad_out,
        grad_residual_out,
        residual_out,
        normalized_shape,
        weight,
        bias,
        mean,
        rstd,
        output_mask,
        dropout_p=0.0,
        seed=0,
    ) -> Rule:
        out = [
            replicated(
                4,
                (
                    grad_out,
                    grad_residual_out,
                    residual_out,
                    normalized_shape,
                    weight,
                    bias,
                    mean,
                    rstd,
                    output_mask,
                    dropout_p,
                    seed,
                ),
            )
        ]
        for d in lead(residual_out, normalized_shape) if dropout_p == 0.0 else ():
            out.append(
                (
                    # d input is an empty placeholder without dropout: Replicate
                    [S(d), R, grad_p(weight, output_mask[1]), grad_p(bias, output_mask[2])],
                    [S(d), S(d), S(d), None, opt(weight, R), opt(bias, R), S(d), S(d), None, None, None],
                )
            )
        return out

    def add_rms_norm(
        input,
        residual,
        normalized_shape,
        weight,
        eps,
        offset=0.0,
        cast_before_weight=False,
        residual_in_fp32=False,
        dropout_p=0.0,
        seed=0,
    ) -> Rule:
        out = [
            replicated(
                3,
                (
                    input,
                    residual,
                    normalized_shape,
                    weight,
                    eps,
                    offset,
                    cast_before_weight,
                    residual_in_fp32,
                    dropout_p,
                    seed,
                ),
            )
        ]
        for d in lead(input, normalized_shape) if dropout_p == 0.0 else ():
            out.append(([S(d)] * 3, [S(d), S(d), None, opt(weight, R)] + [None] * 6))
        return out

    def add_rms_norm_backward(
        grad_out,
        grad_residual_out,
        residual_out,
        normalized_shape,
        weight,
        rstd,
        output_mask,
        offset=0.0,
        cast_before_weight=False,
        dropout_p=0.0,
        seed=0,
    ) -> Rule:
        out = [
            replicated(
                3,
                (
                    grad_out,
                    grad_residual_out,
                    residual_out,
                    normalized_shape,
                    weight,
                    rstd,
                    output_mask,
                    offset,
                    cast_before_weight,
                    dropout_p,
                    seed,
                ),
            )
        ]
        for d in lead(residual_out, normalized_shape) if dropout_p == 0.0 else ():
            out.append(
                (
                    [S(d), R, grad_p(weight, output_mask[1])],
                    [S(d), S(d), S(d), None, opt(weight, R), S(d), None, None, None, None, None],
                )
            )
        return out

    # -- GELU ---------------------------------------------------------------------------

    def gelu(input, approximate) -> Rule:
        return [replicated(1, (input, approximate))] + [([S(d)], [S(d), None]) for d in range(input.ndim)]

    def gelu_backward(grad_out, input, approximate) -> Rule:
        out = [replicated(1, (grad_out, input, approximate))]
        return out + [([S(d)], [S(d), S(d), None]) for d in range(input.ndim)]

    def bias_gelu(input, bias, approximate) -> Rule:
        out = [replicated(1, (input, bias, approximate))]
        out += [([S(d)], [S(d), R, None]) for d in range(input.ndim - 1)]
        if input.ndim:
            last = input.ndim - 1
            out.append(([S(last)], [S(last), S(0), None]))
        return out

    def bias_gelu_backward(grad_out, input, bias, approximate) -> Rule:
        out = [replicated(2, (grad_out, input, bias, approximate))]
        out += [([S(d), P], [S(d), S(d), R, None]) for d in range(input.ndim - 1)]
        if input.ndim:
            last = input.ndim - 1
            out.append(([S(last), S(0)], [S(last), S(last), S(0), None]))
        return out

    # -- GeGLU / SwiGLU: elementwise over two inputs of one shape -------------------------

    def glu(gate, up, *scalars) -> Rule:
        out = [replicated(1, (gate, up, *scalars))]
        return out + [([S(d)], [S(d), S(d)] + [None] * len(scalars)) for d in range(gate.ndim)]

    def glu_backward(grad_out, gate, up, *scalars) -> Rule:
        out = [replicated(2, (grad_out, gate, up, *scalars))]
        return out + [([S(d)] * 2, [S(d)] * 3 + [None] * len(scalars)) for d in range(gate.ndim)]

    # -- attention ----------------------------------------------------------------------

    def mask_p(mask: Spec | None, dim: int) -> Any:
        """The mask's placement when (B, Hq, Sq, Sk)'s ``dim`` is sharded: sharded alike
        where the mask has that dim, replicated where it broadcasts along it."""
        if mask is None:
            return None
        mdim = dim - (4 - mask.ndim)
        return R if mdim < 0 or mask.shape[mdim] == 1 else S(mdim)

    def dmask_p(mask: Spec | None, dim: int, mask_grad: bool) -> Any:
        if not (mask_grad and mask is not None):
            return R  # an empty placeholder
        p = mask_p(mask, dim)
        return P if p == R else p  # a broadcast mask's gradient sums over the shards

    def slopes_p(slopes: Spec | None, dim: int) -> Any:
        """ALiBi's slopes ((Hq,) or (B, Hq)) when (B, Hq, Sq, Sk)'s ``dim`` is sharded."""
        if slopes is None:
            return None
        if dim >= 2:
            return R
        d = dim - (2 - slopes.ndim)
        return R if d < 0 else S(d)

    def by_position(c: AttentionCall | AttentionBackwardCall) -> bool:
        """The scores depend on the query's global row index (causal, window, alignment, ALiBi)."""
        return c.is_causal or c.window_left >= 0 or c.window_right >= 0 or c.bottom_right or c.alibi_slopes is not None

    def sdpa(*args: Any) -> Rule:
        c = AttentionCall(*args)
        out = [replicated(2, c)]
        if c.dropout_p > 0.0:
            return out
        tail = [None] * 10
        for d in (0, 1):
            inputs = [S(d), S(d), S(d), mask_p(c.attn_mask, d)] + tail + [slopes_p(c.alibi_slopes, d)]
            out.append(([S(d), S(d)], inputs))
        if not by_position(c):
            out.append(([S(2), S(2)], [S(2), R, R, mask_p(c.attn_mask, 2)] + tail + [None]))
        return out

    def sdpa_backward(*args: Any) -> Rule:
        c = AttentionBackwardCall(*args)
        rule = [replicated(4, c)]
        if c.dropout_p > 0.0:
            return rule
        tail = [None] * 11
        for d in (0, 1):
            rule.append(
                (
                    [S(d), S(d), S(d), dmask_p(c.attn_mask, d, c.mask_grad)],
                    [S(d)] * 6 + [mask_p(c.attn_mask, d)] + tail + [slopes_p(c.alibi_slopes, d)],
                )
            )
        if not by_position(c):
            rule.append(
                (
                    [S(2), P, P, dmask_p(c.attn_mask, 2, c.mask_grad)],
                    [S(2), S(2), R, R, S(2), S(2), mask_p(c.attn_mask, 2)] + tail + [None],
                )
            )
        return rule

    def varlen_slopes(slopes: Spec | None) -> Any:
        """ALiBi's slopes ((Hq,) or (B, Hq)) when the heads are sharded."""
        return None if slopes is None else S(slopes.ndim - 1)

    def varlen(*args: Any) -> Rule:
        c = VarlenAttentionCall(*args)
        rule = [replicated(2, c)]
        if c.dropout_p == 0.0:
            rule.append(([S(1), S(0)], [S(1), S(1), S(1), R, R] + [None] * 12 + [varlen_slopes(c.alibi_slopes)]))
        return rule

    def varlen_backward(*args: Any) -> Rule:
        c = VarlenAttentionBackwardCall(*args)
        rule = [replicated(3, c)]
        if c.dropout_p == 0.0:
            inputs = [S(1)] * 5 + [S(0), R, R] + [None] * 12 + [varlen_slopes(c.alibi_slopes)]
            rule.append(([S(1)] * 3, inputs))
        return rule

    def decode(*args: Any, **kwargs: Any) -> Rule:
        c = DecodeAttentionCall(*args, **kwargs)
        table, idx = c.block_table, c.cache_batch_idx
        if table is not None:  # a paged pool serves every sequence: blocks stay whole
            return [
                replicated(2, c),
                ([S(0), S(0)], [S(0), R, R, S(0), None, None, S(0), None]),
                ([S(1), S(1)], [S(1), S(2), S(2), R, None, None, R, None]),
            ]
        cache = S(0) if idx is None else R  # with cache_batch_idx any sequence may read any row
        return [
            replicated(2, c),
            ([S(0), S(0)], [S(0), cache, cache, S(0), None, None, None, opt(idx, S(0))]),
            ([S(1), S(1)], [S(1), S(1), S(1), R, None, None, None, opt(idx, R)]),
        ]

    def decode_groups(input_specs: list[Spec], output_specs: Any) -> bool:
        """Whole GQA groups per shard (as :func:`whole_groups`), the K/V heads at dim 2 of a
        paged cache (the call has a 2-D block table)."""
        query, key = input_specs[0], input_specs[1]
        hd = 2 if any(getattr(s, "ndim", 0) == 2 for s in input_specs[4:]) else 1
        hq, hkv = query.shape[1], key.shape[hd]
        return hq == hkv or hkv % _shards(key, hd) == 0

    def whole_groups(key_index: int) -> Callable[[list[Spec], Any], bool]:
        """Heads may be sharded only where each shard gets whole GQA groups: the key/value
        heads split evenly (then the query heads do, and local head ``h`` reads local
        key/value head ``h // groups`` as on the whole tensors)."""

        def ok(input_specs: list[Spec], output_specs: Any) -> bool:
            query, key = input_specs[key_index - 1], input_specs[key_index]
            hq, hkv = query.shape[1], key.shape[1]
            return hq == hkv or hkv % _shards(key, 1) == 0

        return ok

    # -- int8 ---------------------------------------------------------------------------

    def quantize_int8(x, dim) -> Rule:
        q = dim % x.ndim if x.ndim else 0
        out = [replicated(2, (x, dim))]
        for d in range(x.ndim):
            if d != q:
                out.append(([S(d), S(d if d < q else d - 1)], [S(d), None]))
        return out

    def int8_matmul(a, b, a_scale, b_scale, bias, out_dtype) -> Rule:
        out = [replicated(1, (a, b, a_scale, b_scale, bias, out_dtype))]
        rows = list(a.shape[:-1])
        per_row = a_scale is not None and list(a_scale.shape) == rows
        for d in range(a.ndim - 1):
            out.append(([S(d)], [S(d), R, opt(a_scale, S(d) if per_row else R), opt(b_scale, R), opt(bias, R), None]))
        per_col = b_scale is not None and list(b_scale.shape) == [b.shape[1]]
        last = a.ndim - 1
        out.append(([S(last)], [R, S(1), opt(a_scale, R), opt(b_scale, S(0) if per_col else R), opt(bias, S(0)), None]))
        if a_scale is None:  # the int32 product is exact: partial sums over K add up to it
            out.append(([P], [S(last), S(0), None, None, None, None]))
        return out

    def int8_linear(input, weight, weight_scale, bias, mode, activation) -> Rule:
        out = [replicated(1, (input, weight, weight_scale, bias, mode, activation))]
        last = input.ndim - 1
        for d in range(last):
            out.append(([S(d)], [S(d), R, R, opt(bias, R), None, None]))
        out.append(([S(last)], [R, S(0), S(0), opt(bias, S(0)), None, None]))
        if mode == "w8a16" and activation == "none":
            out.append(([P], [S(last), S(1), R, opt(bias, P), None, None]))
        return out

    return {
        "layer_norm": (layer_norm, None),
        "layer_norm_backward": (layer_norm_backward, None),
        "rms_norm": (rms_norm, None),
        "rms_norm_backward": (rms_norm_backward, None),
        "add_layer_norm": (add_layer_norm, None),
        "add_layer_norm_backward": (add_layer_norm_backward, None),
        "add_rms_norm": (add_rms_norm, None),
        "add_rms_norm_backward": (add_rms_norm_backward, None),
        "gelu": (gelu, None),
        "gelu_backward": (gelu_backward, None),
        "bias_gelu": (bias_gelu, None),
        "bias_gelu_backward": (bias_gelu_backward, None),
        "geglu": (glu, None),
        "geglu_backward": (glu_backward, None),
        "swiglu": (glu, None),
        "swiglu_backward": (glu_backward, None),
        "scaled_dot_product_attention": (sdpa, whole_groups(1)),
        "scaled_dot_product_attention_backward": (sdpa_backward, whole_groups(2)),
        "decode_attention": (decode, decode_groups),
        "varlen_attention": (varlen, whole_groups(1)),
        "varlen_attention_backward": (varlen_backward, whole_groups(2)),
        "quantize_int8": (quantize_int8, None),
        "int8_matmul": (int8_matmul, None),
        "int8_linear": (int8_linear, None),
    }


def _is_spec(a: object) -> bool:
    return a is not None and hasattr(a, "placements")


def _shards(spec: Spec, dim: int) -> int:
    """Into how many pieces the placements of ``spec`` cut tensor dim ``dim``."""
    from torch.distributed.tensor import Shard

    sizes = [
        spec.mesh.size(i) for i, p in enumerate(spec.placements) if isinstance(p, Shard) and p.dim % spec.ndim == dim
    ]
    return math.prod(sizes)
