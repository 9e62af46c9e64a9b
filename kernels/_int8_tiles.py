"""Launch configurations (tiles, warps, pipeline stages, K split) of the int8 GEMM / GEMV
kernels in ``int8_matmul.py``, by row count, dtype, alignment and GPU architecture."""

from __future__ import annotations

import dataclasses

import torch
import triton


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch options of the GEMM kernels."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tile shape, K split and launch options of the skinny-M W8A16 kernel."""

    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 4


def _stages(arch: int, big_smem: int, small_smem: int) -> int:
    """Pipeline depth: sm_80 / sm_90 have 164 / 228 KB of shared memory, sm_86 / sm_89 100 KB."""
    return big_smem if arch in (80, 87, 90) else small_smem


def int8_gemm_config(m: int, arch: int, aligned: bool = True, activation: str = "none") -> GemmConfig:
    """Default W8A8 tile for ``m`` rows on compute capability ``arch`` (80, 86, 89, 90...).

    ``aligned=False`` (operands not 16-byte aligned along K): smaller tiles, since every
    element then needs its own address and load. On sm_90 the 128 x 256 tile holds 128
    accumulators per thread, too many to leave room for the erf of an exact-GELU
    epilogue, which therefore takes 128 x 128.
    """
    if not aligned:
        return GemmConfig(64, 64, 64, 8, num_warps=8, num_stages=2)
    if m <= 64:
        return GemmConfig(64, 128, 128, 8, num_warps=4, num_stages=_stages(arch, 4, 3))
    if arch >= 90 and activation != "gelu":
        return GemmConfig(128, 256, 128, 8, num_warps=8, num_stages=3)
    if arch >= 90:
        return GemmConfig(128, 128, 128, 8, num_warps=8, num_stages=4)
    return GemmConfig(128, 128, 128, 8, num_warps=8, num_stages=_stages(arch, 3, 2))


def w8a16_gemm_config(m: int, x_dtype: torch.dtype, arch: int, aligned: bool = True) -> GemmConfig:
    """Default W8A16 GEMM tile (m > SKINNY_M) for activations of ``x_dtype``."""
    if not aligned:
        return GemmConfig(64, 64, 32, 8, num_warps=4, num_stages=2)
    if x_dtype == torch.float32:
        return GemmConfig(128, 128, 32, 8, num_warps=8, num_stages=_stages(arch, 3, 2))
    if m <= 64:  # sm_80: 4 warps spill with a GELU epilogue (168 registers)
        return GemmConfig(64, 128, 64, 8, num_warps=4 if arch >= 90 else 8, num_stages=_stages(arch, 4, 3))
    if arch >= 90:
        return GemmConfig(128, 256, 64, 8, num_warps=8, num_stages=3)
    return GemmConfig(128, 128, 64, 8, num_warps=8, num_stages=_stages(arch, 3, 2))


def w8a16_gemv_config(n: int, k: int, x_dtype: torch.dtype, sm_count: int, aligned: bool = True) -> GemvConfig:
    """Default skinny-M tile; K is split until about 4 programs per SM are in flight.

    8 warps: on 4, ptxas spills a loop-carried offset on sm_80 for some specializations of M
    (Triton 3.6 and 3.9). float32 activations (three TF32 parts per tile) take 64-wide K steps
    (128 spills on sm_80).
    """
    block_n = 64
    fp32 = x_dtype == torch.float32
    block_k = 64 if fp32 or not aligned else 256
    tiles_n = triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(max(k, 1), block_k)
    split = 1
    while tiles_n * split < 4 * sm_count and split * 2 <= k_blocks and split < 16:
        split *= 2
    return GemvConfig(block_n, block_k, split, num_warps=8, num_stages=4 if aligned else 2)
