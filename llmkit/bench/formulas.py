"""FLOP and byte counts of every benchmarked op: what one call must compute and move.

Each function takes the shape of one call and the element size in bytes of its
floating-point tensors (``elem``: 4 for float32, 2 for float16 / bfloat16) and returns a
:class:`Work`: ``flops`` (floating-point or, for int8 GEMMs, integer operations; a
multiply-add counts 2) and ``bytes`` (the minimum traffic to and from device memory: every
input read once, every output written once, nothing re-read; statistics saved for the
backward are float32, as the ops store them).

Conventions:

* Attention follows FlashAttention's count: forward ``4 * B * H * Sq * Sk * D`` (two
  GEMMs, ``Q K^T`` and ``P V``), halved for causal attention, backward 2.5x the forward
  (five GEMMs where the forward has two). Softmax and masking are not counted.
* Norms and activations are memory-bound; their ``flops`` are the nominal arithmetic
  per element listed at each function and matter only as information: their roofline
  is the copy bandwidth, so their figure of merit is ``bytes / time``.
* The W8A8 int8 GEMM counts ``2 * M * N * K`` integer operations; its activation
  quantization is fused, so the activations are read once in the input dtype.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = [
    "Work",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "gelu",
    "bias_gelu",
    "attention",
    "decode_attention",
    "quantize_int8",
    "int8_linear_w8a8",
    "int8_linear_w8a16",
    "linear",
    "copy",
    "transformer_tokens",
    "fraction_of_roofline",
]

STATS_BYTES = 4
"""Saved statistics (mean, rstd, lse) are float32."""


@dataclasses.dataclass(frozen=True)
class Work:
    """What one call of an op costs: operations and minimum memory traffic."""

    flops: float
    bytes: float

    def tflops(self, seconds: float) -> float:
        """Operations per second in units of 10^12."""
        return self.flops / seconds / 1e12

    def gbps(self, seconds: float) -> float:
        """Bytes per second in units of 10^9."""
        return self.bytes / seconds / 1e9


# -- norms -----------------------------------------------------------------------------
# Nominal flops per element: LayerNorm forward 7 (sum, subtract mean, square and
# accumulate, scale by rstd, scale by weight, add bias); backward 14. RMSNorm forward 4
# (square and accumulate, scale by rstd, scale by weight), backward 9.


def layer_norm(m: int, n: int, elem: int, backward: bool = False) -> Work:
    """LayerNorm over rows of ``n`` for ``m`` rows.

    Forward reads x (m*n) and weight, bias (n each); writes y (m*n) and mean, rstd
    (m each, float32). Backward reads dy, x (m*n), weight (n), mean, rstd; writes
    dx (m*n), dweight, dbias (n each).
    """
    if backward:
        return Work(14.0 * m * n, elem * (3 * m * n + 3 * n) + 2 * STATS_BYTES * m)
    return Work(7.0 * m * n, elem * (2 * m * n + 2 * n) + 2 * STATS_BYTES * m)


def rms_norm(m: int, n: int, elem: int, backward: bool = False) -> Work:
    """RMSNorm: like :func:`layer_norm` without bias and mean (one float32 stat per row)."""
    if backward:
        return Work(9.0 * m * n, elem * (3 * m * n + 2 * n) + STATS_BYTES * m)
    return Work(4.0 * m * n, elem * (2 * m * n + n) + STATS_BYTES * m)


def add_layer_norm(m: int, n: int, elem: int, backward: bool = False) -> Work:
    """Fused residual add + LayerNorm.

    Forward reads x, residual (m*n each), weight, bias; writes y and residual_out
    (m*n each), mean, rstd. Backward reads dy, d residual_out, residual_out (m*n each),
    weight, mean, rstd; writes the one input gradient (m*n), dweight, dbias.
    """
    if backward:
        return Work(15.0 * m * n, elem * (4 * m * n + 3 * n) + 2 * STATS_BYTES * m)
    return Work(8.0 * m * n, elem * (4 * m * n + 2 * n) + 2 * STATS_BYTES * m)


def add_rms_norm(m: int, n: int, elem: int, backward: bool = False) -> Work:
    """Fused residual add + RMSNorm: :func:`add_layer_norm` without bias and mean."""
    if backward:
        return Work(10.0 * m * n, elem * (4 * m * n + 2 * n) + STATS_BYTES * m)
    return Work(5.0 * m * n, elem * (4 * m * n + n) + STATS_BYTES * m)


# -- activations -----------------------------------------------------------------------
# Nominal flops per element: GELU forward 8, backward 12; the bias adds 1 (its backward
# reduction 1 more).


def gelu(numel: int, elem: int, backward: bool = False) -> Work:
    """GELU of ``numel`` elements: forward reads x, writes y; backward reads dy, x, writes dx."""
    if backward:
        return Work(12.0 * numel, elem * 3 * numel)
    return Work(8.0 * numel, elem * 2 * numel)


def bias_gelu(m: int, n: int, elem: int, backward: bool = False) -> Work:
    """GELU(x + bias) for x (m, n), bias (n): backward also writes dbias (n)."""
    if backward:
        return Work(14.0 * m * n, elem * (3 * m * n + 2 * n))
    return Work(9.0 * m * n, elem * (2 * m * n + n))


def glu(numel: int, elem: int, activation: str, backward: bool = False) -> Work:
    """``act(gate) * up`` of ``numel`` elements each (SwiGLU: ``activation="silu"``, GeGLU:
    ``"gelu"``): forward reads gate, up and writes out; backward reads dy, gate, up and writes
    d gate, d up. Flops: the activation's (SiLU 5, GELU 8; backward 9 / 12) and the products."""
    act_fwd, act_bwd = (5.0, 9.0) if activation == "silu" else (8.0, 12.0)
    if backward:
        return Work((act_bwd + 4.0) * numel, elem * 5 * numel)
    return Work((act_fwd + 1.0) * numel, elem * 3 * numel)


# -- attention -------------------------------------------------------------------------


def attention(
    b: int,
    hq: int,
    sq: int,
    sk: int,
    d: int,
    elem: int,
    causal: bool = False,
    backward: bool = False,
    hkv: int | None = None,
    dv: int | None = None,
) -> Work:
    """Scaled dot-product attention, FlashAttention convention.

    Forward flops ``2 * B * Hq * Sq * Sk * (D + Dv)`` (= ``4 * B * H * Sq * Sk * D`` when
    ``Dv == D``), halved when ``causal``; backward 2.5x that. Forward bytes: q, k, v
    read, out written, lse (float32) written. Backward bytes: q, k, v, out, dout, lse
    read; dq, dk, dv written (and the float32 row sums ``delta`` written and read).
    """
    hkv = hq if hkv is None else hkv
    dv = d if dv is None else dv
    fwd = 2.0 * b * hq * sq * sk * (d + dv)
    if causal:
        fwd /= 2
    q, o = b * hq * sq * d, b * hq * sq * dv
    k, v = b * hkv * sk * d, b * hkv * sk * dv
    rows = b * hq * sq
    if backward:
        return Work(2.5 * fwd, elem * (2 * (q + k + v) + 2 * o) + 3 * STATS_BYTES * rows)
    return Work(fwd, elem * (q + k + v + o) + STATS_BYTES * rows)


def window_keys(sq: int, sk: int, left: int, right: int) -> float:
    """Keys the query rows of a bottom-right aligned sliding window see, summed over the rows:
    row ``i`` sees keys ``[i + sk - sq - left, i + sk - sq + right]`` within ``[0, sk)``
    (``-1``: unbounded on that side). Closed form: between the rows where a clamp starts or
    stops binding, a row's count is linear in ``i`` (slope -1, 0 or 1), summed as a series."""
    shift = sk - sq
    lo_off = None if left < 0 else shift - left  # row i's first key: max(0, i + lo_off)
    hi_off = None if right < 0 else shift + right  # row i's last key: min(sk - 1, i + hi_off)
    cuts = {0, sq}
    if lo_off is not None:
        cuts.add(min(max(-lo_off, 0), sq))
    if hi_off is not None:
        cuts.add(min(max(sk - hi_off, 0), sq))
    edges = sorted(cuts)
    total = 0
    for a, b in zip(edges, edges[1:], strict=False):
        # count(i) = alpha + beta * i on [a, b), before the max(0, .)
        alpha, beta = 1, 0
        if lo_off is not None and a + lo_off >= 0:
            alpha, beta = alpha - lo_off, beta - 1
        if hi_off is not None and a + hi_off <= sk - 1:
            alpha, beta = alpha + hi_off, beta + 1
        else:
            alpha += sk - 1
        if beta == 0:
            x, y = (a, b) if alpha > 0 else (a, a)
        elif beta > 0:  # positive from i = 1 - alpha on
            x, y = max(a, 1 - alpha), b
        else:  # positive up to i = alpha - 1
            x, y = a, min(b, alpha)
        if y > x:
            total += (y - x) * alpha + beta * (x + y - 1) * (y - x) // 2
    return float(total)


def attention_pairs(
    b: int,
    hq: int,
    sq: int,
    sk: int,
    d: int,
    elem: int,
    pairs: float,
    backward: bool = False,
    hkv: int | None = None,
) -> Work:
    """Attention whose rows see ``pairs`` (query, key) pairs in all (FlashAttention convention,
    counting only those): forward flops ``4 * B * Hq * D * pairs``, backward 2.5x; bytes as
    :func:`attention` (q, k, v, out and the row statistics, each once)."""
    hkv = hq if hkv is None else hkv
    fwd = 4.0 * b * hq * d * pairs
    q = o = b * hq * sq * d
    k = v = b * hkv * sk * d
    rows = b * hq * sq
    if backward:
        return Work(2.5 * fwd, elem * (2 * (q + k + v) + 2 * o) + 3 * STATS_BYTES * rows)
    return Work(fwd, elem * (q + k + v + o) + STATS_BYTES * rows)


def attention_window(
    b: int,
    hq: int,
    s: int,
    d: int,
    elem: int,
    left: int,
    right: int = 0,
    backward: bool = False,
    hkv: int | None = None,
) -> Work:
    """Sliding-window attention over ``s`` tokens: :func:`attention_pairs` of the pairs inside
    the window."""
    return attention_pairs(b, hq, s, s, d, elem, window_keys(s, s, left, right), backward, hkv)


def varlen_attention(
    lengths: list[int], hq: int, d: int, elem: int, causal: bool = True, backward: bool = False, hkv: int | None = None
) -> Work:
    """Packed variable-length attention: :func:`attention` of each sequence alone, summed (only
    the real (query, key) pairs count; no padding)."""
    works = [attention(1, hq, n, n, d, elem, causal, backward, hkv=hkv) for n in lengths]
    return Work(sum(w.flops for w in works), sum(w.bytes for w in works))


def decode_paged(b: int, hq: int, hkv: int, t: int, cache_len: int, d: int, elem: int, block_size: int) -> Work:
    """Paged decode attention: :func:`decode_attention`'s work plus the int32 block-table
    entries the sequences use."""
    w = decode_attention(b, hq, hkv, t, cache_len, d, elem)
    return Work(w.flops, w.bytes + 4 * b * -(-cache_len // block_size))


def decode_attention(
    b: int, hq: int, hkv: int, t: int, cache_len: int, d: int, elem: int, dv: int | None = None
) -> Work:
    """Decode attention: ``t`` new queries per sequence against ``cache_len`` cached keys.

    Flops ``2 * B * Hq * T * L * (D + Dv)``; bytes: the K and V cache rows in use
    (``B * Hkv * L * (D + Dv)``, read once however many query heads share them), the
    queries read and the outputs written, and the int32 cache lengths.
    """
    dv = d if dv is None else dv
    flops = 2.0 * b * hq * t * cache_len * (d + dv)
    nbytes = elem * (b * hkv * cache_len * (d + dv) + b * hq * t * (d + dv)) + 4 * b
    return Work(flops, nbytes)


# -- int8 ------------------------------------------------------------------------------


def quantize_int8(m: int, k: int, elem: int) -> Work:
    """Per-row absmax quantization of x (m, k): read x, write int8 q and float32 scales.

    Nominal flops per element: 3 (absolute max, scale, round).
    """
    return Work(3.0 * m * k, elem * m * k + m * k + 4 * m)


def int8_linear_w8a8(m: int, n: int, k: int, elem: int, bias: bool = True) -> Work:
    """W8A8 linear: x (m, k) in ``elem`` bytes quantized on the fly, int8 W (n, k).

    ``2 * m * n * k`` integer operations; bytes: x read once, W (int8) and its float32
    scales read, bias read, out (m, n) written in the input dtype.
    """
    return Work(2.0 * m * n * k, elem * m * k + n * k + 4 * n + (elem * n if bias else 0) + elem * m * n)


def int8_linear_w8a16(m: int, n: int, k: int, elem: int, bias: bool = True) -> Work:
    """Weight-only int8 linear: x (m, k) and out in ``elem`` bytes, int8 W (n, k) + scales."""
    return Work(2.0 * m * n * k, elem * m * k + n * k + 4 * n + (elem * n if bias else 0) + elem * m * n)


def linear(m: int, n: int, k: int, elem: int, bias: bool = True) -> Work:
    """A float linear (or GEMM) y = x W^T + b: ``2 m n k`` flops, every operand once."""
    return Work(2.0 * m * n * k, elem * (m * k + n * k + m * n + (n if bias else 0)))


def copy(nbytes: int) -> Work:
    """A device-to-device copy of ``nbytes``: read once and written once."""
    return Work(0.0, 2.0 * nbytes)


# -- models ----------------------------------------------------------------------------


def transformer_tokens(layers: int, hidden: int, ffn: int, tokens: int, context: int, causal: bool = False) -> float:
    """Nominal forward flops of a Transformer stack for ``tokens`` tokens.

    Per layer and token: the four attention projections ``2 * 4 * hidden^2``, the MLP
    ``2 * 2 * hidden * ffn``, and attention against ``context`` keys ``4 * context *
    hidden`` (halved when causal with ``tokens == context``, as in prefill). Embeddings,
    norms and the output head are not counted.
    """
    dense = 8.0 * hidden * hidden + 4.0 * hidden * ffn
    attn = 4.0 * context * hidden * (0.5 if causal else 1.0)
    return layers * tokens * (dense + attn)


def fraction_of_roofline(achieved: float | None, roof: float | None) -> float | None:
    """``achieved / roof`` when both are known and positive, else None."""
    if achieved is None or roof is None or not roof > 0 or not math.isfinite(achieved):
        return None
    return achieved / roof
