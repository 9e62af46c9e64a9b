"""decode_attention's input checks: the query and its caches (contiguous or paged), the
lengths, ``cache_batch_idx``, ``block_table`` and the new tokens' ``k_new`` / ``v_new``.

Shapes, dtypes and devices are checked on every call (the fast path caches them per
signature); tensor *values* (lengths, table entries, batch indices) are read from CPU tensors
only: lengths on a GPU are not read back (no host sync), like every other op's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _validate as V

INDEX_DTYPES = (torch.int32, torch.int64)


def paged(block_table: Tensor | None) -> bool:
    return block_table is not None


def cache_heads(key_cache: Tensor, block_table: Tensor | None) -> int:
    """K/V heads of a cache: dim 1 of ``(B, Hkv, S_max, D)``, dim 2 of ``(N, block, Hkv, D)``."""
    return key_cache.shape[2] if paged(block_table) else key_cache.shape[1]


def capacity(key_cache: Tensor, block_table: Tensor | None) -> int:
    """Positions one sequence can hold: ``S_max``, or ``max_blocks * block_size`` when paged."""
    if paged(block_table):
        assert block_table is not None
        return block_table.shape[1] * key_cache.shape[1]
    return key_cache.shape[2]


def check_decode_args(
    op: str,
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    scale: float,
    block_table: Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices of a decode call (never the tensors' values).

    query ``(B, Hq, T, D)``; caches ``(B_cache, Hkv, S_max, D[v])`` (``B_cache = B`` without
    ``cache_batch_idx``) or, with ``block_table (B, max_blocks)`` int32, paged
    ``(num_blocks, block_size, Hkv, D[v])``; ``cache_seqlens (B,)`` int32 / int64.
    """
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        V.check_tensor(op, name, t)
        V.check_floating(op, name, t)
        V.check_ndim(op, name, t, (4,))
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype != query.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {V.dtype_name(t.dtype)} but query has "
                f"{V.dtype_name(query.dtype)}; they must match"
            )
    V.check_tensor(op, "cache_seqlens", cache_seqlens)
    V.check_dtype(op, "cache_seqlens", cache_seqlens, INDEX_DTYPES)
    V.check_same_device(
        op,
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        cache_seqlens=cache_seqlens,
        block_table=block_table,
        cache_batch_idx=cache_batch_idx,
    )
    b = query.shape[0]
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != b:
        raise ValueError(
            f"{op}: cache_seqlens has shape {list(cache_seqlens.shape)}; it must be [{b}], one length per sequence"
        )
    if key_cache.shape[:3] != value_cache.shape[:3]:
        what = "blocks, block size and heads" if paged(block_table) else "batch, heads and length"
        raise ValueError(
            f"{op}: key_cache has shape {list(key_cache.shape)} but value_cache has "
            f"{list(value_cache.shape)}; their {what} (all dims but the last) must match"
        )
    if paged(block_table):
        _check_paged(op, query, key_cache, block_table, cache_batch_idx)
    else:
        _check_contiguous(op, query, key_cache, cache_batch_idx)
    hq, hkv = query.shape[1], cache_heads(key_cache, block_table)
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv})"
        )
    if query.shape[-1] != key_cache.shape[-1]:
        raise ValueError(f"{op}: head dims disagree: query has {query.shape[-1]}, key_cache has {key_cache.shape[-1]}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")


def _check_contiguous(op: str, query: Tensor, key_cache: Tensor, cache_batch_idx: Tensor | None) -> None:
    b = query.shape[0]
    if cache_batch_idx is None:
        if key_cache.shape[0] != b:
            raise ValueError(
                f"{op}: batch sizes disagree: query {b}, key_cache {key_cache.shape[0]} (pass "
                "cache_batch_idx to read other rows of a larger cache)"
            )
        return
    V.check_tensor(op, "cache_batch_idx", cache_batch_idx)
    V.check_dtype(op, "cache_batch_idx", cache_batch_idx, INDEX_DTYPES)
    if cache_batch_idx.dim() != 1 or cache_batch_idx.shape[0] != b:
        raise ValueError(
            f"{op}: cache_batch_idx has shape {list(cache_batch_idx.shape)}; it must be [{b}], "
            "the cache row of each sequence"
        )


def _check_paged(
    op: str, query: Tensor, key_cache: Tensor, block_table: Tensor | None, cache_batch_idx: Tensor | None
) -> None:
    assert block_table is not None
    V.check_tensor(op, "block_table", block_table)
    V.check_dtype(op, "block_table", block_table, (torch.int32,))
    b = query.shape[0]
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(
            f"{op}: block_table has shape {list(block_table.shape)}; it must be [{b}, max_blocks], "
            "the cache blocks of each sequence in order"
        )
    if cache_batch_idx is not None:
        raise ValueError(
            f"{op}: cache_batch_idx cannot be combined with block_table (the block table already "
            "says where each sequence's cache lies); got both"
        )
    if key_cache.shape[1] < 1:
        raise ValueError(
            f"{op}: a paged key_cache is (num_blocks, block_size, Hkv, D); its block size must be at "
            f"least 1, got shape {list(key_cache.shape)}"
        )


def check_decode_values(
    op: str,
    key_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    cache_batch_idx: Tensor | None,
    writes: int = 0,
) -> None:
    """The values of CPU tensors: lengths in ``[0, capacity]``, the block table's entries that
    hold a position the call reads (or, with ``writes`` new tokens appended, writes) in
    ``[0, num_blocks)``, ``cache_batch_idx`` in ``[0, B_cache)``. Entries of a block table past
    a sequence's need are never read and may hold anything (e.g. -1)."""
    cap = capacity(key_cache, block_table)
    if cache_seqlens.device.type == "cpu" and cache_seqlens.numel():
        lo, hi = min_max(cache_seqlens)
        if lo < 0 or hi + writes > cap:
            what = f"max_blocks * block_size = {cap}" if paged(block_table) else f"the cache length {cap}"
            if writes:
                raise ValueError(
                    f"{op}: cache_seqlens + {writes} new tokens must lie in [0, {cap}] ({what}), got "
                    f"lengths from {lo} to {hi}"
                )
            raise ValueError(f"{op}: cache_seqlens must lie in [0, {cap}] ({what}), got values from {lo} to {hi}")
    if block_table is not None and block_table.device.type == "cpu" and block_table.numel():
        bs, n_blocks = key_cache.shape[1], key_cache.shape[0]
        need = (cache_seqlens.to(torch.int64) + writes + bs - 1) // bs  # blocks each sequence uses
        used = torch.arange(block_table.shape[1])[None, :] < need[:, None]
        bad = used & ((block_table < 0) | (block_table >= n_blocks))
        if bool(bad.any()):
            i, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"{op}: block_table[{i}, {j}] = {int(block_table[i, j])} points outside the cache: "
                f"sequence {i} uses its first {int(need[i])} blocks, each an index in "
                f"[0, {n_blocks}) (num_blocks of key_cache)"
            )
    if cache_batch_idx is not None and cache_batch_idx.device.type == "cpu" and cache_batch_idx.numel():
        lo, hi = min_max(cache_batch_idx)
        if lo < 0 or hi >= key_cache.shape[0]:
            raise ValueError(
                f"{op}: cache_batch_idx must lie in [0, {key_cache.shape[0]}) (the cache's batch "
                f"size), got values from {lo} to {hi}"
            )
        if writes and torch.unique(cache_batch_idx).numel() != cache_batch_idx.numel():
            raise ValueError(
                f"{op}: cache_batch_idx repeats a cache row; appending k_new / v_new would write that row twice"
            )


def check_new_tokens(
    op: str,
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    k_new: Tensor | None,
    v_new: Tensor | None,
    block_table: Tensor | None,
) -> int:
    """``k_new (B, Hkv, T_new, D)`` / ``v_new (B, Hkv, T_new, Dv)``: both or neither, the
    caches' dtype and device. Returns ``T_new`` (0 without them)."""
    if k_new is None and v_new is None:
        return 0
    if k_new is None or v_new is None:
        raise ValueError(f"{op}: k_new and v_new go together; got only {'k_new' if v_new is None else 'v_new'}")
    hkv = cache_heads(key_cache, block_table)
    for name, t, cache in (("k_new", k_new, key_cache), ("v_new", v_new, value_cache)):
        V.check_tensor(op, name, t)
        V.check_ndim(op, name, t, (4,))
        if t.dtype != cache.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {V.dtype_name(t.dtype)} but the cache has "
                f"{V.dtype_name(cache.dtype)}; they must match"
            )
        want = [query.shape[0], hkv, k_new.shape[2], cache.shape[-1]]
        if list(t.shape) != want:
            raise ValueError(
                f"{op}: {name} has shape {list(t.shape)}; it must be {want} (batch, key/value heads, "
                "new tokens, the cache's head dim), k_new and v_new with the same number of tokens"
            )
    V.check_same_device(op, query=query, k_new=k_new, v_new=v_new)
    return k_new.shape[2]


def min_max(t: Tensor) -> tuple[int, int]:
    """(min, max) of an integer tensor as Python ints (one read)."""
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)
