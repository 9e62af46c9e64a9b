"""Launch geometry, index width, SM-count heuristics and alignment promises of the Triton launchers.

Most checks need no GPU: the launchers run on ``meta`` tensors (shapes, strides and an
address, no memory) under ``kernels._launch.recording``, which collects each launch (grid,
every argument, options) instead of running it, planning for an A100 (sm_80, 108 SMs) or an
H100 / H200 (sm_90, 132 SMs) with ``planning_for``. Offsets past 2**31 elements run through
the interpreter on views with huge strides over a large but untouched allocation (only the
pages of the view are ever written). The GPU tests at the end run with LLMKIT_TEST_GPU=1.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl

from llmkit import reference64 as R
from llmkit.kernels import _launch as L
from llmkit.kernels import attention as A
from llmkit.kernels import decode_attention as D
from llmkit.kernels import gelu as G
from llmkit.kernels import glu as GL
from llmkit.kernels import int8_matmul as Q
from llmkit.kernels import layer_norm as N

ON_GPU = os.environ.get("LLMKIT_TEST_GPU", "0") == "1" and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU and LLMKIT_TEST_GPU=1")
needs_interpreter = pytest.mark.skipif(ON_GPU, reason="runs the kernels through the Triton interpreter")
TARGETS = [None, 80, 90]  # None: the interpreter's configurations


def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def record(call, arch: int | None = None) -> list[L.Launch]:
    """The launches ``call()`` makes, planning for ``arch`` (None: the interpreter)."""
    plan = L.planning_for(L.STANDARD_TARGETS[arch]) if arch else contextlib.nullcontext()
    with plan, L.recording() as launches:
        call()
    return launches


# --------------------------------------------------------------------------------------
# grid geometry
# --------------------------------------------------------------------------------------


def test_check_grid_pads_and_rejects_what_cuda_cannot_launch():
    assert L.check_grid(A._attn_fwd_kernel, (7,)) == (7, 1, 1)
    assert L.check_grid(A._attn_fwd_kernel, (2**31 - 1, 65535, 65535)) == (2**31 - 1, 65535, 65535)
    for grid in [(2**31,), (1, 65536), (1, 1, 65536), (0,)]:
        with pytest.raises(ValueError, match=r"_attn_fwd_kernel: grid .* outside CUDA's limits"):
            L.check_grid(A._attn_fwd_kernel, grid)


class _FakeKernel:
    def __init__(self):
        self.ran = []

    @staticmethod
    def fn(x, BLOCK: tl.constexpr):
        pass

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.ran.append((grid, args, kwargs))


def test_launch_checks_the_grid_then_runs_or_records():
    kernel = _FakeKernel()
    with pytest.raises(ValueError, match="outside CUDA's limits"):
        L.launch(kernel, (1, 70_000), 1, BLOCK=4)
    assert kernel.ran == []
    L.launch(kernel, (2,), 1, BLOCK=4, num_warps=2)
    assert kernel.ran == [((2, 1, 1), (1,), {"BLOCK": 4, "num_warps": 2})]
    with L.recording() as launches:
        L.launch(kernel, (3, 2), 5, BLOCK=8, num_warps=4)
    assert len(kernel.ran) == 1
    (rec,) = launches
    assert (rec.grid, rec.args, rec.options, rec.programs) == ((3, 2, 1), {"x": 5, "BLOCK": 8}, {"num_warps": 4}, 6)
    with pytest.raises(TypeError, match=r"no value for \['BLOCK'\]"), L.recording():
        L.launch(kernel, (1,), 5)


@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.parametrize("b,hq,hkv", [(70_000, 2, 1), (1, 70_000, 70_000), (300, 300, 100)])
def test_attention_grid_fits_cuda_for_large_batch_times_heads(arch, b, hq, hkv):
    """B x H on grid axis x: batch or heads beyond 65,535 launch, and the one axis enumerates
    every (block, head, batch) once."""
    sq, sk, d = 33, 40, 64
    q, k, v = meta(b, hq, sq, d), meta(b, hkv, sk, d), meta(b, hkv, sk, d)
    fwd = record(lambda: A.attention_forward(q, k, v, None, 0.0, True, 0.125, 0, 0), arch)
    o = meta(b, hq, sq, d)
    bwd = record(lambda: A.attention_backward(o, q, k, v, None, 0.0, True, 0.125, 0, 0), arch)
    (f,), (st, dq, dkdv) = fwd, bwd
    assert [x.name for x in (f, st, dq, dkdv)] == [
        "_attn_fwd_kernel",
        "_attn_bwd_stats_kernel",
        "_attn_bwd_dq_kernel",
        "_attn_bwd_dkdv_kernel",
    ]
    for rec, rows, heads, block in (
        (f, sq, hq, "BLOCK_M"),
        (st, sq, hq, "BLOCK_M"),
        (dq, sq, hq, "BLOCK_M"),
        (dkdv, sk, hkv, "BLOCK_N"),
    ):
        assert rec.grid == (triton.cdiv(rows, rec.args[block]) * heads * b, 1, 1)


@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.parametrize("b,hkv,group", [(70_000, 1, 1), (2, 40_000, 2), (1, 8, 1)])
def test_decode_grid_fits_cuda_for_large_batch_times_heads(arch, b, hkv, group):
    q, k = meta(b, hkv * group, 1, 64), meta(b, hkv, 256, 64)
    launches = record(lambda: D.decode_attention(q, k, k, meta(b, dtype=torch.int32), 0.125, True), arch)
    split = launches[0]
    assert split.grid == (split.args["num_splits"] * hkv * split.args["row_blocks"] * b, 1, 1)
    if len(launches) > 1:
        assert launches[1].grid == (triton.cdiv(b * hkv * group, D.COMBINE_ROWS), 1, 1)


@triton.jit
def _program_ids_probe(out_ptr, n_blocks, n_heads):
    block, head, batch = A._program_ids(n_blocks, n_heads)
    pid = tl.program_id(0)
    tl.store(out_ptr + 3 * pid, block)
    tl.store(out_ptr + 3 * pid + 1, head)
    tl.store(out_ptr + 3 * pid + 2, batch)


@needs_interpreter
def test_program_ids_enumerate_blocks_fastest_then_heads_then_batch():
    n_blocks, n_heads, batch = 3, 5, 2
    out = torch.full((n_blocks * n_heads * batch, 3), -1, dtype=torch.int32)
    _program_ids_probe[(out.shape[0],)](out, n_blocks, n_heads)
    want = [(m, h, b) for b in range(batch) for h in range(n_heads) for m in range(n_blocks)]
    assert [tuple(r) for r in out.tolist()] == want


# --------------------------------------------------------------------------------------
# offsets past 2**31 elements (interpreter; huge strides over an untouched allocation)
# --------------------------------------------------------------------------------------

BIG = 2**30 + 4096
"""A batch / row stride (elements) below 2**31 whose multiples by 2 pass it: an int32 index
times it overflows where a 64-bit offset is needed."""


@pytest.fixture
def huge():
    """``make(shape, strides, dtype)``: an as_strided view of a fresh allocation just large
    enough for it, filled with random data. The allocation is several GB of address space;
    only the view's pages are written, so memory stays small."""
    made = []

    def make(shape, strides, dtype, offset=0):
        numel = offset + 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        try:
            buf = torch.empty(numel, dtype=dtype)
        except RuntimeError as exc:  # no address space for it on this machine
            pytest.skip(f"cannot reserve {numel * dtype.itemsize / 2**30:.1f} GiB of address space: {exc}")
        made.append(buf)
        view = buf.as_strided(shape, strides, offset)
        if dtype.is_floating_point:
            view.copy_(torch.randn(shape).to(dtype))
        else:
            view.copy_(torch.randint(-127, 128, shape).to(dtype))
        return view

    yield make
    made.clear()


def _same(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(
        got.view(-1).view(torch.uint8) if got.dtype.is_floating_point else got,
        want.view(-1).view(torch.uint8) if want.dtype.is_floating_point else want,
    ), f"{what}: results on the strided view differ from the same kernel on a contiguous copy"


@needs_interpreter
def test_attention_offsets_past_2_31_elements(huge):
    """Batch 2 starts 2 x BIG elements in: q / k / v offsets need 64 bits. Forward and
    backward on the views equal the same kernels on contiguous copies, bit for bit."""
    b, h, s, d = 3, 2, 20, 32
    strides = (BIG, s * d, d, 1)
    q, k, v = (huge((b, h, s, d), strides, torch.bfloat16) for _ in range(3))
    out, lse = A.attention_forward(q, k, v, None, 0.0, True, d**-0.5, 0, 0)
    ref_out, ref_lse = A.attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), None, 0.0, True, d**-0.5, 0, 0
    )
    _same(out, ref_out, "out")
    _same(lse, ref_lse, "lse")
    assert (out.double() - R.attention(q.double(), k.double(), v.double(), is_causal=True)).abs().max() < 0.05
    g = torch.randn(b, h, s, d).to(torch.bfloat16)
    grads = A.attention_backward(g, q, k, v, None, 0.0, True, d**-0.5, 0, 0)
    ref = A.attention_backward(g, q.contiguous(), k.contiguous(), v.contiguous(), None, 0.0, True, d**-0.5, 0, 0)
    for name, x, y in zip(("dq", "dk", "dv"), grads, ref, strict=True):
        _same(x, y, name)


@needs_interpreter
def test_decode_offsets_past_2_31_elements(huge):
    b, hkv, s_max, d = 3, 2, 48, 32
    k = huge((b, hkv, s_max, d), (BIG, s_max * d, d, 1), torch.float16)
    v = huge((b, hkv, s_max, d), (BIG, s_max * d, d, 1), torch.float16)
    q = torch.randn(b, 2 * hkv, 1, d).half()
    lens = torch.tensor([48, 17, 33], dtype=torch.int32)
    got = D.decode_attention(q, k, v, lens, d**-0.5, True)[0]
    _same(got, D.decode_attention(q, k.contiguous(), v.contiguous(), lens, d**-0.5, True)[0], "decode")
    want = R.decode_attention(q.double(), k.double(), v.double(), lens, d**-0.5, True)
    assert (got.double() - want).abs().max() < 0.01


@needs_interpreter
def test_int8_offsets_past_2_31_elements(huge):
    """The W8A8 GEMM with A rows and B columns BIG apart; the W8A16 GEMM (17 rows) and GEMV
    (9 rows) with activation rows 2**27 / 2**28 apart (row 16 / 8 passes 2**31)."""
    a = huge((3, 64), (BIG, 1), torch.int8)
    w = huge((3, 64), (BIG, 1), torch.int8)  # b = w.t(): columns BIG apart
    got = Q.int8_gemm(a, w.t(), None, None, None, None)
    assert torch.equal(got, R.int8_matmul(a, w.t()).to(torch.int32))
    weight = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    scale = torch.rand(40) / 100
    for rows, stride in ((17, 2**27 + 64), (9, 2**28 + 64)):
        x = huge((rows, 64), (stride, 1), torch.bfloat16)
        got = Q.w8a16_linear(x, weight, scale, None, "none")
        _same(got, Q.w8a16_linear(x.contiguous(), weight, scale, None, "none"), f"w8a16 M={rows}")
        want = x.double() @ (weight.double() * scale.double()[:, None]).t()
        assert (got.double() - want).abs().max() <= 0.02 * want.abs().max()


@needs_interpreter
def test_quantize_norm_and_gelu_offsets_past_2_31_elements(huge):
    x = huge((3, 96), (BIG, 1), torch.bfloat16)
    q, s = Q.quantize_rows(x, 1)
    q_ref, s_ref = Q.quantize_rows(x.contiguous(), 1)
    _same(q, q_ref, "quantize q")
    _same(s, s_ref, "quantize scale")
    w, bias = torch.randn(96).bfloat16(), torch.randn(96).bfloat16()
    for got, want in zip(
        N.norm_forward(x, None, 1, w, bias, 1e-5, False),
        N.norm_forward(x.contiguous(), None, 1, w, bias, 1e-5, False),
        strict=True,
    ):
        if got is not None:
            _same(got, want, "layer_norm")
    _same(G.gelu_forward(x, bias, False), G.gelu_forward(x.contiguous(), bias, False), "bias_gelu")
    up = huge((3, 96), (BIG, 1), torch.bfloat16)
    _same(GL.glu_forward(x, up, GL.SILU), GL.glu_forward(x.contiguous(), up.contiguous(), GL.SILU), "swiglu")
    for got, want in zip(
        GL.glu_backward(up, x, up, GL.GELU_TANH),
        GL.glu_backward(up.contiguous(), x.contiguous(), up.contiguous(), GL.GELU_TANH),
        strict=True,
    ):
        _same(got, want, "geglu backward")


# --------------------------------------------------------------------------------------
# SM-count heuristics at 132 (H100 / H200) and 108 (A100) multiprocessors
# --------------------------------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """``install(sms, capability)``: torch.cuda reports one such device."""

    def install(sms: int, capability: tuple[int, int]):
        L._cuda_target.cache_clear()
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda index=None: SimpleNamespace(multi_processor_count=sms)
        )
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    yield install
    L._cuda_target.cache_clear()


@pytest.mark.parametrize("sms,cap", [(132, (9, 0)), (108, (8, 0))])
def test_every_launcher_reads_the_sm_count_of_the_device(fake_gpu, sms, cap):
    fake_gpu(sms, cap)
    for dev in (torch.device("cuda"), torch.device("cuda", 0)):
        assert L.device_target(dev) == L.Target(cap[0] * 10 + cap[1], sms)
        assert N.program_slots(dev) == sms
        assert Q._sm_count(dev) == sms and Q._arch(dev) == cap[0] * 10 + cap[1]
        assert A.device_arch(dev) == cap[0] * 10 + cap[1]
    cpu = torch.device("cpu")
    assert (L.device_target(cpu), N.program_slots(cpu), Q._sm_count(cpu)) == (
        None,
        N.CPU_PROGRAM_SLOTS,
        Q.INTERPRETER_SM_COUNT,
    )
    with L.planning_for(L.Target(90, 7)):
        assert N.program_slots(cpu) == 7 and L.device_target(torch.device("meta")) == L.Target(90, 7)


DECODE_EXPECTED = {
    # (batch, K/V heads, G x T rows, cache length, head dim): (splits at 132 SMs, at 108 SMs)
    (1, 8, 1, 4096, 128): (64, 32),
    (1, 32, 4, 8192, 128): (16, 13),
    (8, 8, 8, 2048, 64): (8, 7),
    (32, 8, 1, 4096, 128): (3, 2),
    (128, 8, 1, 4096, 128): (1, 1),
    (1, 8, 64, 131072, 256): (33, 27),
}


@pytest.mark.parametrize("shape", list(DECODE_EXPECTED))
def test_decode_splits_at_h100_and_a100_sizes(shape):
    """Splits fill each GPU with 2-4 programs per SM where the cache is long enough, never
    leave a split empty, and stop splitting once the batch alone fills the GPU."""
    b, hkv, n_rows, s_max, d = shape
    for (arch, sms), want in zip(((90, 132), (80, 108)), DECODE_EXPECTED[shape], strict=True):
        cfg = D.decode_config(b, hkv, n_rows, s_max, d, d, torch.bfloat16, arch, sms)
        assert cfg.num_splits == want, (shape, arch, cfg)
        programs = b * hkv * triton.cdiv(n_rows, cfg.block_m)
        assert cfg.split_size % cfg.block_n == 0
        assert (cfg.num_splits - 1) * cfg.split_size < s_max <= cfg.num_splits * cfg.split_size
        assert programs * cfg.num_splits < 4 * sms + programs
        if cfg.num_splits < triton.cdiv(s_max, cfg.block_n):
            assert programs * cfg.num_splits >= 2 * sms or cfg.num_splits == 1 and programs >= 4 * sms


def test_decode_launch_plans_with_the_device_sm_count():
    q, k = meta(1, 8, 1, 128), meta(1, 8, 4096, 128)
    for arch, want in ((90, 64), (80, 32)):
        split = record(lambda: D.decode_attention(q, k, k, meta(1, dtype=torch.int32), 0.1, True), arch)[0]
        assert split.args["num_splits"] == want


NORM_EXPECTED = {
    # (rows, n, element bytes): ((fwd rows per program, bwd groups) at 132 SMs, at 108)
    (4096, 128, 2): ((4, 256), (8, 171)),
    (4096, 1024, 2): ((4, 256), (4, 205)),
    (4096, 4096, 2): ((1, 256), (1, 216)),
    (512, 4096, 2): ((1, 256), (1, 171)),
    (4096, 16384, 2): ((1, 128), (1, 108)),
    (64, 768, 4): ((1, 64), (1, 64)),
}


@pytest.mark.parametrize("shape", list(NORM_EXPECTED))
def test_norm_and_gelu_programs_at_h100_and_a100_sizes(shape):
    """Forward: several short rows per program while >= 4 programs per SM remain; backward:
    about 2 row groups per SM (x column tiles for long rows), each owning >= 1 row block."""
    m, n, elem = shape
    for sms, (rows, groups) in zip((132, 108), NORM_EXPECTED[shape], strict=True):
        f = N.forward_config(m, n, elem, sms)
        bw = N.backward_config(m, n, elem, sms)
        assert (f.block_m, bw.groups) == (rows, groups), (shape, sms, f, bw)
        if not f.looped:
            assert triton.cdiv(m, f.block_m) >= min(4 * sms, m) or f.block_m == 1
        col_blocks = triton.cdiv(n, bw.block_n)
        assert bw.groups * col_blocks <= 4 * sms + col_blocks
        assert (bw.groups - 1) * bw.rows_per_group < m <= bw.groups * bw.rows_per_group
        g = G.gelu_config(m, n, sms, bias_grad=True)
        assert g.groups * triton.cdiv(n, g.block_n) <= 4 * sms + triton.cdiv(n, g.block_n)
        assert (g.groups - 1) * g.rows_per_group < m <= g.groups * g.rows_per_group


GEMV_EXPECTED = {
    # (N, K, dtype): (K splits at 132 SMs, at 108)
    (4096, 4096, torch.bfloat16): (16, 8),
    (11008, 4096, torch.bfloat16): (4, 4),
    (4096, 11008, torch.float16): (16, 8),
    (50257, 768, torch.bfloat16): (1, 1),
    (4096, 4096, torch.float32): (16, 8),
    (1024, 256, torch.bfloat16): (1, 1),
}


@pytest.mark.parametrize("shape", list(GEMV_EXPECTED))
def test_w8a16_gemv_split_k_at_h100_and_a100_sizes(shape):
    n, k, dtype = shape
    for sms, want in zip((132, 108), GEMV_EXPECTED[shape], strict=True):
        cfg = Q.w8a16_gemv_config(n, k, dtype, sms)
        tiles = triton.cdiv(n, cfg.BLOCK_N)
        assert cfg.SPLIT_K == want, (shape, sms, cfg)
        assert cfg.SPLIT_K == 1 or tiles * cfg.SPLIT_K // 2 < 4 * sms  # no split past ~4 programs per SM
        assert cfg.SPLIT_K * cfg.BLOCK_K <= max(k, cfg.BLOCK_K)  # every split has K to sum
        x = meta(1, k, dtype=dtype)
        for arch in (80, 90):
            gemv = record(
                partial(Q.w8a16_linear, x, meta(n, k, dtype=torch.int8), meta(n, dtype=torch.float32), None, "none"),
                arch,
            )
            split, per_split = gemv[0].grid[1], gemv[0].args["k_per_split"]
            planned = Q.w8a16_gemv_config(n, k, dtype, L.STANDARD_TARGETS[arch].sms).SPLIT_K
            assert split == gemv[0].args["SPLIT_K"] <= planned
            assert (split - 1) * per_split < k <= split * per_split and per_split % gemv[0].args["BLOCK_K"] == 0


# --------------------------------------------------------------------------------------
# alignment promises (tl.multiple_of / max_contiguous: nothing in the interpreter, a
# misaligned-address fault on a GPU when wrong)
# --------------------------------------------------------------------------------------


def rows_16(t: torch.Tensor, unit_dim: int = -1) -> bool:
    """The 16-byte rule, written independently of the launchers: ``unit_dim`` has stride 1
    (or one element), the base address and every other stride of a dim longer than one,
    times the element size, are multiples of 16 bytes."""
    unit_dim %= t.dim()
    if t.shape[unit_dim] > 1 and t.stride(unit_dim) != 1:
        return False
    return t.data_ptr() % 16 == 0 and all(
        (st * t.element_size()) % 16 == 0
        for d, (n, st) in enumerate(zip(t.shape, t.stride(), strict=True))
        if d != unit_dim and n > 1
    )


def _views(shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Meta views of ``shape`` (B, H, S, D) with odd offsets and strides."""
    b, h, s, d = shape
    base = meta(b * h * s * (d + 8) + 64, dtype=dtype)
    return {
        "contiguous": meta(*shape, dtype=dtype),
        "bshd_transposed": meta(b, s, h, d, dtype=dtype).transpose(1, 2),
        "sliced_last_dim": meta(b, h, s, d + 1, dtype=dtype)[..., 1:],
        "sliced_rows": meta(b, h, s + 1, d, dtype=dtype)[:, :, 1:],
        "odd_offset": base.as_strided(shape, (h * s * d, s * d, d, 1), 3),
        "row_stride_not_16B": base.as_strided(shape, (h * s * (d + 4), s * (d + 4), d + 4, 1), 0),
        "last_dim_strided": meta(b, h, s, 2 * d, dtype=dtype)[..., ::2],
        "size1_batch_odd_stride": base.as_strided((1, h, s, d), (7, s * d, d, 1), 0)
        if b == 1
        else base.as_strided(shape, (h * s * d, s * d, d, 1), 16),
        "expanded_batch": meta(1, h, s, d, dtype=dtype).expand(shape),
    }


PROMISED = {
    "_attn_fwd_kernel": ("q", "k", "v", "out"),
    "_attn_bwd_stats_kernel": ("q", "k", "v", "do"),
    "_attn_bwd_dq_kernel": ("q", "k", "v", "do", "dq"),
    "_attn_bwd_dkdv_kernel": ("q", "k", "v", "do", "dk", "dv"),
    "_decode_split_kernel": ("q", "k", "v", "out"),
}
"""Tensors each kernel addresses through ``_aligned_ptr`` / ``_align_strides`` when STRIDE_ALIGN > 1."""


def _check_stride_align(rec: L.Launch) -> bool:
    """A launch's STRIDE_ALIGN promise holds for the tensors it passes (True if it promised)."""
    align = rec.args["STRIDE_ALIGN"]
    if align == 1:
        return False
    for name in PROMISED[rec.name]:
        t = rec.args[f"{name}_ptr"]
        assert align == 16 // t.element_size(), (rec.name, name, align)
        assert rows_16(t), (
            f"{rec.name}: STRIDE_ALIGN={align} but {name} is {tuple(t.shape)} strides "
            f"{t.stride()} at byte {t.data_ptr()}"
        )
    return True


@pytest.mark.parametrize(
    "dtype,d", [(torch.bfloat16, 64), (torch.float16, 72), (torch.float32, 36), (torch.bfloat16, 20)]
)
def test_attention_alignment_promises_hold_for_odd_views(dtype, d):
    shape = (2, 3, 17, d)
    views = _views(shape, dtype)
    for qn, q in views.items():
        for kvn in ("contiguous", qn, "odd_offset"):
            k = v = views[kvn]
            for arch in (None, 90):
                fwd = record(partial(A.attention_forward, q, k, v, None, 0.0, False, 0.1, 0, 0), arch)
                bwd = record(partial(A.attention_backward, q, q, k, v, None, 0.0, True, 0.1, 0, 0), arch)
                for rec in fwd + bwd:
                    assert _check_stride_align(rec), (qn, kvn, rec.name)  # unaligned inputs are copied


def test_decode_alignment_promises_match_the_16_byte_rule():
    made = 0
    for dtype in (torch.bfloat16, torch.float32):
        for d in (64, 20):
            views = _views((2, 4, 32, d), dtype)
            for kn, k in views.items():
                for qn in ("contiguous", "odd_offset", "bshd_transposed"):
                    q = _views((2, 4, 1, d), dtype)[qn]
                    rec = record(partial(D.decode_attention, q, k, k, meta(2, dtype=torch.int32), 0.1, True), 90)[0]
                    made += _check_stride_align(rec)
                    tensors = [rec.args[f"{n}_ptr"] for n in PROMISED[rec.name]]
                    assert _check_stride_align(rec) == all(rows_16(t) for t in tensors), (dtype, d, kn, qn)
    assert made  # the common layouts keep their fast path


def _int8_operands(m: int, k: int, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(a (M, K), b (K, N)) int8 meta pairs in odd layouts."""
    i8 = torch.int8
    big = meta(4 * (m + 1) * (k + 32) * (n + 32), dtype=i8)
    return {
        "weight_t": (meta(m, k, dtype=i8), meta(n, k, dtype=i8).t()),
        "b_row_major": (meta(m, k, dtype=i8), meta(k, n, dtype=i8)),
        "b_row_major_padded": (meta(m, k, dtype=i8), meta(k, n + 16 - n % 16 + 16, dtype=i8)[:, :n]),
        "a_odd_offset": (big.as_strided((m, k), (k, 1), 5), meta(n, k, dtype=i8).t()),
        "a_row_stride_odd": (big.as_strided((m, k), (k + 3, 1), 0), meta(n, k, dtype=i8).t()),
        "a_transposed": (meta(k, m, dtype=i8).t(), meta(n, k, dtype=i8).t()),
        "b_odd_offset": (meta(m, k, dtype=i8), big.as_strided((k, n), (1, k), 1)),
        "b_col_stride_8": (meta(m, k, dtype=i8), big.as_strided((k, n), (1, k + 8), 0)),
    }


@pytest.mark.parametrize("m,k,n", [(64, 256, 128), (33, 96, 100), (130, 200, 48), (5, 64, 4100)])
def test_int8_gemm_alignment_promise_matches_the_16_byte_rule(m, k, n):
    """ALIGNED 1: rows of A and columns of B contiguous along K, 16-byte aligned; 2: rows of B
    contiguous instead, and N a multiple of 16 (column indices wrap at N inside a 16-byte
    vector otherwise). Anything else must be 0."""
    for name, (a, b) in _int8_operands(m, k, n).items():
        for arch in (None, 80, 90):
            rec = record(partial(Q.int8_gemm, a, b, None, None, None, None), arch)[0]
            pa, pb = rec.args["a_ptr"], rec.args["b_ptr"]
            a_ok = rows_16(pa, 1)
            want = 1 if a_ok and rows_16(pb, 0) else 2 if a_ok and rows_16(pb, 1) and pb.shape[1] % 16 == 0 else 0
            assert rec.args["ALIGNED"] == want, (name, m, k, n, rec.args["ALIGNED"], want)


@pytest.mark.parametrize("m", [1, 9, 40])
def test_w8a16_alignment_promise_matches_the_16_byte_rule(m):
    """ALIGNED (GEMV and GEMM): x (M, K) and the weight (N, K) rows contiguous along K and
    16-byte aligned; the contiguous case of a K that is a multiple of 16 keeps the fast path."""
    for dtype in (torch.bfloat16, torch.float32):
        for k in (64, 60, 37):
            xs = {
                "contiguous": meta(m, k, dtype=dtype),
                "odd_offset": meta(m * k + 1, dtype=dtype)[1:].view(m, k),
                "sliced": meta(m, k + 1, dtype=dtype)[:, 1:],
                "transposed": meta(k, m, dtype=dtype).t(),
            }
            ws = {
                "contiguous": meta(48, k, dtype=torch.int8),
                "sliced": meta(48, k + 8, dtype=torch.int8)[:, 8:],
                "odd_offset": meta(48 * k + 3, dtype=torch.int8)[3:].view(48, k),
            }
            for (xn, x), (wn, w) in ((x, w) for x in xs.items() for w in ws.items()):
                rec = record(partial(Q.w8a16_linear, x, w, meta(48, dtype=torch.float32), None, "none"), 90)[0]
                got, rule = rec.args["ALIGNED"], rows_16(rec.args["x_ptr"], 1) and rows_16(rec.args["w_ptr"], 1)
                assert rule or not got, (xn, wn, k, dtype)  # never promises what the rule does not give
                if m > 1 or xn != "transposed":  # a one-row x with a non-16-byte row stride may be declined
                    assert got == rule, (xn, wn, k, dtype)


# --------------------------------------------------------------------------------------
# on a GPU (LLMKIT_TEST_GPU=1): the launches above for real
# --------------------------------------------------------------------------------------


def _close(got: torch.Tensor, want64: torch.Tensor, baseline: torch.Tensor, what: str):
    from llmkit.testing import assert_close_to_reference

    assert_close_to_reference(got, want64, baseline, what)


@needs_gpu
def test_gpu_attention_and_decode_with_batch_beyond_65535():
    b, s, d = 70_000, 16, 64
    q, k, v = (torch.randn(b, 1, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = A.attention_forward(q, k, v, None, 0.0, True, d**-0.5, 0, 0)
    g = torch.randn_like(out)
    dq, dk, dv = A.attention_backward(g, q, k, v, None, 0.0, True, d**-0.5, 0, 0)
    for i in (0, 65_535, b - 1):
        sl = slice(i, i + 1)
        q64, k64, v64 = (t[sl].double().requires_grad_() for t in (q, k, v))
        ref = R.attention(q64, k64, v64, is_causal=True)
        base = torch.nn.functional.scaled_dot_product_attention(q[sl], k[sl], v[sl], is_causal=True)
        _close(out[sl], ref, base, f"out[{i}]")
        grads = torch.autograd.grad(ref, (q64, k64, v64), g[sl].double())
        for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, strict=True):
            assert (got[sl].double() - want).abs().max() <= 0.05 * want.abs().max() + 1e-2, (name, i)
    cache = torch.randn(b, 1, 64, d, device="cuda", dtype=torch.bfloat16)
    lens = torch.randint(1, 65, (b,), device="cuda", dtype=torch.int32)
    dec = D.decode_attention(q[:, :, :1], cache, cache, lens, d**-0.5, True)
    for i in (0, 65_535, b - 1):
        sl = slice(i, i + 1)
        want = R.decode_attention(
            q[sl, :, :1].double(), cache[sl].double(), cache[sl].double(), lens[sl], d**-0.5, True
        )
        assert (dec[sl].double() - want).abs().max() < 0.02, i


@needs_gpu
def test_gpu_offsets_past_2_31_elements():
    """Tensors of more than 2**31 elements: attention (16 x 66 heads of 16384 tokens, D = 128)
    forward and backward, decode on a 4.3 GB cache, LayerNorm on 4.3 GB, the W8A16 GEMV with
    rows 2**28 apart; the last head / rows against float64."""
    b, h, s, d = 16, 66, 16384, 128
    assert b * h * s * d > 2**31
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = A.attention_forward(q, k, v, None, 0.0, True, d**-0.5, 0, 0)
    g = torch.randn_like(out)
    dq, dk, dv = A.attention_backward(g, q, k, v, None, 0.0, True, d**-0.5, 0, 0)
    last = (slice(b - 1, b), slice(h - 1, h))
    q64, k64, v64 = (t[last].double().requires_grad_() for t in (q, k, v))
    ref = R.attention(q64, k64, v64, is_causal=True)
    base = torch.nn.functional.scaled_dot_product_attention(q[last], k[last], v[last], is_causal=True)
    _close(out[last], ref, base, "out of the last head")
    grads = torch.autograd.grad(ref, (q64, k64, v64), g[last].double())
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, strict=True):
        assert (got[last].double() - want).abs().max() <= 0.05 * want.abs().max() + 1e-2, name
    del q, k, v, out, lse, g, dq, dk, dv
    torch.cuda.empty_cache()

    cache = torch.randn(16, 8, 2**17 + 16, 128, device="cuda", dtype=torch.bfloat16)
    assert cache.numel() > 2**31
    query = torch.randn(16, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((16,), 2**17 + 16, device="cuda", dtype=torch.int32)
    dec = D.decode_attention(query, cache, cache, lens, 128**-0.5, True)
    want = R.decode_attention(query[-1:].double(), cache[-1:].double(), cache[-1:].double(), lens[-1:], 128**-0.5, True)
    assert (dec[-1:].double() - want).abs().max() < 0.02
    del cache, dec
    torch.cuda.empty_cache()

    x = torch.randn(2**17 + 3, 16384, device="cuda", dtype=torch.bfloat16)
    w, bias = torch.randn(16384, device="cuda", dtype=torch.bfloat16), torch.randn(16384, device="cuda").bfloat16()
    y = N.norm_forward(x, None, 1, w, bias, 1e-5, False)[0]
    want = R.layer_norm(x[-5:].double(), [16384], w.double(), bias.double(), 1e-5)
    base = torch.nn.functional.layer_norm(x[-5:], [16384], w, bias, 1e-5)
    _close(y[-5:], want, base, "layer_norm of the last rows")
    del x, y
    torch.cuda.empty_cache()

    rows = torch.empty(8 * 2**28 + 4096, device="cuda", dtype=torch.bfloat16).as_strided((9, 4096), (2**28, 1))
    rows.copy_(torch.randn(9, 4096, device="cuda"))
    weight = torch.randint(-127, 128, (4096, 4096), device="cuda", dtype=torch.int8)
    scale = torch.rand(4096, device="cuda") / 100
    got = Q.w8a16_linear(rows, weight, scale, None, "none")
    want = rows.double() @ (weight.double() * scale.double()[:, None]).t()
    assert (got.double() - want).abs().max() <= 0.02 * want.abs().max()
