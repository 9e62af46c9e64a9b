"""``llmkit check`` cases of attention's options for today's LLMs: bottom-right causal alignment
(chunked prefill), sliding windows, softcapping (Gemma 2) and ALiBi, forward and backward.

Built like the cases of :mod:`llmkit.check`: fresh random inputs, the op on the backend in
force, PyTorch's eager computation of the same formula in the case's dtype as the baseline
(scores, softcap, bias and mask in that dtype, softmax in float32: HuggingFace's eager
attention), :func:`llmkit.reference64.attention_llm` as the yardstick.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from . import ops as L
from . import reference64 as R
from .check import WITH_F64, Case, _f64, _grads, _leaf

# B, Hq, Hkv, Sq, Sk, D, causal, bottom_right, window, softcap, alibi, quick, interp
ATTENTION_LLM_CONFIGS = [
    (1, 4, 2, 37, 61, 64, True, True, (-1, -1), 0.0, False, True, True),  # chunked prefill on a cache
    (1, 4, 2, 77, 77, 64, True, False, (16, -1), 0.0, False, True, True),  # sliding window
    (1, 4, 2, 45, 45, 64, True, False, (16, -1), 20.0, False, False, True),  # Gemma 2 sliding layer
    (2, 4, 4, 33, 40, 64, True, True, (-1, -1), 0.0, True, False, True),  # ALiBi
    (2, 8, 2, 1024, 4096, 128, True, True, (1023, -1), 0.0, False, False, False),
    (1, 8, 4, 4096, 4096, 256, True, False, (1023, -1), 50.0, False, False, False),
]


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    bottom_right: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    slopes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the formula of :func:`llmkit.reference64.attention_llm` in the inputs'
    dtype, the softmax in float32 (HuggingFace's eager attention): the baseline of the tolerance
    rule. ``mask``: boolean (True = attend); ``keep``: a dropout keep-mask."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    sq, sk = q.shape[2], k.shape[2]
    diag = torch.arange(sq, device=q.device)[:, None] + (sk - sq if bottom_right else 0)
    j = torch.arange(sk, device=q.device)[None, :]
    if slopes is not None:
        s = s - (slopes[..., None, None] * (diag - j).abs()).to(s.dtype)
    ok = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        ok &= j <= diag
    if window[1] >= 0:
        ok &= j <= diag + window[1]
    if window[0] >= 0:
        ok &= j >= diag - window[0]
    if mask is not None:
        ok = ok & mask
    s = s.masked_fill(~ok, float("-inf")).float()
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return p @ v, torch.logsumexp(s, -1)


def attention_llm_cases() -> Iterable[Case]:
    for dtype in WITH_F64:
        for b, hq, hkv, sq, sk, dh, causal, br, window, softcap, alibi, quick, interp in ATTENTION_LLM_CONFIGS:
            if dtype == torch.float64 and (quick or sk > 1024):
                continue

            def make(dev, b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, dh=dh, dtype=dtype, alibi=alibi) -> dict[str, Any]:
                return {
                    "q": torch.randn(b, hq, sq, dh, device=dev).to(dtype),
                    "k": torch.randn(b, sk, hkv, dh, device=dev).to(dtype).transpose(1, 2),  # strided
                    "v": torch.randn(b, hkv, sk, dh, device=dev).to(dtype),
                    "gy": torch.randn(b, hq, sq, dh, device=dev),
                    "slopes": torch.rand(hq, device=dev) if alibi else None,
                }

            opts = dict(causal=causal, br=br, window=window, softcap=softcap)

            def run(d, opts=opts):
                q, k, v = _leaf(d["q"]), _leaf(d["k"]), _leaf(d["v"])
                y = L.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    is_causal=opts["causal"],
                    enable_gqa=q.shape[1] != k.shape[1],
                    causal_alignment="bottom_right" if opts["br"] else "top_left",
                    window_size=opts["window"],
                    softcap=opts["softcap"],
                    alibi_slopes=d["slopes"],
                )
                return {"out": y} | _grads(y, d["gy"], {"query": q, "key": k, "value": v})

            def ref(d, opts=opts):
                q, k, v = (_f64(_leaf(d[n])) for n in ("q", "k", "v"))
                y, _ = R.attention_llm(
                    q,
                    k,
                    v,
                    None,
                    opts["causal"],
                    bottom_right=opts["br"],
                    window=opts["window"],
                    softcap=opts["softcap"],
                    alibi_slopes=d["slopes"],
                )
                return {"out": y} | _grads(y, d["gy"], {"query": q, "key": k, "value": v})

            def base(d, opts=opts):
                q, k, v = _leaf(d["q"]), _leaf(d["k"]), _leaf(d["v"])
                y, _ = eager_attention(
                    q,
                    k,
                    v,
                    q.shape[-1] ** -0.5,
                    causal=opts["causal"],
                    bottom_right=opts["br"],
                    window=opts["window"],
                    softcap=opts["softcap"],
                    slopes=d["slopes"],
                )
                return {"out": y} | _grads(y, d["gy"], {"query": q, "key": k, "value": v})

            label = (
                f"B{b} H{hq}/{hkv} S{sq}x{sk} D{dh}{' causal' if causal else ''}"
                f"{' bottom-right' if br else ''}{f' window{window}' if window != (-1, -1) else ''}"
                f"{f' softcap{softcap:g}' if softcap else ''}{' alibi' if alibi else ''}"
            )
            yield Case("attention", label, dtype, make, run, ref, base, quick=quick, interp=interp)
