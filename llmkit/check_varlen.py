"""``llmkit check`` cases of packed variable-length attention (``varlen_attention``), forward
and backward: mixed lengths (0 and 1 included), chunked prefill with bottom-right alignment and a
window, and a realistic GPU mix.

Built like the cases of :mod:`llmkit.check`: fresh random inputs, the op on the backend in
force; each sequence alone in PyTorch's eager formula in the case's dtype as the baseline
(:func:`llmkit.check_attention.eager_attention`) and in float64
(:func:`llmkit.reference64.attention_llm`) as the yardstick.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import ops as L
from . import reference64 as R
from .check import WITH_F64, Case, _f64, _grads, _leaf
from .check_attention import eager_attention

_GPU_MIX = [2048, 128, 1024, 1000, 1535, 513, 257, 2048, 1170]
"""A realistic packed batch (9,723 tokens, lengths between 128 and 2048)."""

# lengths_q, lengths_k (None: the same), Hq, Hkv, D, causal, bottom_right, window, quick, interp
VARLEN_CONFIGS: list[tuple[list[int], list[int] | None, int, int, int, bool, bool, tuple[int, int], bool, bool]] = [
    ([37, 1, 0, 64, 13], None, 4, 2, 64, True, False, (-1, -1), True, True),
    ([0, 0], None, 2, 2, 16, True, False, (-1, -1), True, True),  # no token at all
    ([5, 17, 1], [40, 17, 30], 4, 4, 64, True, True, (16, -1), False, True),  # chunked prefill, window
    (_GPU_MIX, None, 8, 2, 128, True, False, (-1, -1), False, False),
]


def _cu(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _each(fn: Callable[..., torch.Tensor], q, k, v, lq: list[int], lk: list[int]) -> torch.Tensor:
    """``fn`` on each sequence as (1, H, S, D), packed back to (total_q, H, Dv)."""
    outs, cq, ck = [], _cu(lq, q.device).tolist(), _cu(lk, q.device).tolist()
    for b in range(len(lq)):
        if lq[b] == 0 or lk[b] == 0:
            outs.append(q.new_zeros(lq[b], q.shape[1], v.shape[2]) + 0.0 * q[:0].sum())
            continue
        dense = [
            t[s:e].transpose(0, 1)[None]
            for t, s, e in ((q, cq[b], cq[b + 1]), (k, ck[b], ck[b + 1]), (v, ck[b], ck[b + 1]))
        ]
        outs.append(fn(*dense)[0].transpose(0, 1))
    return torch.cat(outs)


def varlen_cases() -> Iterable[Case]:
    for dtype in WITH_F64:
        for lq, lk_, hq, hkv, dh, causal, br, window, quick, interp in VARLEN_CONFIGS:
            lk = lk_ or lq
            if dtype == torch.float64 and not interp:
                continue

            def make(dev, lq=lq, lk=lk, hq=hq, hkv=hkv, dh=dh, dtype=dtype) -> dict[str, Any]:
                return {
                    "q": torch.randn(sum(lq), hq, dh, device=dev).to(dtype),
                    "k": torch.randn(sum(lk), hkv, dh, device=dev).to(dtype),
                    "v": torch.randn(hkv, sum(lk), dh, device=dev).to(dtype).transpose(0, 1),  # strided
                    "gy": torch.randn(sum(lq), hq, dh, device=dev),
                }

            opts = dict(causal=causal, br=br, window=window, lq=lq, lk=lk)

            def run(d, opts=opts):
                q, k, v = _leaf(d["q"]), _leaf(d["k"]), _leaf(d["v"])
                lq, lk = opts["lq"], opts["lk"]
                y = L.varlen_attention(
                    q,
                    k,
                    v,
                    _cu(lq, q.device),
                    _cu(lk, q.device),
                    max(lq),
                    max(lk),
                    is_causal=opts["causal"],
                    causal_alignment="bottom_right" if opts["br"] else "top_left",
                    window_size=opts["window"],
                    enable_gqa=q.shape[1] != k.shape[1],
                )
                return {"out": y} | _grads(y, d["gy"], {"query": q, "key": k, "value": v})

            def ref(d, opts=opts):
                q, k, v = (_f64(_leaf(d[n])) for n in ("q", "k", "v"))
                y = _each(
                    lambda a, b, c, o=opts: R.attention_llm(
                        a, b, c, None, o["causal"], bottom_right=o["br"], window=o["window"]
                    )[0],
                    q,
                    k,
                    v,
                    opts["lq"],
                    opts["lk"],
                )
                return {"out": y} | _grads(y, d["gy"], {"query": q, "key": k, "value": v})

            def base(d, opts=opts):
                q, k, v = _leaf(d["q"]), _leaf(d["k"]), _leaf(d["v"])
                y = _each(
                    lambda a, b, c, o=opts: eager_attention(
                        a, b, c, a.shape[-1] ** -0.5, causal=o["causal"], bottom_right=o["br"], window=o["window"]
                    )[0],
                    q,
                    k,
                    v,
                    opts["lq"],
                    opts["lk"],
                )
                return {"out": y} | _grads(y, d["gy"], {"query": q, "key": k, "value": v})

            label = (
                f"{len(lq)} seqs, {sum(lq)}x{sum(lk)} tokens H{hq}/{hkv} D{dh}{' causal' if causal else ''}"
                f"{' bottom-right' if br else ''}{f' window{window}' if window != (-1, -1) else ''}"
            )
            yield Case("varlen_attention", label, dtype, make, run, ref, base, quick=quick, interp=interp)
