"""Attention suite ``attention_llm``: the score options of today's LLMs, one model layer each.

Every point is causal, aligned bottom-right (flash-attention's convention), with GQA when
``Hkv < H``; its keys pick the layer:

* Gemma 2's attention: head dim 256, logit softcap ``softcap`` (an integer), a sliding
  window of ``W`` keys (no ``W``: its global layers);
* chunked prefill against a KV cache: ``Sq`` new queries after ``Sk - Sq`` cached keys;
* ``alibi``: ALiBi slopes (BLOOM / MPT), the bias computed in the kernel.

Baseline (``eager``): the written-out formula HuggingFace's eager attention runs (scores,
softcap, the bias or mask as a dense ``(Sq, Sk)`` tensor, float32 softmax, values).
``sdpa+mask``: SDPA with the same dense mask where it can express the layer (not softcap).
llmkit's op with the options on each backend; flash-attn's ``flash_attn_func`` (its
``softcap`` / ``window_size`` / ``alibi_slopes``) on CUDA when installed. TFLOP/s counting
only the visible (query, key) pairs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops as L
from . import formulas
from .suite import Case, Context, OpCall, Suite, elem_size, optional_module, register, standard_impls


def alibi_slopes(h: int) -> torch.Tensor:
    """ALiBi's slopes for ``h`` heads: the geometric sequence ``2^(-8 i / h)``, i = 1..h."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])


def _bias(sq: int, sk: int, left: int, slopes: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The dense additive ``(1 or H, Sq, Sk)`` float32 bias of a bottom-right causal layer with a
    window of ``left`` keys (-1: none) and optional ALiBi: ``-inf`` where hidden."""
    diag = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    ok = j <= diag
    if left >= 0:
        ok = ok & (j >= diag - left)
    bias = torch.zeros(sq, sk, device=device).masked_fill_(~ok, float("-inf"))[None]
    if slopes is not None:
        bias = bias - slopes.to(device)[:, None, None] * (diag - j).abs()
    return bias


def _eager(q, k, v, bias: torch.Tensor, softcap: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s + bias, dim=-1).to(q.dtype)
    return torch.matmul(p, v)


def _build(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
    b, h, sq, sk, d = point["B"], point["H"], point["Sq"], point["Sk"], point["D"]
    hkv = point.get("Hkv", h)
    left = point.get("W", -1)
    softcap = float(point.get("softcap", 0.0))
    slopes = alibi_slopes(h).to(ctx.device) if point.get("alibi") else None
    dev = ctx.device
    q = torch.randn(b, sq, h, d, device=dev).to(dtype).transpose(1, 2)
    k = torch.randn(b, sk, hkv, d, device=dev).to(dtype).transpose(1, 2)
    v = torch.randn(b, sk, hkv, d, device=dev).to(dtype).transpose(1, 2)
    dout = torch.randn(b, h, sq, d, device=dev).to(dtype)
    gqa = hkv != h
    bias = _bias(sq, sk, left, slopes, dev)
    call = OpCall([q, k, v], pass_, wrt=(0, 1, 2), grads=[dout])
    impls = standard_impls(
        ctx,
        "attention",
        call,
        lambda q, k, v: _eager(q, k, v, bias, softcap),
        lambda q, k, v: L.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            enable_gqa=gqa,
            causal_alignment="bottom_right",
            window_size=(left, 0),
            softcap=softcap,
            alibi_slopes=slopes,
        ),
    )
    if not softcap:
        mask = bias.to(dtype) if slopes is not None else bias == 0.0

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

        impls.insert(1, call.impl("sdpa+mask", sdpa))
    fa = optional_module("flash_attn") if dev.type == "cuda" else None
    if fa is not None:

        def flash(q, k, v):  # flash-attn takes (B, S, H, D); its causal is bottom-right
            out = fa.flash_attn_func(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                causal=True,
                window_size=(left, 0),
                softcap=softcap,
                alibi_slopes=None if slopes is None else slopes.float(),
            )
            return out.transpose(1, 2)

        impls.append(call.impl("flash-attn", flash))
    pairs = formulas.window_keys(sq, sk, left, 0)
    work = formulas.attention_pairs(b, h, sq, sk, d, elem_size(dtype), pairs, pass_ == "bwd", hkv=hkv)
    return Case("attention_llm", pass_, point, dtype, work, "compute", impls)


register(
    Suite(
        "attention_llm",
        "op",
        ("fwd", "bwd"),
        _build,
        "Gemma 2 softcap (+window), chunked prefill (bottom-right causal), ALiBi vs the eager formula",
    )
)
