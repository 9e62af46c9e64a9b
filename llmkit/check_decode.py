"""``llmkit check`` cases of decode attention's cache options: a paged KV cache
(``block_table``), its ``lse`` (``return_lse``), new tokens appended inside the call
(``k_new`` / ``v_new``) and ``cache_batch_idx``.

Built like the cases of :mod:`llmkit.check`: fresh random inputs, each sequence's blocks
scattered through the pool; the yardstick gathers every position from its block in float64
(``table[b, j // block_size]``, slot ``j % block_size``) and runs :func:`llmkit.reference64.
decode_attention` with a float64 log-sum-exp; the baseline is PyTorch's SDPA (and its
``logsumexp``) in the case's dtype on the same gathered cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops as L
from . import reference64 as R
from .check import HALF_AND_FLOAT, Case

F64 = torch.float64

# B, Hq, Hkv, T, D, block size, option ("paged", "append": paged with k_new / v_new, "batch_idx"), quick, interp
DECODE_CACHE_CONFIGS = [
    (3, 4, 2, 1, 64, 16, "paged", True, True),
    (2, 8, 2, 3, 32, 7, "paged", True, True),
    (2, 4, 1, 2, 64, 16, "append", True, True),
    (3, 4, 2, 1, 32, 0, "batch_idx", True, True),
    (8, 32, 8, 1, 128, 256, "paged", False, False),
    (4, 32, 8, 4, 128, 16, "append", False, False),
]


def _gather(cache: Tensor, table: Tensor, n: int) -> Tensor:
    """(B, Hkv, n, D): positions 0..n-1 of every sequence, each read from its block and slot."""
    bs = cache.shape[1]
    pos = torch.arange(n, device=cache.device)
    blocks = table.to(torch.int64)[:, pos // bs].clamp(0, cache.shape[0] - 1)  # (B, n); past a length: unused
    return cache[blocks, pos % bs].transpose(1, 2)


def _visible(lens: Tensor, t: int, n: int) -> Tensor:
    j = torch.arange(n, device=lens.device)[None, None, None, :]
    tok = torch.arange(t, device=lens.device)[None, None, :, None]
    lens = lens.to(torch.int64)[:, None, None, None]
    return (j < lens) & (j < lens - t + tok + 1)


def _lse(q: Tensor, k: Tensor, lens: Tensor, scale: float) -> Tensor:
    """log-sum-exp of each row's visible scores in q's dtype (+inf where none is visible)."""
    g = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scale
    s = s.to(torch.float32 if s.dtype != F64 else F64)
    s = s.masked_fill(~_visible(lens, q.shape[2], k.shape[2]), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def decode_cache_cases() -> Iterable[Case]:
    for dtype in HALF_AND_FLOAT:
        for b, hq, hkv, t, dh, bs, option, quick, interp in DECODE_CACHE_CONFIGS:

            def make(
                dev: torch.device, b=b, hq=hq, hkv=hkv, t=t, dh=dh, bs=bs, option=option, dtype=dtype, quick=quick
            ) -> dict[str, Any]:
                s_max = 300 if quick else 2100
                lens = torch.randint(t, s_max - t + 1, (b,), dtype=torch.int32)
                d: dict[str, Any] = {"q": torch.randn(b, hq, t, dh, device=dev).to(dtype), "lens": lens.to(dev)}
                if option == "batch_idx":
                    d["k"], d["v"] = (torch.randn(b + 2, hkv, s_max, dh, device=dev).to(dtype) for _ in range(2))
                    d["idx"] = torch.randperm(b + 2)[:b].to(dev)
                    return d
                per_seq = -(-s_max // bs)
                n_blocks = b * per_seq + 3
                d["table"] = torch.randperm(n_blocks)[: b * per_seq].view(b, per_seq).to(torch.int32).to(dev)
                d["k"], d["v"] = (torch.randn(n_blocks, bs, hkv, dh, device=dev).to(dtype) for _ in range(2))
                if option == "append":
                    d["lens"] = (lens - t).to(dev)  # the lengths before the call
                    d["k_new"], d["v_new"] = (torch.randn(b, hkv, t, dh, device=dev).to(dtype) for _ in range(2))
                return d

            def run(d: dict[str, Any], option=option) -> dict[str, Tensor]:
                kw: dict[str, Any] = {"return_lse": True}
                k, v = d["k"], d["v"]
                if option == "batch_idx":
                    kw["cache_batch_idx"] = d["idx"]
                else:
                    kw["block_table"] = d["table"]
                if option == "append":  # writes into copies: the yardstick reads the caches as made
                    k, v = k.clone(), v.clone()
                    kw.update(k_new=d["k_new"], v_new=d["v_new"])
                out, lse = L.decode_attention(d["q"], k, v, d["lens"], **kw)
                return {"out": out, "lse": lse}

            def contiguous(d: dict[str, Any], dtype: torch.dtype, option=option) -> tuple[Tensor, Tensor, Tensor]:
                """(keys, values, lengths) of the call as contiguous (B, Hkv, S, D) caches in ``dtype``."""
                lens = d["lens"].to(torch.int64)
                if option == "batch_idx":
                    return d["k"][d["idx"]].to(dtype), d["v"][d["idx"]].to(dtype), lens
                n = int(lens.max()) if lens.numel() else 0
                k, v = (_gather(d[x].to(dtype), d["table"], n) for x in ("k", "v"))
                if option == "append":
                    k, v = (
                        torch.cat([k, k.new_zeros(k.shape[:2] + (d["k_new"].shape[2], k.shape[3]))], 2),
                        torch.cat([v, v.new_zeros(v.shape[:2] + (d["v_new"].shape[2], v.shape[3]))], 2),
                    )
                    for i in range(k.shape[0]):  # the new tokens right after each sequence's length
                        n_i, t_new = int(lens[i]), d["k_new"].shape[2]
                        k[i, :, n_i : n_i + t_new] = d["k_new"][i].to(dtype)
                        v[i, :, n_i : n_i + t_new] = d["v_new"][i].to(dtype)
                    lens = lens + d["k_new"].shape[2]
                return k, v, lens

            def ref(d: dict[str, Any], contiguous=contiguous) -> dict[str, Tensor]:
                k, v, lens = contiguous(d, F64)
                q = d["q"].to(F64)
                scale = q.shape[-1] ** -0.5
                return {"out": R.decode_attention(q, k, v, lens, scale, True), "lse": _lse(q, k, lens, scale)}

            def base(d: dict[str, Any], contiguous=contiguous) -> dict[str, Tensor]:
                q = d["q"]
                k, v, lens = contiguous(d, q.dtype)
                m = _visible(lens, q.shape[2], k.shape[2])
                out = F.scaled_dot_product_attention(q, k, v, m, enable_gqa=True).nan_to_num(0.0)
                return {"out": out, "lse": _lse(q, k, lens, q.shape[-1] ** -0.5)}

            label = f"B{b} H{hq}/{hkv} T{t} D{dh} {option}" + (f" block{bs}" if option != "batch_idx" else "")
            yield Case("decode_attention", label, dtype, make, run, ref, base, quick=quick, interp=interp)
