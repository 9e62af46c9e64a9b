"""Launchers of packed variable-length attention (``flash_attn_varlen_func``'s layout) on the
attention kernels of ``kernels/attention.py`` and ``kernels/attention_backward.py``, compiled
with ``VARLEN=True`` (the same kernels: no separate copies).

Layout: ``q (total_q, Hq, D)``, ``k (total_k, Hkv, D)``, ``v (total_k, Hkv, Dv)`` with any
strides on the token and head dims (rows that are not 16-byte aligned are copied first, as
the dense launchers do); sequence ``b`` holds rows ``cu_seqlens[b] : cu_seqlens[b + 1]``
(int32, ``(B + 1,)``, validated by the caller). The grid enumerates ``(blocks of the longest
sequence, H, B)``; each program reads its sequence's start and length from ``cu_seqlens`` and
returns at once when its block lies past the sequence's end. The causal diagonal, the
sliding window and ALiBi's distances are placed within each sequence (bottom-right: query
``i``'s diagonal is key ``i + seq_k - seq_q`` of its own sequence).

Dropout: sequence ``b`` keeps what an attention call on it alone keeps with offset
``offset + b * Hq * max_seqlen_q * max_seqlen_k`` (see ``_attention_common._rng_base``).
``lse`` is float32 ``(Hq, total_q)``; the backward's row statistics are float32
``(3, B, Hq, max_seqlen_q)`` (rows past a sequence's end are neither written nor read).
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from . import _attention_common as _c
from ._attention_common import MaskArgs, ScoreArgs, _common_constexprs, _dropout_args, rows_aligned
from ._attention_configs import BackwardConfig, TileConfig, backward_config, device_arch, forward_config, stats_config
from ._launch import launch
from .attention import _attn_fwd_kernel
from .attention_backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_stats_kernel


def _band(is_causal: bool, bottom_right: bool, window: tuple[int, int], softcap: float,
          alibi_slopes: torch.Tensor | None) -> ScoreArgs:
    """The kernels' score arguments; ``diag_off`` is 1 for bottom-right alignment (the kernels
    take each sequence's own ``seq_k - seq_q`` then), 0 for top-left."""
    band = ScoreArgs.of(0, 0, is_causal, False, window, softcap, alibi_slopes)
    return dataclasses.replace(band, diag_off=int(bottom_right))


def _rows(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a packed (total, H, D) tensor: batch 0."""
    return 0, int(t.stride(1)), int(t.stride(0))


def varlen_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: int,
    offset: int,
    config: TileConfig | None = None,
    *,
    bottom_right: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length attention forward.

    Returns ``out (total_q, Hq, Dv)`` in the query's dtype (contiguous) and ``lse (Hq,
    total_q)`` float32 (natural log; ``+inf`` on rows with no visible key, whose ``out`` is 0).
    The options are :func:`~llmkit.kernels.attention.attention_forward`'s, per sequence.
    """
    total_q, hq, d = query.shape
    hkv, dv = key.shape[1], value.shape[2]
    n_seq = cu_seqlens_q.shape[0] - 1
    out = _c._empty((total_q, hq, dv), query.dtype, query.device)
    lse = _c._empty((hq, total_q), torch.float32, query.device)
    if lse.numel() == 0:
        return out, lse
    q, k, v = (_c._aligned_rows(t) for t in (query, key, value))
    o = out if rows_aligned(out) else _c._padded_empty((total_q, hq, dv), query.dtype, query.device)
    band = _band(is_causal, bottom_right, window, softcap, alibi_slopes)
    mask = MaskArgs.of(None, (n_seq, hq, max_seqlen_q, max_seqlen_k), q)
    p, inv_keep = _dropout_args(dropout_p)
    cfg = config or forward_config(d, dv, query.dtype, device_arch(query.device), masked=band.heavy(),
                                   dropout=p > 0.0)
    launch(
        _attn_fwd_kernel, (triton.cdiv(max_seqlen_q, cfg.block_m) * hq * n_seq,),
        q, k, v, o, lse, mask.tensor, mask.seen, cu_seqlens_q, cu_seqlens_k,
        *_rows(q), *_rows(k), *_rows(v), *_rows(o), *mask.strides, *mask.seen_strides(),
        hq, max_seqlen_q, max_seqlen_k, hq // hkv, *band.kernel_args(q),
        band.qk_scale(scale), p, inv_keep, int(seed), int(offset), total_q,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        **_common_constexprs(d, dv, band, mask, p > 0.0, q, varlen=True),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (o if o is out else o.contiguous()), lse


def varlen_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: int,
    offset: int,
    config: BackwardConfig | None = None,
    *,
    bottom_right: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed variable-length attention backward: ``dq, dk, dv`` (contiguous, the inputs'
    dtype), by the dense backward's three kernels (row statistics, dQ, dK/dV) per sequence."""
    total_q, hq, d = query.shape
    total_k, hkv, _ = key.shape
    dv = value.shape[2]
    n_seq = cu_seqlens_q.shape[0] - 1
    if total_q * hq == 0 or total_k == 0:  # nothing attends: every gradient is zero
        zq, zk, zv = (_c._empty(tuple(t.shape), t.dtype, t.device).zero_() for t in (query, key, value))
        return zq, zk, zv
    dq, dk, dvv = (_c._padded_empty(tuple(t.shape), t.dtype, t.device) for t in (query, key, value))
    q, k, v, do = (_c._aligned_rows(t) for t in (query, key, value, grad_out))
    stats = _c._empty((3, n_seq, hq, max_seqlen_q), torch.float32, query.device)
    band = _band(is_causal, bottom_right, window, softcap, alibi_slopes)
    mask = MaskArgs.of(None, (n_seq, hq, max_seqlen_q, max_seqlen_k), q)
    p, inv_keep = _dropout_args(dropout_p)
    arch = device_arch(query.device)
    cfg = config or backward_config(d, dv, query.dtype, arch, masked=band.heavy(), dropout=p > 0.0)
    consts = _common_constexprs(d, dv, band, mask, p > 0.0, q, varlen=True)
    shape = (hq, max_seqlen_q, max_seqlen_k, hq // hkv, *band.kernel_args(q))
    scalars = (*shape, scale, band.qk_scale(scale), p, inv_keep, int(seed), int(offset))
    n_qblocks = triton.cdiv(max_seqlen_q, cfg.dq.block_m)
    st = stats_config(cfg.dq, d, dv, query.dtype, arch)
    if arch is not None and arch < 90 and max(d, dv) > 128:  # the sequence's bounds in registers too:
        st = dataclasses.replace(st, block_n=16)  # sm_80's 128-register cap at 8 warps spilled
    common = (mask.tensor, mask.seen, cu_seqlens_q, cu_seqlens_k)
    if n_qblocks > 0:
        launch(
            _attn_bwd_stats_kernel, (n_qblocks * hq * n_seq,),
            q, k, v, do, stats, *common,
            *_rows(q), *_rows(k), *_rows(v), *_rows(do), *mask.strides, *mask.seen_strides(),
            *shape, *scalars[len(shape) + 1:],
            BLOCK_M=st.block_m, BLOCK_N=st.block_n, **consts,
            num_warps=st.num_warps, num_stages=st.num_stages,
        )
        launch(
            _attn_bwd_dq_kernel, (n_qblocks * hq * n_seq,),
            q, k, v, do, stats, dq, *common,
            *_rows(q), *_rows(k), *_rows(v), *_rows(do), *_rows(dq), *mask.strides, *mask.seen_strides(),
            *scalars,
            BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n, **consts,
            num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages,
        )
    else:
        dq.zero_()
    launch(
        _attn_bwd_dkdv_kernel, (triton.cdiv(max_seqlen_k, cfg.dkdv.block_n) * hkv * n_seq,),
        q, k, v, do, stats, dk, dvv, *common,
        *_rows(q), *_rows(k), *_rows(v), *_rows(do), *_rows(dk), *_rows(dvv), *mask.strides, *mask.seen_strides(),
        *scalars,
        BLOCK_M=cfg.dkdv.block_m, BLOCK_N=cfg.dkdv.block_n, **consts,
        num_warps=cfg.dkdv.num_warps, num_stages=cfg.dkdv.num_stages,
    )
    return dq.contiguous(), dk.contiguous(), dvv.contiguous()


# --------------------------------------------------------------------------------------
# compile report
# --------------------------------------------------------------------------------------

_VARLEN_CASES: dict[str, tuple[torch.dtype, int, bool, dict, dict]] = {
    # name: dtype, head dim, causal, launcher options, shape (16 sequences, up to 2048 tokens each)
    "causal_gqa": (torch.bfloat16, 128, True, {}, dict(hq=32, hkv=8)),  # Llama-style packed prefill
    "plain": (torch.float16, 64, False, {}, {}),
    "br_window_alibi": (torch.bfloat16, 128, True, dict(bottom_right=True, window=(255, -1), alibi=True), {}),
    "softcap_window": (torch.bfloat16, 256, True, dict(softcap=50.0, window=(255, -1)), {}),  # Gemma 2
    "dropout": (torch.bfloat16, 128, True, dict(dropout=True), {}),
    "fp32": (torch.float32, 64, True, {}, {}),
}


def _varlen_call(backward: bool, dtype: torch.dtype, d: int, causal: bool, options: dict, n_seq: int = 16,
                 hq: int = 16, hkv: int = 16, max_len: int = 2048, total: int = 16384):
    """The launcher call of one spec on meta tensors: ``total`` packed tokens in ``n_seq`` sequences."""
    from .attention import SPEC_SEED, meta

    def call():
        q, k, v = meta(total, hq, d, dtype=dtype), meta(total, hkv, d, dtype=dtype), meta(total, hkv, d, dtype=dtype)
        cu = meta(n_seq + 1, dtype=torch.int32)
        opts = dict(options)
        p, seed = (0.1, SPEC_SEED) if opts.pop("dropout", False) else (0.0, 0)
        if opts.pop("alibi", False):
            opts["alibi_slopes"] = meta(hq, dtype=torch.float32)
        if not backward:
            return varlen_attention_forward(q, k, v, cu, cu, max_len, max_len, p, causal, d**-0.5, seed, 0, **opts)
        do = meta(total, hq, d, dtype=dtype)
        return varlen_attention_backward(do, q, k, v, cu, cu, max_len, max_len, p, causal, d**-0.5, seed, 0, **opts)

    return call


def compile_specs() -> list:
    """The four attention kernels compiled with ``VARLEN`` (packed (16384, H, D) tensors of 16
    sequences): Llama-style causal GQA, plain float16, bottom-right window + ALiBi, Gemma 2's
    softcap + window at D = 256, dropout and float32."""
    from ._compile import CompileSpec

    specs = []
    for name, (dtype, d, causal, options, shape) in _VARLEN_CASES.items():
        tag = f"varlen_{name}_{str(dtype).replace('torch.', '')}_d{d}"
        fwd = _varlen_call(False, dtype, d, causal, options, **shape)
        bwd = _varlen_call(True, dtype, d, causal, options, **shape)
        for kind, kernel, call in (("fwd", _attn_fwd_kernel, fwd), ("bwd_stats", _attn_bwd_stats_kernel, bwd),
                                   ("bwd_dq", _attn_bwd_dq_kernel, bwd), ("bwd_dkdv", _attn_bwd_dkdv_kernel, bwd)):
            specs.append(CompileSpec(f"{kind}_{tag}", kernel, call, matrix=dtype != torch.float32))
    return specs
