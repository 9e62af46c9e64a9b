"""Attention suites: ``attention`` (forward and backward) and ``decode_attention``.

``attention``: q, k, v stored ``(B, S, H, D)`` (the layout projections produce) and viewed
``(B, H, S, D)``, causal or not. Implementations: ``F.scaled_dot_product_attention``
with PyTorch's own choice (``eager``, the baseline) and with each SDPA backend forced
(``sdpa[flash]``, ``sdpa[efficient]``, ``sdpa[cudnn]``, ``sdpa[math]``; one that cannot
take the case is reported skipped), ``torch.compile`` of the written-out reference
(softmax(Q K^T * scale) V), llmkit's op on each backend, and flash-attn's
``flash_attn_func`` on CUDA when installed. TFLOP/s by FlashAttention's convention.

``attention_window``: causal sliding-window attention (Mistral's ``window_size=(W, 0)``) over
``S`` tokens. Baseline: SDPA with the window as a dense ``(S, S)`` boolean mask; llmkit's op
with ``window_size`` on each backend (key blocks outside the window skipped), and with the
same dense mask (``llmkit[<backend>]+mask``: what the window saves); flash-attn's
``window_size`` on CUDA when installed. TFLOP/s counting only the pairs inside the window.

``decode_attention``: ``T`` new queries against a full KV cache of length ``L`` with GQA.
Baseline: SDPA over the cache; llmkit's decode op on each backend. Memory-bound: GB/s
against the copy bandwidth. On CUDA it is timed inside CUDA graphs (launch-bound).

``decode_paged``: the same call against a paged cache (``block_table`` into
``(num_blocks, block, Hkv, D)`` blocks, shuffled so that no sequence is contiguous).
Baseline: gather the blocks, then SDPA; llmkit's paged decode on each backend, and its
contiguous-cache decode of the same data (``llmkit[<backend>]+contiguous``: the paged
call's target is to be within 10% of it), and the paged call that appends the new tokens' keys
and values itself (``llmkit[<backend>]+append``, ``k_new`` / ``v_new``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops as L
from ..ops.decode_attention import decode_mask
from . import formulas
from .suite import Case, Context, Impl, OpCall, Suite, elem_size, optional_module, register, standard_impls

SDPA_BACKENDS_CUDA = ("flash", "efficient", "cudnn", "math")
SDPA_BACKENDS_CPU = ("flash", "math")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D) [+ causal mask]) V written out (the compiled baseline)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.matmul(p, v)


def _sdpa_impls(ctx: Context, call: OpCall, causal: bool, gqa: bool) -> list[Impl]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = SDPA_BACKENDS_CUDA if ctx.device.type == "cuda" else SDPA_BACKENDS_CPU
    enum = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    out = []
    for n in names:

        def f(q, k, v, be=enum[n]):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        out.append(call.impl(f"sdpa[{n}]", f))
    return out


def _flash_attn_impls(ctx: Context, call: OpCall, causal: bool) -> list[Impl]:
    if ctx.device.type != "cuda":
        return []
    fa = optional_module("flash_attn")
    if fa is None:
        return []

    def f(q, k, v):  # flash-attn takes (B, S, H, D)
        out = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)

    return [call.impl("flash-attn", f)]


def bshd_inputs(
    b: int, h: int, hkv: int, sq: int, sk: int, d: int, dtype: torch.dtype, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v stored ``(B, S, H, D)`` (the layout projections produce) viewed ``(B, H, S, D)``,
    and a contiguous output gradient."""
    q = torch.randn(b, sq, h, d, device=dev).to(dtype).transpose(1, 2)
    k = torch.randn(b, sk, hkv, d, device=dev).to(dtype).transpose(1, 2)
    v = torch.randn(b, sk, hkv, d, device=dev).to(dtype).transpose(1, 2)
    return q, k, v, torch.randn(b, h, sq, d, device=dev).to(dtype)


def _build_attention(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
    b, h, s, d = point["B"], point["H"], point["S"], point["D"]
    hkv = point.get("Hkv", h)
    causal = bool(point.get("causal", False))
    q, k, v, dout = bshd_inputs(b, h, hkv, s, s, d, dtype, ctx.device)
    gqa = hkv != h
    call = OpCall([q, k, v], pass_, wrt=(0, 1, 2), grads=[dout])
    impls = standard_impls(
        ctx,
        "attention",
        call,
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
        lambda q, k, v: L.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
    )
    # torch.compile's baseline is the compiled written-out reference, not compiled SDPA
    impls = [i for i in impls if i.name != "torch.compile"]
    if ctx.compile:

        def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return reference_attention(q, k, v, causal)

        impls.insert(1, call.impl("torch.compile", torch.compile(reference)))
    impls[1:1] = _sdpa_impls(ctx, call, causal, gqa)
    impls += _flash_attn_impls(ctx, call, causal)
    work = formulas.attention(b, h, s, s, d, elem_size(dtype), causal, pass_ == "bwd", hkv=hkv)
    return Case("attention", pass_, point, dtype, work, "compute", impls)


def _build_decode(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
    b, h, t, cache, d = point["B"], point["H"], point["T"], point["L"], point["D"]
    hkv = point.get("Hkv", h)
    dev = ctx.device
    q = torch.randn(b, h, t, d, device=dev).to(dtype)
    k = torch.randn(b, hkv, cache, d, device=dev).to(dtype)
    v = torch.randn(b, hkv, cache, d, device=dev).to(dtype)
    lens = torch.full((b,), cache, dtype=torch.int32, device=dev)
    # every sequence holds `cache` tokens, the last `t` of them new: causal within them
    visible = decode_mask(lens, t, cache, True) if t > 1 else None

    def eager(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=hkv != h)

    call = OpCall([q, k, v], pass_)
    impls = standard_impls(ctx, "decode_attention", call, eager, lambda q, k, v: L.decode_attention(q, k, v, lens))
    work = formulas.decode_attention(b, h, hkv, t, cache, d, elem_size(dtype))
    return Case("decode_attention", pass_, point, dtype, work, "memory", impls, cuda_graph=True)


def _build_window(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
    b, h, s, d, w = point["B"], point["H"], point["S"], point["D"], point["W"]
    hkv = point.get("Hkv", h)
    dev = ctx.device
    q, k, v, dout = bshd_inputs(b, h, hkv, s, s, d, dtype, dev)
    gqa = hkv != h
    i = torch.arange(s, device=dev)
    band = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - w)  # query rows, key columns
    call = OpCall([q, k, v], pass_, wrt=(0, 1, 2), grads=[dout])
    impls = standard_impls(
        ctx,
        "attention",
        call,
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=gqa),
        lambda q, k, v: L.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, window_size=(w, 0)),
    )
    for be in ctx.backends:
        impls.append(
            call.impl(
                f"llmkit[{be}]+mask",
                lambda q, k, v: L.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=gqa),
                backend=be,
            )
        )
    fa = optional_module("flash_attn") if ctx.device.type == "cuda" else None
    if fa is not None:

        def flash(q, k, v):  # flash-attn takes (B, S, H, D)
            out = fa.flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window_size=(w, 0)
            )
            return out.transpose(1, 2)

        impls.append(call.impl("flash-attn", flash))
    work = formulas.attention_window(b, h, s, d, elem_size(dtype), w, 0, pass_ == "bwd", hkv=hkv)
    return Case("attention_window", pass_, point, dtype, work, "compute", impls)


def _build_decode_paged(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
    b, h, t, cache, d, blk = point["B"], point["H"], point["T"], point["L"], point["D"], point["block"]
    hkv = point.get("Hkv", h)
    dev = ctx.device
    per_seq = -(-cache // blk)
    gen = torch.Generator().manual_seed(0)
    table = torch.randperm(b * per_seq, generator=gen).view(b, per_seq).to(device=dev, dtype=torch.int32)
    k_pages = torch.randn(b * per_seq, blk, hkv, d, device=dev).to(dtype)
    v_pages = torch.randn(b * per_seq, blk, hkv, d, device=dev).to(dtype)
    q = torch.randn(b, h, t, d, device=dev).to(dtype)
    lens = torch.full((b,), cache, dtype=torch.int32, device=dev)
    visible = decode_mask(lens, t, cache, True) if t > 1 else None

    def gathered(pages: torch.Tensor) -> torch.Tensor:  # (B, Hkv, L, D), sequence b's blocks in order
        return pages[table.long()].reshape(b, per_seq * blk, hkv, d)[:, :cache].transpose(1, 2)

    k_flat, v_flat = gathered(k_pages).contiguous(), gathered(v_pages).contiguous()

    def eager(q, kp, vp):
        return F.scaled_dot_product_attention(q, gathered(kp), gathered(vp), attn_mask=visible, enable_gqa=hkv != h)

    call = OpCall([q, k_pages, v_pages], pass_)
    impls = standard_impls(
        ctx, "decode_attention", call, eager, lambda q, kp, vp: L.decode_attention(q, kp, vp, lens, block_table=table)
    )
    # the same tokens' keys / values appended by the call itself (k_new / v_new written into the pages
    # first: the lengths then count the tokens before the call)
    k_new, v_new = k_flat[:, :, cache - t :].clone(), v_flat[:, :, cache - t :].clone()
    before = lens - t
    for be in ctx.backends:
        impls.append(
            call.impl(
                f"llmkit[{be}]+contiguous", lambda q, kp, vp: L.decode_attention(q, k_flat, v_flat, lens), backend=be
            )
        )
        impls.append(
            call.impl(
                f"llmkit[{be}]+append",
                lambda q, kp, vp: L.decode_attention(q, kp, vp, before, k_new=k_new, v_new=v_new, block_table=table),
                backend=be,
            )
        )
    work = formulas.decode_paged(b, h, hkv, t, cache, d, elem_size(dtype), blk)
    return Case("decode_paged", pass_, point, dtype, work, "memory", impls, cuda_graph=True)


register(
    Suite(
        "attention",
        "op",
        ("fwd", "bwd"),
        _build_attention,
        "scaled dot-product attention, (B, H, S, D) views of (B, S, H, D) storage",
    )
)
register(Suite("decode_attention", "op", ("fwd",), _build_decode, "T new queries against a KV cache of length L (GQA)"))
register(
    Suite(
        "attention_window",
        "op",
        ("fwd", "bwd"),
        _build_window,
        "causal sliding-window attention (window W) vs SDPA with the window as a dense mask",
    )
)
register(
    Suite(
        "decode_paged",
        "op",
        ("fwd",),
        _build_decode_paged,
        "decode against a paged KV cache (block_table) vs gather + SDPA and the contiguous cache",
    )
)
