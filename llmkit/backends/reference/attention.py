"""Attention on the reference backend: ATen's fused CPU kernel where it meets llmkit's
tolerance rule, float32 / float64 math everywhere else.

Shapes and semantics are those of ``llmkit/ops/attention.py``. What this module adds to plain
ATen calls, each a convention every backend keeps (docs/architecture.md, "Conventions"):

* Keys no query row may see never reach the output or a gradient, whatever they hold
  (NaN, inf, the garbage of a cache made with ``torch.empty``): under top-left
  ``is_causal`` the keys past ``Sq`` are cut off; keys that ``attn_mask`` hides from
  every row are zeroed before ATen reads them (its kernel multiplies them by a zero
  probability: ``0 * NaN`` is NaN). Their ``dk`` / ``dv`` are zero.
* Any finite ``scale``, zero and negative included (ATen's causal CPU kernel gives NaN
  rows for ``scale <= 0``: the causal mask goes to it as an explicit mask then).
* ``attn_mask`` of 1 to 4 dims (ATen's kernel takes 2 or 4).
* Backward, half precision: ATen's float16 / bfloat16 CPU backward computes
  ``delta = rowsum(dO * O)`` from the rounded output, whose rounding dominates ``dQ`` /
  ``dK`` when ``|O| >> |dO|``, and misses llmkit's tolerance on long-query / few-key
  shapes. Half inputs are widened to float32 and the output recomputed in float32
  (exact widening: the same inputs), then differentiated by the float32 kernel.
* Backward, math path (dropout, a float mask that needs its gradient): the probabilities
  are the softmax of the recomputed scores (normalized, not ``exp(s - lse)``, which
  inherits the float32 rounding of ``lse``: ~1e-5 relative at scores ~200) and
  ``delta = rowsum(P * dP)`` from them, consistent with the ``dS`` it corrects.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._compat import HAS_CPU_FLASH_ATTENTION, cpu_flash_attention, cpu_flash_attention_backward
from ...ops._attention_shift import shift_for_backward
from ...ops._philox import dropout_keep_mask
from ...ops.attention import AttentionBackwardCall, AttentionCall, attention_backward, attention_forward, compute_dtype

_HALF = (torch.float16, torch.bfloat16)


def expand_kv(t: Tensor, groups: int) -> Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * groups, S, D): query head h reads kv head h // groups."""
    if groups == 1:
        return t
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def mask_4d(attn_mask: Tensor | None) -> Tensor | None:
    """A mask of 1 to 4 dims as a 4-D view (leading dims of size 1), as broadcasting reads it."""
    if attn_mask is None or attn_mask.dim() == 4:
        return attn_mask
    return attn_mask[(None,) * (4 - attn_mask.dim())]


def _tril(q_len: int, k_len: int, device: torch.device) -> Tensor:
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()


def allowed_keys(
    attn_mask: Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device
) -> Tensor | None:
    """Boolean (..., Sq, Sk) of keys a query may see (mask and causal), None if all."""
    allowed = None
    if attn_mask is not None:
        allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
    if is_causal:
        tri = _tril(q_len, k_len, device)
        allowed = tri if allowed is None else allowed & tri
    return allowed


def additive_mask(
    attn_mask: Tensor | None, is_causal: bool, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """The mask as one additive float tensor (-inf where hidden), None if nothing is hidden."""
    if attn_mask is None and not is_causal:
        return None
    if attn_mask is None:
        m = torch.zeros(q_len, k_len, dtype=dtype, device=device)
    elif attn_mask.dtype == torch.bool:
        m = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill_(~attn_mask, float("-inf"))
    else:
        m = attn_mask.to(dtype)
    if is_causal:
        m = m.masked_fill(~_tril(q_len, k_len, device), float("-inf"))
    return m


def _finite_sum(t: Tensor) -> bool:
    """True when ``t`` holds no NaN or inf (one float32 sum: a cheap read; an overflow of
    the sum of finite values reads as 'not finite', which only costs a recomputation)."""
    return t.numel() == 0 or math.isfinite(float(t.sum(dtype=torch.float32)))


@dataclasses.dataclass
class Visible:
    """The keys attention reads, cut to those some query row may see.

    ``key`` / ``value`` / ``mask``: under top-left ``is_causal`` with ``Sk > Sq`` the keys
    past ``Sq`` are cut off (views); ``mask`` is 4-D. ``dead_rows``: boolean broadcastable
    to (B, Hq, Sq), rows with no visible key (None: none). ``dead_cols``: boolean
    (B | 1, Hq | 1, Sk) of keys no row sees (None: none), see :meth:`clean_kv`.
    """

    key: Tensor
    value: Tensor
    mask: Tensor | None
    full_k_len: int
    dead_rows: Tensor | None
    dead_cols: Tensor | None

    @staticmethod
    def of(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Visible:
        sq, sk = query.shape[2], key.shape[2]
        full = sk
        mask = mask_4d(attn_mask)
        if is_causal and sk > sq:  # top-left: row i sees keys j <= i < Sq
            key, value, sk = key[:, :, :sq], value[:, :, :sq], sq
            if mask is not None and mask.shape[-1] != 1:
                mask = mask[..., :sq]
        if sk == 0:
            return Visible(key, value, mask, full, torch.ones(sq, dtype=torch.bool, device=query.device), None)
        if mask is None:  # causal alone hides no whole row or column once cut to Sq keys
            return Visible(key, value, mask, full, None, None)
        allowed = allowed_keys(mask, is_causal, sq, sk, query.device)
        assert allowed is not None  # a mask is given
        dead_cols = ~allowed.any(-2)
        return Visible(key, value, mask, full, ~allowed.any(-1), dead_cols if bool(dead_cols.any()) else None)

    def clean_kv(self, groups: int) -> tuple[Tensor, Tensor]:
        """key and value with the keys no row sees zeroed (copies; the inputs when none)."""
        if self.dead_cols is None:
            return self.key, self.value
        dead = self.dead_cols
        if dead.shape[1] != 1 and groups > 1:  # a kv head's key is dead when no head of its group sees it
            dead = dead.reshape(dead.shape[0], -1, groups, dead.shape[-1]).all(2)
        dead = dead[..., None]
        return self.key.masked_fill(dead, 0.0), self.value.masked_fill(dead, 0.0)

    def cut_keys(self) -> int:
        """How many keys past Sq the causal cut removed."""
        return self.full_k_len - self.key.shape[2]


def use_cpu_flash(query: Tensor, value: Tensor, dropout_p: float) -> bool:
    """ATen's fused CPU kernel applies: CPU, no dropout, D == Dv, nothing empty."""
    return (
        HAS_CPU_FLASH_ATTENTION
        and query.device.type == "cpu"
        and dropout_p == 0.0
        and query.shape[-1] == value.shape[-1]
        and query.shape[-1] > 0
        and query.shape[-2] > 0
        and value.shape[-2] > 0
    )


def rows_contiguous(t: Tensor) -> Tensor:
    """ATen's CPU flash kernels read q / k / v / out as if their last stride were 1 (the public
    F.scaled_dot_product_attention makes them so before calling): give them such tensors."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _flash_mask(
    attn_mask: Tensor | None, is_causal: bool, scale: float, q_len: int, k_len: int, dtype: torch.dtype
) -> tuple[bool, Tensor | None]:
    """(is_causal, attn_mask) as ATen's CPU kernel takes them for inputs of ``dtype``.

    Bool masks become additive float masks. ATen's kernel misreads a float32 mask next to
    float64 inputs (errors of order 1, torch 2.13): the mask goes in float64 then; half
    inputs take a float32 mask exactly. Its causal path gives NaN rows for ``scale <= 0``:
    the causal mask then goes in the additive mask.
    """
    mask_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if is_causal and scale <= 0.0:
        return False, additive_mask(attn_mask, True, q_len, k_len, mask_dtype, torch.device("cpu"))
    if attn_mask is None:
        return is_causal, None
    if attn_mask.dtype == torch.bool:
        return is_causal, torch.zeros(attn_mask.shape, dtype=mask_dtype).masked_fill_(~attn_mask, float("-inf"))
    return is_causal, (attn_mask.to(mask_dtype) if dtype == torch.float64 else attn_mask)


def _flash_forward(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, is_causal: bool, scale: float, groups: int
) -> tuple[Tensor, Tensor]:
    causal, m = _flash_mask(mask, is_causal, scale, query.shape[2], key.shape[2], query.dtype)
    k = rows_contiguous(expand_kv(key, groups))
    v = rows_contiguous(expand_kv(value, groups))
    out, lse = cpu_flash_attention(rows_contiguous(query), k, v, causal, m, scale)
    # ATen's CPU kernel turns a query row holding NaN or inf into zeros (its running
    # max skips NaN); the math gives NaN there, so put it back: NaN stays in its row.
    if not _finite_sum(query):
        bad_rows = ~torch.isfinite(query).all(-1)
        out = out.masked_fill(bad_rows[..., None], float("nan"))
        lse = lse.masked_fill(bad_rows, float("nan"))
    return out, lse


def lowered_mask(c: AttentionCall | AttentionBackwardCall) -> tuple[Tensor | None, bool]:
    """``(attn_mask, is_causal)`` of the call with its sliding window, bottom-right alignment
    and ALiBi folded into one additive mask in the compute dtype (-inf where hidden); the
    call's own pair when it has none of them. Softcapping is applied to the scores (it
    comes before the mask)."""
    if c.window_left < 0 and c.window_right < 0 and not c.bottom_right and c.alibi_slopes is None:
        return c.attn_mask, c.is_causal
    sq, sk, device = c.query.shape[2], c.key.shape[2], c.query.device
    cdt = compute_dtype(c.query.dtype)
    diag = torch.arange(sq, device=device)[:, None] + (sk - sq if c.bottom_right else 0)
    j = torch.arange(sk, device=device)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if c.is_causal:
        ok = ok & (j <= diag)
    if c.window_right >= 0:
        ok = ok & (j <= diag + c.window_right)
    if c.window_left >= 0:
        ok = ok & (j >= diag - c.window_left)
    m = torch.zeros(sq, sk, dtype=cdt, device=device).masked_fill_(~ok, float("-inf"))
    if c.alibi_slopes is not None:
        slopes = c.alibi_slopes.to(cdt).reshape(-1 if c.alibi_slopes.dim() == 2 else 1, c.query.shape[1])
        m = m - slopes[:, :, None, None] * (diag - j).abs().to(cdt)
    user = mask_4d(c.attn_mask)
    if user is not None:
        m = m.masked_fill(~user, float("-inf")) if user.dtype == torch.bool else m + user.to(cdt)
    return m, False


def _math_probs(
    query: Tensor,
    key: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
    dead_rows: Tensor | None,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(scores, normalized probabilities, tanh of the capped scores or None) in the compute
    dtype; dead rows get p = 0."""
    s = torch.matmul(query, key.transpose(-1, -2)) * scale
    t = None
    if softcap > 0.0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    m = additive_mask(mask, is_causal, query.shape[-2], key.shape[-2], s.dtype, s.device)
    if m is not None:
        s = s + m
    p = torch.softmax(s, dim=-1)  # rows of -inf only (dead) give NaN here
    if dead_rows is not None:
        p = p.masked_fill(dead_rows[..., None], 0.0)
    return s, p, t


def _dims4(t: Tensor) -> tuple[int, int, int, int]:
    b, h, sq, sk = t.shape
    return b, h, sq, sk


def _keep_scale(
    seed: int,
    offset: int,
    shape: tuple[int, int, int, int],
    full_k_len: int,
    dropout_p: float,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Dropout's keep mask times 1 / (1 - p), cut to the keys read (counters use the full Sk)."""
    b, h, sq, sk = shape
    keep = dropout_keep_mask(seed, offset, b, h, sq, full_k_len, dropout_p, device)[..., :sk]
    return keep.to(dtype) * (1.0 / (1.0 - dropout_p))


@attention_forward.register("reference")
def attention_forward_reference(c: AttentionCall) -> tuple[Tensor, Tensor]:
    """Attention in float32 (float64 for float64); ATen's fused CPU kernel where it applies."""
    query, key, value, _, dropout_p, _, scale, _, seed, offset = c[:10]
    attn_mask, is_causal = lowered_mask(c)
    b, hq, sq, _ = query.shape
    groups = hq // key.shape[1] if key.shape[1] else 1
    cdt = compute_dtype(query.dtype)
    vis = Visible.of(query, key, value, attn_mask, is_causal)
    if use_cpu_flash(query, vis.value, dropout_p) and c.softcap == 0.0:
        out, lse = _flash_forward(query, vis.key, vis.value, vis.mask, is_causal, scale, groups)
        if vis.dead_cols is not None and not _finite_sum(out):  # maybe a hidden key's NaN: redo without them
            out, lse = _flash_forward(query, *vis.clean_kv(groups), vis.mask, is_causal, scale, groups)
        lse = lse.to(cdt)
    else:
        key_c, value_c = vis.clean_kv(groups)
        q = query.to(cdt)
        k = expand_kv(key_c.to(cdt), groups)
        v = expand_kv(value_c.to(cdt), groups)
        s, p, _ = _math_probs(q, k, vis.mask, is_causal, scale, vis.dead_rows, c.softcap)
        lse = torch.logsumexp(s, dim=-1)
        if dropout_p > 0.0:
            p = p * _keep_scale(seed, offset, _dims4(p), vis.full_k_len, dropout_p, cdt, query.device)
        out = torch.matmul(p, v).to(query.dtype)
    if vis.dead_rows is not None and bool(vis.dead_rows.any()):
        dead = vis.dead_rows.expand(b, hq, sq)
        out = out.masked_fill(dead[..., None], 0.0)
        lse = lse.masked_fill(dead, float("inf"))
    return out, lse.contiguous()


def reduce_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the dims that were broadcast from ``shape``."""
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t


def _flash_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
    groups: int,
    recompute: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """ATen's CPU backward; half inputs widened to float32 with the output recomputed in float32
    (``recompute``: the output recomputed whatever the dtype, for shifted keys / values)."""
    if query.dtype in _HALF:
        query, key, value, grad_out = (t.float() for t in (query, key, value, grad_out))
        out, lse = _flash_forward(query, key, value, mask, is_causal, scale, groups)
    elif recompute:
        out, lse = _flash_forward(query, key, value, mask, is_causal, scale, groups)
    causal, m = _flash_mask(mask, is_causal, scale, query.shape[2], key.shape[2], query.dtype)
    k = rows_contiguous(expand_kv(key, groups))
    v = rows_contiguous(expand_kv(value, groups))
    lse = lse.to(torch.float32) if query.dtype == torch.float32 else lse
    return cpu_flash_attention_backward(
        grad_out.contiguous(), rows_contiguous(query), k, v, rows_contiguous(out), lse, causal, m, scale
    )


@attention_backward.register("reference")
def attention_backward_reference(c: AttentionBackwardCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (and d mask for a float mask), recomputing the probabilities."""
    grad_out, query, key, value, out, lse, attn_mask, dropout_p, _, scale = c[:10]
    seed, offset, mask_grad = c.seed, c.offset, c.mask_grad
    mask, is_causal = lowered_mask(c)
    # exact shifts of keys / values with a large common part: same gradients, no cancellation
    key, value = shift_for_backward(key, value, c.softcap, dropout_p, sync=True)
    shifted = key is not c.key or value is not c.value
    b, hq, sq, _ = query.shape
    hkv, dim, dim_v = key.shape[1], key.shape[-1], value.shape[-1]
    groups = hq // hkv if hkv else 1
    cdt = compute_dtype(query.dtype)
    vis = Visible.of(query, key, value, mask, is_causal)
    sk = vis.key.shape[2]
    dmask = query.new_empty((0,))
    # ATen's backward takes delta from the output, which does not cancel against dP exactly
    # (a row seeing one key gets dS ~ ulp * |dO| |v| instead of 0, times |k| in dq): the
    # options beyond SDPA's, whose only baseline is the eager formula, take the math path
    lowered = mask is not attn_mask or is_causal != c.is_causal
    if use_cpu_flash(query, vis.value, dropout_p) and not mask_grad and c.softcap == 0.0 and not lowered:
        dq, dk, dv = _flash_backward(
            grad_out, query, vis.key, vis.value, out, lse, vis.mask, is_causal, scale, groups, shifted
        )
        if vis.dead_cols is not None and not (_finite_sum(dq) and _finite_sum(dk) and _finite_sum(dv)):
            dq, dk, dv = _flash_backward(
                grad_out, query, *vis.clean_kv(groups), out, lse, vis.mask, is_causal, scale, groups, shifted
            )
    else:
        key_c, value_c = vis.clean_kv(groups)
        q = query.to(cdt)
        k = expand_kv(key_c.to(cdt), groups)
        v = expand_kv(value_c.to(cdt), groups)
        do = grad_out.to(cdt)
        _, p, t = _math_probs(q, k, vis.mask, is_causal, scale, vis.dead_rows, c.softcap)
        dp = torch.matmul(do, v.transpose(-1, -2))
        if dropout_p > 0.0:
            z = _keep_scale(seed, offset, _dims4(p), vis.full_k_len, dropout_p, cdt, query.device)
            dv = torch.matmul((p * z).transpose(-1, -2), do)
            dp = dp * z
        else:
            dv = torch.matmul(p.transpose(-1, -2), do)
        # delta = rowsum(dO * O) computed as rowsum(P * dP): from the same float32 (float64)
        # probabilities as dS, never from the rounded output
        delta = (p * dp).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        if mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool:
            ds_m = F.pad(ds, (0, vis.cut_keys())) if attn_mask.shape[-1] != 1 else ds
            dmask = reduce_to_shape(ds_m, attn_mask.shape).to(attn_mask.dtype)
        if t is not None:  # through softcap * tanh(s / softcap)
            ds = ds * (1.0 - t * t)
        dq = torch.matmul(ds, k) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    if groups > 1:
        dk = dk.reshape(b, hkv, groups, sk, dim).sum(2)
        dv = dv.reshape(b, hkv, groups, sk, dim_v).sum(2)
    if vis.cut_keys():  # keys past Sq under causal: no row sees them, their gradients are zero
        dk = F.pad(dk, (0, 0, 0, vis.cut_keys()))
        dv = F.pad(dv, (0, 0, 0, vis.cut_keys()))
    return (
        dq.to(query.dtype).contiguous(),
        dk.to(key.dtype).contiguous(),
        dv.to(value.dtype).contiguous(),
        dmask.contiguous(),
    )
