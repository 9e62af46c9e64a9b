"""The ``varlen_attention`` suite: packed variable-length attention (a realistic length mix,
lengths drawn between ``lo`` and ``hi`` until ``total`` tokens; GQA, causal) against the same
sequences padded to the longest and run as one dense batch.

Implementations: the padded ``F.scaled_dot_product_attention`` call (``eager``, the baseline;
each sequence padded at its end, ``is_causal`` keeps the padding out of every real row),
llmkit's ``varlen_attention`` on each backend, llmkit's dense op on the same padded batch
(``llmkit[<backend>]+padded``), and flash-attn's ``flash_attn_varlen_func`` on CUDA when
installed. Every implementation takes the packed ``(total, H, D)`` tensors: the padded ones
scatter them into the padded batch and gather the output back inside the timed call (an
``O(total * H * D)`` copy, small next to the attention). TFLOP/s count the real (query, key)
pairs only (FlashAttention's convention per sequence).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import ops as L
from . import formulas
from .suite import Case, Context, OpCall, Suite, elem_size, optional_module, register, standard_impls


def length_mix(total: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Lengths drawn uniformly from [lo, hi] (a fixed generator) until they sum to ``total``;
    the last one is cut to fit (it may be shorter than ``lo``)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while sum(out) < total:
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        out.append(min(n, total - sum(out)))
    return out


def _build_varlen(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
    total, h, d = point["total"], point["H"], point["D"]
    hkv = point.get("Hkv", h)
    causal = bool(point.get("causal", True))
    lengths = length_mix(total, point["lo"], point["hi"])
    dev = ctx.device
    b, longest = len(lengths), max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    # token t of the packed batch sits at row `slot[t]` of the (B * longest) padded rows
    starts = torch.tensor([i * longest for i in range(b)], device=dev)
    slot = torch.cat([starts[i] + torch.arange(n, device=dev) for i, n in enumerate(lengths)])
    q = torch.randn(total, h, d, device=dev).to(dtype)
    k = torch.randn(total, hkv, d, device=dev).to(dtype)
    v = torch.randn(total, hkv, d, device=dev).to(dtype)
    dout = torch.randn(total, h, d, device=dev).to(dtype)
    gqa = hkv != h

    def pad(t: torch.Tensor) -> torch.Tensor:  # (total, H, D) -> (B, H, longest, D)
        out = t.new_zeros(b * longest, t.shape[1], t.shape[2]).index_copy(0, slot, t)
        return out.view(b, longest, t.shape[1], t.shape[2]).transpose(1, 2)

    def unpad(o: torch.Tensor) -> torch.Tensor:  # (B, H, longest, D) -> (total, H, D)
        return o.transpose(1, 2).reshape(b * longest, o.shape[1], o.shape[3]).index_select(0, slot)

    def padded_sdpa(q, k, v):
        return unpad(F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=causal, enable_gqa=gqa))

    def varlen(q, k, v):
        return L.varlen_attention(q, k, v, cu, cu, longest, longest, is_causal=causal, enable_gqa=gqa)

    call = OpCall([q, k, v], pass_, wrt=(0, 1, 2), grads=[dout])
    impls = standard_impls(ctx, "varlen_attention", call, padded_sdpa, varlen)
    impls = [i for i in impls if i.name != "torch.compile"]  # the padded copies are not what is measured
    for be in ctx.backends:
        impls.append(
            call.impl(
                f"llmkit[{be}]+padded",
                lambda q, k, v: unpad(
                    L.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=causal, enable_gqa=gqa)
                ),
                backend=be,
            )
        )
    fa = optional_module("flash_attn") if dev.type == "cuda" else None
    if fa is not None:

        def flash(q, k, v):
            return fa.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=causal)

        impls.append(call.impl("flash-attn", flash))
    work = formulas.varlen_attention(lengths, h, d, elem_size(dtype), causal, pass_ == "bwd", hkv=hkv)
    return Case("varlen_attention", pass_, point, dtype, work, "compute", impls)


register(
    Suite(
        "varlen_attention",
        "op",
        ("fwd", "bwd"),
        _build_varlen,
        "packed variable-length attention (lengths lo..hi, total tokens) vs the padded SDPA batch",
    )
)
