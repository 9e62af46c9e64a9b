"""What the attention kernels share: device helpers (tile loads and stores, masks, the online
softmax, dropout, key ranges) and host helpers (aligned buffers, the mask as the kernels read it).

Conventions and layouts: see ``kernels/attention.py``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import _common  # noqa: F401  (Triton interpreter fixes, applied on import)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# A finite additive mask value below this is clamped before the change to base 2, so
# that x * log2(e) cannot overflow to -inf (finfo(float32).min is a common "masked"
# value and must stay a finite, visible score as in the reference).
MASK_FLOOR: tl.constexpr = tl.constexpr(-2.3e38)

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
MAX_HEAD_DIM = 256


def padded_head_dim(d: int) -> int:
    """The power-of-two tile width a head dim is padded to (at least 16, the MMA depth)."""
    return max(16, triton.next_power_of_2(d))


# --------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a [rows, cols] tile; rows >= n_rows and cols >= N_COLS read as zero."""
    if CHECK_ROWS:
        if N_COLS == BLOCK_COLS:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
    else:
        if N_COLS == BLOCK_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Store a [rows, cols] tile, skipping rows >= n_rows and cols >= N_COLS."""
    if N_COLS == BLOCK_COLS:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS))


@triton.jit
def _program_ids(n_blocks, n_heads):
    """(block, head, batch) of this program on a one-axis grid of ``n_blocks * n_heads * B``.

    Everything goes on grid axis x (up to 2**31 - 1 programs; y and z stop at 65535, which
    B x H passes). Blocks vary fastest, then heads, then the batch: the order in which a
    ``(blocks, heads, B)`` grid runs, so programs that share K / V run together.
    """
    pid = tl.program_id(0)
    block = pid % n_blocks
    bh = pid // n_blocks
    return block, bh % n_heads, bh // n_heads


@triton.jit
def _align_strides(stride_b, stride_h, stride_row, STRIDE_ALIGN: tl.constexpr):
    """With STRIDE_ALIGN > 1 the launcher checked that the strides are multiples of it;
    rounding them so (a no-op on such values) lets the compiler prove 16-byte aligned rows."""
    if STRIDE_ALIGN > 1:
        stride_b = (stride_b // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_h = (stride_h // STRIDE_ALIGN) * STRIDE_ALIGN
        stride_row = (stride_row // STRIDE_ALIGN) * STRIDE_ALIGN
    return stride_b, stride_h, stride_row


@triton.jit
def _aligned_ptr(base, offset, STRIDE_ALIGN: tl.constexpr):
    """``base + offset``, declared 16-byte aligned when the launcher checked that it is.

    (The hint must sit on the addition: one on a function argument is dropped.)
    """
    ptr = base + offset
    if STRIDE_ALIGN > 1:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    ``DOT_PRECISION``: "tf32" for 16-bit inputs (tensor cores; the option only affects
    float32 inputs), "ieee" for exact float32 products, and "upcast" under the Triton
    interpreter for bfloat16, whose ``tl.dot`` multiplies bfloat16 bit patterns as
    integers (triton-lang/triton#11584): the operands are widened to float32 first,
    which gives the same exact products the tensor cores form.
    """
    if DOT_PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _cast(x, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """float32 ``x`` to ``dtype``, rounded to nearest even (as ``.to`` does on the GPU).

    The Triton interpreter truncates float32 -> bfloat16 casts; in its bfloat16 mode
    ("upcast", see :func:`_mma`) the float32 bits are rounded first so the cast is exact.
    """
    if DOT_PRECISION == "upcast":
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tanh(x):
    """tanh in float32 without cancellation near 0: an odd Taylor polynomial for |x| < 1/8
    (next term below 1e-11 relative), ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` above."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    r = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def _scores(qk, qk_scale, cap2, SOFTCAP: tl.constexpr):
    """Base-2 scores of the raw products ``qk`` and, with ``SOFTCAP``, ``t = tanh(.)`` (the
    backward's ``1 - t^2``): ``qk * scale * log2(e)``, or ``c * tanh(qk * scale / c) * log2(e)``
    for softcap ``c`` (the launcher passes ``qk_scale = scale / c``, ``cap2 = c * log2(e)``)."""
    if SOFTCAP:
        t = _tanh(qk * qk_scale)
        s = t * cap2
    else:
        s = qk * qk_scale
        t = s
    return s, t


@triton.jit
def _mask_scores(s, q_idx, k_idx, q_len, k_len, mask_base, stride_mm, stride_mn, diag_off, upper, lower, slope2,
                 CHECK_KEYS: tl.constexpr, BAND: tl.constexpr, UPPER: tl.constexpr, LOWER: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr):
    """Add ALiBi's bias and the attention mask to base-2 scores, then hide what the key bound
    and the band hide.

    ``q_idx`` / ``k_idx`` are 2-D broadcastable index tiles ([M, 1] and [1, N] for a
    [query, key] tile, or the transpose for a [key, query] tile). Query ``i``'s diagonal is
    key ``i + diag_off`` (0 top-left, ``Sk - Sq`` bottom-right); with ``BAND`` the keys
    past ``diagonal + upper`` (``UPPER``: causal or a right window) and before ``diagonal -
    lower`` (``LOWER``: a left window) are hidden. ALiBi subtracts ``slope2 * |diagonal -
    j|`` (``slope2``: the head's slope times log2(e)). Hidden entries become -inf; an
    additive mask is added in base 2.
    """
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(q_idx + diag_off - k_idx).to(tl.float32)
    if MASK_KIND != 0:
        if MASK_ROW_BCAST:
            m_ptrs = mask_base + k_idx.to(tl.int64) * stride_mn
            m_ok = k_idx < k_len
        else:
            m_ptrs = mask_base + q_idx.to(tl.int64) * stride_mm + k_idx.to(tl.int64) * stride_mn
            m_ok = (q_idx < q_len) & (k_idx < k_len)
        if MASK_KIND == 1:
            visible = tl.load(m_ptrs, mask=m_ok, other=0)
            s = tl.where(visible != 0, s, float("-inf"))
        else:
            add = tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32)
            add2 = tl.maximum(add, MASK_FLOOR) * LOG2E
            # hidden stays hidden whatever the score (NaN or inf + -inf would be NaN)
            s = tl.where(add == float("-inf"), float("-inf"), s + add2)
    if CHECK_KEYS:
        s = tl.where(k_idx < k_len, s, float("-inf"))
    if BAND:
        if UPPER:
            s = tl.where(k_idx <= q_idx + (diag_off + upper), s, float("-inf"))
        if LOWER:
            s = tl.where(k_idx >= q_idx + (diag_off - lower), s, float("-inf"))
    return s


@triton.jit
def _seen_keys(seen_base, offs_n, kv_lo, kv_hi, HAS_SEEN: tl.constexpr, LOWER: tl.constexpr):
    """Which keys of a block some query row may see: in [``kv_lo``, ``kv_hi``) (see
    :func:`_keys_bound`; ``kv_lo`` is 0 without ``LOWER``) and, with ``HAS_SEEN``, marked in
    the launcher's :func:`keys_seen` vector (int32 per key)."""
    if LOWER:
        ok = (offs_n >= kv_lo) & (offs_n < kv_hi)
    else:
        ok = offs_n < kv_hi
    if HAS_SEEN:
        ok = tl.load(seen_base + offs_n, mask=ok, other=0) != 0
    return ok


@triton.jit
def _load_keys(ptrs, ok, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A key / value tile [keys, cols] whose keys that no query row sees (``ok`` false) read
    as zero: a hidden key never reaches a product (``0 * NaN`` is NaN), whatever its memory
    holds. Without ``CHECK_ROWS`` every key of the block is known to be seen."""
    if CHECK_ROWS:
        if N_COLS == BLOCK_COLS:
            x = tl.load(ptrs, mask=ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=ok[:, None] & (cols[None, :] < N_COLS), other=0.0)
    else:
        if N_COLS == BLOCK_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return x


@triton.jit
def _keys_bound(k_len, q_len, diag_off, upper, lower, UPPER: tl.constexpr, LOWER: tl.constexpr):
    """``[kv_lo, kv_hi)``: the keys some query row may see under the band (the last row's
    upper bound, the first row's lower bound; see :func:`_mask_scores`)."""
    if UPPER:
        kv_hi = tl.minimum(k_len, tl.maximum(q_len + diag_off + upper, 0))
    else:
        kv_hi = k_len
    if LOWER:
        kv_lo = tl.minimum(tl.maximum(diag_off - lower, 0), k_len)
    else:
        kv_lo = 0
    return kv_lo, kv_hi


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One key block of the online softmax over base-2 scores ``s`` [rows, keys].

    Returns the unnormalised probabilities, the factor that rescales what was summed so
    far, and the new row maximum and sum. A row with nothing visible yet keeps
    m = -inf; 0 is subtracted instead, so exp2 gives 0 rather than NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _dropout_keep(seed, rng_base, q_idx, k_idx, k_len, dropout_p):
    """Philox keep mask of the tile: counter rng_base + i * Sk + j, kept when u > p."""
    counters = rng_base + q_idx.to(tl.int64) * k_len + k_idx
    return tl.rand(seed, counters) > dropout_p


@triton.jit
def _key_range(m0, k_len, diag_off, upper, lower, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               UPPER: tl.constexpr, LOWER: tl.constexpr):
    """Keys a query block [m0, m0 + BLOCK_M) needs: [lo, full_lo) masked, [full_lo, full_hi)
    mask-free (every row sees every key), [full_hi, hi) masked. Key blocks outside the band
    are skipped. Quantities are clamped at 0 before a division (no negative floors)."""
    full_k = (k_len // BLOCK_N) * BLOCK_N
    if UPPER:
        hi = tl.minimum(k_len, tl.maximum(m0 + BLOCK_M + diag_off + upper, 0))
        full_hi = tl.minimum((tl.maximum(m0 + 1 + diag_off + upper, 0) // BLOCK_N) * BLOCK_N, full_k)
    else:
        hi = k_len
        full_hi = full_k
    if LOWER:
        lo = (tl.minimum(tl.maximum(m0 + diag_off - lower, 0), hi) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + diag_off - lower, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.maximum(full_hi, full_lo)
    else:
        lo = 0
        full_lo = 0
    return lo, full_lo, full_hi, hi


@triton.jit
def _part_bounds(part: tl.constexpr, lo, full_lo, full_hi, hi):
    """Key range of part 0 (masked left edge), 1 (mask-free middle) or 2 (masked right edge)
    of :func:`_key_range`'s split."""
    if part == 0:
        start, stop = lo, full_lo
    elif part == 1:
        start, stop = full_lo, full_hi
    else:
        start, stop = full_hi, hi
    return start, stop


@triton.jit
def _query_range(n0, q_len, diag_off, upper, lower, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 UPPER: tl.constexpr, LOWER: tl.constexpr):
    """Query rows [lo, hi) that may see a key block [n0, n0 + BLOCK_N), ``lo`` a multiple of
    BLOCK_M: row i sees key j only if ``j - diag_off - upper <= i <= j - diag_off + lower``."""
    if UPPER:
        lo = (tl.minimum(tl.maximum(n0 - diag_off - upper, 0), q_len) // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    if LOWER:
        hi = tl.minimum(q_len, tl.maximum(n0 + BLOCK_N - diag_off + lower, 0))
    else:
        hi = q_len
    return lo, hi


@triton.jit
def _alibi_slope(slope_ptr, b64, h64, stride_slb, stride_slh, HAS_ALIBI: tl.constexpr):
    """ALiBi's slope of (batch, head) times log2(e) (0.0 without ALiBi)."""
    if HAS_ALIBI:
        slope2 = tl.load(slope_ptr + b64 * stride_slb + h64 * stride_slh).to(tl.float32) * LOG2E
    else:
        slope2 = 0.0
    return slope2


@triton.jit
def _varlen_seq(cu_q_ptr, cu_k_ptr, b, q_len, k_len, diag_off, VARLEN: tl.constexpr):
    """``(q_start, k_start, seq_q, seq_k, diag_off)`` of batch entry ``b``.

    With ``VARLEN`` the tensors are packed ``(total, H, D)`` and ``b`` is a sequence: its rows
    start at ``cu_seqlens[b]`` and its length is ``cu_seqlens[b + 1] - cu_seqlens[b]``; the
    launcher passes ``diag_off`` 1 for bottom-right alignment (0 top-left), which becomes the
    sequence's own ``seq_k - seq_q``. Without it: no offsets, the launch's lengths and diag_off.
    """
    if VARLEN:
        q_start = tl.load(cu_q_ptr + b)
        seq_q = tl.load(cu_q_ptr + b + 1) - q_start
        k_start = tl.load(cu_k_ptr + b)
        seq_k = tl.load(cu_k_ptr + b + 1) - k_start
        diag_off = diag_off * (seq_k - seq_q)
    else:
        q_start = 0
        k_start = 0
        seq_q = q_len
        seq_k = k_len
    return q_start, k_start, seq_q, seq_k, diag_off


@triton.jit
def _seq_rows(offset, start, stride, VARLEN: tl.constexpr):
    """``offset`` plus ``start`` rows of ``stride`` (a packed sequence's first row) with
    ``VARLEN``; ``offset`` itself without (no work added)."""
    if VARLEN:
        offset = offset + start.to(tl.int64) * stride
    return offset


@triton.jit
def _rng_base(rng_offset, b64, h64, num_heads, q_len, k_len, seq_q, seq_k, VARLEN: tl.constexpr):
    """The Philox counter of element (0, 0) of (b, h): ``offset + ((b*H + h)*Sq)*Sk``; with
    ``VARLEN`` ``offset + b*H*max_q*max_k + h*seq_q*seq_k``, so that sequence ``b`` draws what
    an attention call on it alone draws with offset ``offset + b*H*max_q*max_k``."""
    if VARLEN:
        base = rng_offset + b64 * num_heads * q_len * k_len + h64 * seq_q * seq_k
    else:
        base = rng_offset + (b64 * num_heads + h64) * q_len * k_len
    return base


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """The ``DOT_PRECISION`` of :func:`_mma` for inputs of ``dtype`` on ``device``."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and device.type == "cpu":  # the interpreter
        return "upcast"
    return "tf32"


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers hand to a kernel (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def rows_aligned(t: torch.Tensor) -> bool:
    """Every row starts 16-byte aligned: aligned data pointer, unit last stride, and the
    other strides (of dims longer than 1) multiples of 16 bytes."""
    elems = 16 // t.element_size()
    return (
        t.data_ptr() % 16 == 0
        and (t.stride(-1) == 1 or t.shape[-1] <= 1)
        and all(size <= 1 or st % elems == 0 for size, st in zip(t.shape[:-1], t.stride()[:-1], strict=True))
    )


def stride_align(*tensors: torch.Tensor) -> int:
    """``STRIDE_ALIGN`` for the kernels: elements per 16 bytes when every row of every tensor
    is 16-byte aligned (:func:`rows_aligned`), else 1. With it the kernels load rows as
    16-byte vectors and pipeline them with cp.async."""
    if all(rows_aligned(t) for t in tensors):
        return 16 // tensors[0].element_size()
    return 1


def _padded_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new tensor of ``shape`` whose rows start 16-byte aligned: the first ``shape[-1]``
    columns of one whose last dim is rounded up to 16 bytes (itself when no padding)."""
    elems = 16 // dtype.itemsize
    width = -(-shape[-1] // elems) * elems
    return _empty((*shape[:-1], width), dtype, device)[..., : shape[-1]]


def _empty_in_order(shape: tuple[int, ...], order: list[int], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """A new tensor of ``shape`` whose memory holds its dims in ``order`` (outermost first)."""
    buf = _empty(tuple(shape[d] for d in order), dtype, device)
    return buf.permute([order.index(d) for d in range(len(order))])


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are 16-byte aligned, else a copy whose rows are.

    The attention kernels keep whole K/V (or Q/dO) tiles in flight, and with unaligned
    rows every element needs its own 64-bit address, which does not fit in registers at
    useful tile sizes; an O(S * D) copy in that rare case (odd head dims, odd offsets,
    a non-unit last stride) is cheap next to the O(S^2 * D) attention.
    """
    return t if rows_aligned(t) else _padded_empty(tuple(t.shape), t.dtype, t.device).copy_(t)


@dataclasses.dataclass
class MaskArgs:
    """The attention mask as the kernels read it: a pointer, a kind and 4 strides.

    The mask is broadcast (without a copy) to (B, Hq, Sq, Sk); broadcast dims get
    stride 0. ``row_bcast``: every query row reads the same mask row (e.g. a
    (B, 1, 1, Sk) key-padding mask), loaded as one vector per key block.
    """

    tensor: torch.Tensor
    kind: int
    row_bcast: bool
    strides: tuple[int, int, int, int]

    seen: torch.Tensor
    """uint8 (B | 1, Hq | 1, Sk): 1 where some query row of (b, h) may see the key (mask and
    causal); the kernels read the others as zero (:func:`keys_seen`)."""

    @staticmethod
    def of(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int], dummy: torch.Tensor,
           band: ScoreArgs | None = None) -> MaskArgs:
        if attn_mask is None:
            return MaskArgs(dummy, MASK_NONE, False, (0, 0, 0, 0), dummy)
        m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        m = m4.expand(shape)
        kind = MASK_FLOAT
        if m.dtype == torch.bool:
            m = m.view(torch.uint8)
            kind = MASK_BOOL
        strides = tuple(int(s) for s in m.stride())
        return MaskArgs(m, kind, strides[2] == 0 or shape[2] == 1, strides,  # type: ignore[arg-type]
                        keys_seen(m4, band.visible(shape[2], shape[3], m4.device) if band else None))

    def seen_strides(self) -> tuple[int, int]:
        """(batch, head) strides of ``seen``, 0 where it broadcasts."""
        if self.kind == MASK_NONE:
            return 0, 0
        sizes, strides = self.seen.shape[:2], self.seen.stride()[:2]
        return (0 if sizes[0] == 1 else int(strides[0]), 0 if sizes[1] == 1 else int(strides[1]))

    def seen_per_kv_head(self, groups: int) -> MaskArgs:
        """The same with ``seen`` per K/V head (seen by any query head of its group), for the
        dK/dV kernel, which reads each K/V head once for its whole group."""
        if self.kind == MASK_NONE or groups == 1 or self.seen.shape[1] == 1:
            return self
        b, h, sk = self.seen.shape
        return dataclasses.replace(self, seen=self.seen.view(b, h // groups, groups, sk).amax(2))


def keys_seen(mask4: torch.Tensor, band: torch.Tensor | None) -> torch.Tensor:
    """int32 (B | 1, H | 1, Sk), contiguous: 1 where some query row may see the key.

    ``mask4`` is the 4-D attention mask (bool: True = attend; float: -inf hides); ``band``
    the (Sq, Sk) positions each row may see (:meth:`ScoreArgs.visible`, None: all). A
    key-padding mask (one row) is taken as it is: the kernels cut the band's keys themselves.
    """
    vis = mask4 if mask4.dtype == torch.bool else mask4 != float("-inf")
    if vis.shape[2] == 1:  # the same for every row (a key-padding mask)
        seen = vis[:, :, 0]
    elif band is not None:
        seen = (vis & band).any(2)
    else:
        seen = vis.any(2)
    return seen.to(torch.int32).contiguous()


@dataclasses.dataclass(frozen=True)
class ScoreArgs:
    """What the kernels do to the scores besides the mask: the band of keys each query row sees
    by position (causal, sliding window, their alignment), softcapping and ALiBi.

    Query ``i``'s diagonal is key ``i + diag_off`` (0 top-left, ``Sk - Sq`` bottom-right);
    it sees keys up to ``diagonal + upper`` (``upper``: 0 under causal, a window's right
    size, -1 unbounded) and from ``diagonal - lower`` (a window's left size, -1 unbounded).
    ``softcap`` > 0 caps the scaled scores at ``softcap * tanh(s / softcap)``; ALiBi
    ``slopes`` (float32 (B | 1, Hq)) subtract ``slope * |diagonal - j|`` after it.
    """

    diag_off: int = 0
    upper: int = -1
    lower: int = -1
    softcap: float = 0.0
    slopes: torch.Tensor | None = None

    @staticmethod
    def of(q_len: int, k_len: int, is_causal: bool, bottom_right: bool = False,
           window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
           alibi_slopes: torch.Tensor | None = None) -> ScoreArgs:
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes.to(torch.float32).reshape(-1 if alibi_slopes.dim() == 2 else 1,
                                                            alibi_slopes.shape[-1])
        return ScoreArgs(k_len - q_len if bottom_right else 0, 0 if is_causal else int(window[1]),
                         int(window[0]), float(softcap), slopes)

    def visible(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
        """Boolean (Sq, Sk): the keys each row sees by position; None when all."""
        if self.upper < 0 and self.lower < 0:
            return None
        i = torch.arange(q_len, device=device)[:, None] + self.diag_off
        j = torch.arange(k_len, device=device)[None, :]
        ok = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        if self.upper >= 0:
            ok = ok & (j <= i + self.upper)
        if self.lower >= 0:
            ok = ok & (j >= i - self.lower)
        return ok

    def kernel_args(self, dummy: torch.Tensor) -> tuple:
        """The kernels' runtime arguments: diag_off, upper, lower, cap2, slope pointer and strides."""
        cap2 = self.softcap * 1.4426950408889634
        if self.slopes is None:
            return self.diag_off, max(self.upper, 0), max(self.lower, 0), cap2, dummy, 0, 0
        sb = 0 if self.slopes.shape[0] == 1 else self.slopes.stride(0)
        return self.diag_off, max(self.upper, 0), max(self.lower, 0), cap2, self.slopes, sb, self.slopes.stride(1)

    def qk_scale(self, scale: float) -> float:
        """What the kernels multiply q.k by: ``scale * log2(e)``, or ``scale / softcap``."""
        return scale / self.softcap if self.softcap > 0.0 else scale * 1.4426950408889634

    def heavy(self) -> bool:
        """The scores need more registers (a window's extra edge loop, softcap, ALiBi): the
        tables' smaller "heavy" tiles, as for a mask."""
        return self.lower >= 0 or self.softcap > 0.0 or self.slopes is not None

    def constexprs(self) -> dict:
        return dict(UPPER=self.upper >= 0, LOWER=self.lower >= 0, SOFTCAP=self.softcap > 0.0,
                    HAS_ALIBI=self.slopes is not None)


def _common_constexprs(d: int, dv: int, band: ScoreArgs, mask: MaskArgs, has_dropout: bool,
                       q: torch.Tensor, varlen: bool = False) -> dict:
    return dict(STRIDE_ALIGN=16 // q.element_size(),  # the launchers give the kernels aligned rows
        VARLEN=varlen,
        HEAD_D=d, HEAD_DV=dv, BLOCK_D=padded_head_dim(d), BLOCK_DV=padded_head_dim(dv),
        MASK_KIND=mask.kind, MASK_ROW_BCAST=mask.row_bcast, HAS_DROPOUT=has_dropout,
        DOT_PRECISION=_dot_precision(q.dtype, q.device), **band.constexprs(),
    )


def _dropout_args(dropout_p: float) -> tuple[float, float]:
    return float(dropout_p), (1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0)
