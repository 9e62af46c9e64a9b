"""Launch configurations of the attention kernels: fixed tables per architecture, padded head
dim and whether a mask or dropout is fused; no autotuning search. Every table entry compiles
without register spills for sm_80 and sm_90 (``python -m llmkit.compile_report``)."""

from __future__ import annotations

import dataclasses

import torch

from ._attention_common import padded_head_dim
from ._launch import device_target

# --------------------------------------------------------------------------------------
# launch configurations (fixed tables, no search)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel.

    ``block_m`` counts query rows and ``block_n`` keys: for the forward and dQ kernels
    a program owns ``block_m`` rows and steps through keys by ``block_n``; for the
    dK/dV kernel a program owns ``block_n`` keys and steps through rows by ``block_m``.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Configurations of the two backward kernels."""

    dq: TileConfig
    dkdv: TileConfig


T = TileConfig


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Tiles of one (architecture, padded head dim): plain, and for masked / dropout calls
    (their extra index and mask tiles need registers)."""

    fwd: TileConfig
    fwd_heavy: TileConfig
    bwd: BackwardConfig
    bwd_heavy: BackwardConfig


# 16-bit inputs (rows are always 16-byte aligned, see _aligned_rows), by architecture
# (80: A100 class, 90: H100 class) and padded head dim. Chosen so that every kernel compiles with
# no register spills on Triton 3.6 and 3.9, for lengths divisible by 16 and not, with and
# without GQA (python -m llmkit.compile_report) while keeping tiles large: 128-row query
# tiles on 8 warps (two wgmma warpgroups on sm_90) where they fit. These are starting
# points until measured on the GPUs (bench/).
_TABLE_16BIT: dict[int, dict[int, _Entry]] = {
    90: {
        64: _Entry(T(128, 128, 8, 3), T(128, 64, 8, 3),
                   BackwardConfig(T(128, 64, 8, 3), T(32, 128, 8, 3)),
                   BackwardConfig(T(128, 32, 8, 3), T(32, 128, 8, 3))),
        128: _Entry(T(128, 128, 8, 2), T(64, 32, 8, 3),
                    BackwardConfig(T(128, 64, 8, 2), T(32, 128, 8, 2)),
                    BackwardConfig(T(128, 32, 8, 3), T(16, 64, 8, 3))),
        256: _Entry(T(64, 32, 8, 2), T(64, 16, 8, 2),
                    BackwardConfig(T(64, 16, 8, 2), T(32, 32, 8, 2)),
                    BackwardConfig(T(32, 16, 8, 2), T(16, 32, 8, 2))),
    },
    80: {
        64: _Entry(T(128, 64, 8, 3), T(64, 64, 8, 3),
                   BackwardConfig(T(128, 64, 8, 2), T(16, 128, 8, 2)),
                   BackwardConfig(T(64, 32, 8, 3), T(16, 64, 4, 3))),
        128: _Entry(T(128, 32, 8, 3), T(64, 32, 8, 3),
                    BackwardConfig(T(64, 64, 8, 2), T(32, 64, 8, 2)),
                    BackwardConfig(T(64, 32, 8, 3), T(16, 64, 8, 2))),
        256: _Entry(T(64, 32, 8, 2), T(32, 16, 8, 2),
                    BackwardConfig(T(64, 32, 8, 2), T(32, 32, 8, 2)),
                    BackwardConfig(T(32, 32, 8, 2), T(16, 32, 8, 2))),
    },
}
# float32 inputs (head dims up to 128): exact fp32 products (input_precision="ieee", FMA,
# no tensor cores), small single-stage tiles; the software pipeline's buffers for fp32
# operand tiles do not fit in registers.
_TABLE_FP32: dict[int, _Entry] = {
    64: _Entry(T(16, 32, 4, 1), T(16, 16, 4, 1),
               BackwardConfig(T(32, 16, 4, 1), T(16, 32, 4, 1)),
               BackwardConfig(T(32, 16, 4, 1), T(16, 16, 2, 1))),
    128: _Entry(T(16, 16, 8, 1), T(16, 16, 8, 1),
                BackwardConfig(T(16, 16, 8, 1), T(16, 16, 4, 1)),
                BackwardConfig(T(16, 16, 4, 1), T(16, 16, 2, 1))),
}
FP32_MAX_HEAD_DIM = 128
# The Triton interpreter (CPU tensors): small tiles so that tests cover many blocks.
INTERPRETER_FWD = TileConfig(16, 16, 4, 1)
INTERPRETER_BWD = BackwardConfig(TileConfig(16, 16, 4, 1), TileConfig(16, 16, 4, 1))


def device_arch(device: torch.device) -> int | None:
    """Compute capability as an int (80, 86, 90, ...) that launches on ``device`` plan for;
    None for the interpreter (see :func:`~llmkit.kernels._launch.device_target`)."""
    target = device_target(device)
    return target.arch if target is not None else None


def _smem_limit(arch: int) -> int:
    """Shared memory per block (bytes) an architecture allows with opt-in."""
    return {80: 163 * 1024, 87: 163 * 1024, 90: 227 * 1024}.get(arch, 99 * 1024)


def _fit_smem(cfg: TileConfig, resident_rows: int, streamed_rows: int, row_bytes: int, limit: int) -> TileConfig:
    """Drop pipeline stages until a rough shared-memory estimate fits (architectures with
    less shared memory than the table's, e.g. sm_86 / sm_89 / sm_120)."""
    stages = cfg.num_stages
    while stages > 1 and (resident_rows + stages * streamed_rows) * row_bytes > limit:
        stages -= 1
    return dataclasses.replace(cfg, num_stages=stages)


def _entry(head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: int) -> _Entry:
    bd = max(padded_head_dim(head_dim), padded_head_dim(head_dim_v), 64)
    if dtype == torch.float32:
        if bd > FP32_MAX_HEAD_DIM:
            raise ValueError(f"float32 attention kernels take head dims up to {FP32_MAX_HEAD_DIM}, got {bd}")
        return _TABLE_FP32[bd]
    return _TABLE_16BIT[90 if arch >= 90 else 80][bd]


def forward_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: int | None, *,
                   masked: bool = False, dropout: bool = False) -> TileConfig:
    """Forward tiles for a head dim, dtype, architecture (None: the interpreter) and whether
    the call has a mask or dropout. A table lookup."""
    if arch is None:
        return INTERPRETER_FWD
    e = _entry(head_dim, head_dim_v, dtype, arch)
    cfg = e.fwd_heavy if masked or dropout else e.fwd
    if arch not in (80, 87, 90):
        row_bytes = 2 * padded_head_dim(max(head_dim, head_dim_v)) * dtype.itemsize
        cfg = _fit_smem(cfg, cfg.block_m // 2, cfg.block_n, row_bytes, _smem_limit(arch))
    return cfg


def backward_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: int | None, *,
                    masked: bool = False, dropout: bool = False) -> BackwardConfig:
    """Backward tiles (dQ kernel, dK/dV kernel); see :func:`forward_config`."""
    if arch is None:
        return INTERPRETER_BWD
    e = _entry(head_dim, head_dim_v, dtype, arch)
    cfg = e.bwd_heavy if masked or dropout else e.bwd
    if arch not in (80, 87, 90):
        row_bytes = 2 * padded_head_dim(max(head_dim, head_dim_v)) * dtype.itemsize
        limit = _smem_limit(arch)
        cfg = BackwardConfig(_fit_smem(cfg.dq, cfg.dq.block_m, cfg.dq.block_n, row_bytes, limit),
                             _fit_smem(cfg.dkdv, cfg.dkdv.block_n, cfg.dkdv.block_m, row_bytes, limit))
    return cfg


def stats_config(dq: TileConfig, head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: int | None) -> TileConfig:
    """Tiles of the backward's row-statistics kernel: the dQ kernel's (it walks the same key
    blocks with the same query tile, minus the dQ accumulator). One more pipeline stage
    spilled a few bytes at ptxas's occupancy register caps (float32 D=128 masked on sm_90,
    bfloat16 D=128 with dropout on sm_80, D=256 softcap on sm_90 with Triton 3.6)."""
    return dq
