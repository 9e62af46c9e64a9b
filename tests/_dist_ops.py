"""Checks of every llmkit op on DTensors, run by tests/test_distributed.py in each rank.

Each case runs the op on DTensors placed as given and on the whole tensors in one process,
forward and backward (gradients of every floating input), and requires the gathered
DTensor result to pass the tolerance rule of llmkit.testing against the float64 formula
of llmkit.reference64, with the whole-tensor op as the baseline (integer results: equal
to the whole-tensor op). It also checks the placement the op produced, so a test fails
when a strategy that should shard silently gathers, or one that must gather does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from llmkit import ops
from llmkit import reference64 as R64
from llmkit.testing import assert_close_to_reference

F64 = torch.float64


def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Shard, Replicate(), Partial()


def _floating(a: object) -> bool:
    return isinstance(a, Tensor) and a.is_floating_point()


def run_case(
    mesh,
    fn: Callable[..., Any],
    ref: Callable[..., Any] | None,
    args: Sequence[object],
    placements: Sequence[object],
    expect: object = None,
    grad: bool = True,
    label: str = "",
) -> None:
    """``fn(*args)`` on DTensors (``placements[i]`` for tensor ``args[i]``) against ``fn``
    on the whole tensors and ``ref`` in float64; forward, then backward when ``grad``.

    ``fn`` and ``ref`` are called here and not kept, so the checks below may pass closures
    over their loop variables (the ``noqa: B023``): each call sees its own iteration's values."""
    from torch.distributed.tensor import distribute_tensor

    def leaf(a: object) -> object:
        if not isinstance(a, Tensor):
            return a
        return a.detach().clone().requires_grad_(grad and a.is_floating_point())

    def many(p: object) -> list:  # one placement per mesh dim
        return list(p) if isinstance(p, (tuple, list)) else [p]

    whole = [leaf(a) for a in args]
    dts = [
        distribute_tensor(a.detach(), mesh, many(p)).requires_grad_(grad and a.is_floating_point())
        if isinstance(a, Tensor)
        else a
        for a, p in zip(args, placements, strict=True)
    ]
    out_whole, out_dt = fn(*whole), fn(*dts)
    single = isinstance(out_whole, Tensor)
    out_whole, out_dt = ((out_whole,), (out_dt,)) if single else (tuple(out_whole), tuple(out_dt))
    if expect is not None and list(out_dt[0].placements) != many(expect):
        raise AssertionError(f"{label}: output placement {out_dt[0].placements}, expected {many(expect)}")
    got = [o.full_tensor() for o in out_dt]
    refs = None
    args64 = None
    if ref is not None:
        args64 = [a.detach().to(F64).requires_grad_(grad) if _floating(a) else a for a in args]
        refs = ref(*args64)
        refs = (refs,) if isinstance(refs, Tensor) else tuple(refs)
    for i, (g, w) in enumerate(zip(got, out_whole, strict=True)):
        _agree(f"{label} output {i}", g, w, None if refs is None else refs[i])
    if not grad:
        return
    diff = [i for i, o in enumerate(out_whole) if o.requires_grad]
    g_out = [torch.randn_like(out_whole[i]) for i in diff]
    torch.autograd.backward([out_whole[i] for i in diff], g_out)
    g_dt = [distribute_tensor(g, mesh, list(out_dt[i].placements)) for i, g in zip(diff, g_out, strict=True)]
    torch.autograd.backward([out_dt[i] for i in diff], g_dt)
    if refs is not None:
        torch.autograd.backward([refs[i] for i in diff], [g.to(F64) for g in g_out])
    for i, (d, w) in enumerate(zip(dts, whole, strict=True)):
        if not _floating(w):
            continue
        want64 = None if args64 is None else args64[i].grad
        _agree(f"{label} grad of arg {i}", d.grad.full_tensor(), w.grad, want64)


def _agree(name: str, got: Tensor, whole: Tensor, ref64: Tensor | None) -> None:
    if got.dtype != whole.dtype or got.shape != whole.shape:
        raise AssertionError(f"{name}: {got.dtype} {list(got.shape)} vs whole {whole.dtype} {list(whole.shape)}")
    if ref64 is None or not got.is_floating_point():
        if not torch.equal(got, whole):
            raise AssertionError(f"{name}: differs from the op on whole tensors")
        return
    assert_close_to_reference(got, ref64, whole.detach(), name=name)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -- norms ------------------------------------------------------------------------------


def check_norms(mesh) -> None:
    S, Rep, _ = _placements()
    for dtype in DTYPES:
        x = torch.randn(3, 5, 24, dtype=dtype)
        w, b = torch.randn(24, dtype=dtype), torch.randn(24, dtype=dtype)
        res = torch.randn(3, 5, 24, dtype=dtype)

        def ln(x, w, b):
            return ops.layer_norm(x, [24], w, b, 1e-5)

        def ln64(x, w, b):
            return R64.layer_norm(x, [24], w, b, 1e-5)

        def rms(x, w):
            return ops.rms_norm(x, [24], w, 1e-6)

        def rms64(x, w):
            return R64.rms_norm(x, [24], w, 1e-6)

        def aln(x, r, w, b):
            return ops.add_layer_norm(x, r, [24], w, b, 1e-5)

        def aln64(x, r, w, b):
            return R64.add_layer_norm(x, r, [24], w, b, 1e-5, round_to=dtype)  # noqa: B023 (see run_case)

        for d in (0, 1):  # rows: batch, sequence (SequenceParallel)
            tag = f"{dtype} Shard({d})"
            run_case(mesh, ln, ln64, (x, w, b), (S(d), Rep, Rep), S(d), label=f"layer_norm {tag}")
            run_case(mesh, rms, rms64, (x, w), (S(d), Rep), S(d), label=f"rms_norm {tag}")
            run_case(mesh, aln, aln64, (x, res, w, b), (S(d), S(d), Rep, Rep), S(d), label=f"add_layer_norm {tag}")
        if dtype != torch.float32:
            continue
        # the normalized dim sharded: gathered, computed whole
        run_case(mesh, ln, ln64, (x, w, b), (S(2), Rep, Rep), Rep, label="layer_norm Shard(2)")
        run_case(mesh, rms, rms64, (x, w), (S(2), Rep), Rep, label="rms_norm Shard(2)")
        # a sharded weight is gathered too
        run_case(mesh, ln, ln64, (x, w, b), (S(1), S(0), Rep), S(1), label="layer_norm weight Shard(0)")
        # no weight / bias: the empty gradient placeholders
        run_case(
            mesh,
            lambda x: ops.layer_norm(x, [24]),
            lambda x: R64.layer_norm(x, [24], None, None, 1e-5),
            (x,),
            (S(0),),
            S(0),
            label="layer_norm no affine",
        )
        run_case(
            mesh,
            lambda x: ops.rms_norm(x, [24], None, 1e-6),
            lambda x: R64.rms_norm(x, [24], None, 1e-6),
            (x,),
            (S(1),),
            S(1),
            label="rms_norm no weight",
        )
        # a strided (transposed) input and a normalized shape of two dims
        xt = torch.randn(5, 3, 24).transpose(0, 1)
        run_case(mesh, ln, ln64, (xt, w, b), (S(0), Rep, Rep), S(0), label="layer_norm strided")
        x4 = torch.randn(4, 3, 6, 8)
        run_case(
            mesh,
            lambda x: ops.layer_norm(x, [6, 8]),
            lambda x: R64.layer_norm(x, [6, 8], None, None, 1e-5),
            (x4,),
            (S(1),),
            S(1),
            label="layer_norm 2-D normalized shape",
        )
        run_case(
            mesh,
            lambda x: ops.layer_norm(x, [6, 8]),
            lambda x: R64.layer_norm(x, [6, 8], None, None, 1e-5),
            (x4,),
            (S(2),),
            Rep,
            label="layer_norm 2-D normalized shape, dim 2 sharded",
        )


def check_llm_norms(mesh) -> None:
    """rms_norm's offset and casting order, add_rms_norm with a float32 residual stream: rows
    sharded; input dropout (a mask of the global element index): replicated."""
    S, Rep, _ = _placements()
    for dtype in DTYPES:
        x, res = torch.randn(3, 5, 24, dtype=dtype), torch.randn(3, 5, 24)
        w = torch.randn(24, dtype=dtype)
        half = dtype != torch.float32
        cast_to = dtype if half else None
        for d in (0, 1):
            run_case(
                mesh,
                lambda x, w: ops.rms_norm(x, [24], w, 1e-6, offset=1.0, cast_before_weight=True),
                lambda x, w, cast_to=cast_to: R64.rms_norm(x, [24], w, 1e-6, 1.0, cast_to),
                (x, w),
                (S(d), Rep),
                S(d),
                label=f"rms_norm offset llama order {dtype} Shard({d})",
            )
            run_case(
                mesh,
                lambda x, r, w: ops.add_rms_norm(x, r, [24], w, 1e-6, residual_in_fp32=True),
                lambda x, r, w: R64.add_rms_norm(x, r, [24], w, 1e-6, round_to=torch.float32),
                (x, res.to(torch.float32 if half else dtype), w),
                (S(d), S(d), Rep),
                S(d),
                label=f"add_rms_norm residual_in_fp32 {dtype} Shard({d})",
            )

    x, res, w = torch.randn(4, 6, 16), torch.randn(4, 6, 16), torch.randn(16)

    def dropped(fn):
        def run(x, r, w):
            torch.manual_seed(3)  # the same seed on every rank and for the whole-tensor run
            return fn(x, r, w)

        return run

    run_case(
        mesh,
        dropped(lambda x, r, w: ops.add_rms_norm(x, r, [16], w, 1e-6, dropout_p=0.3)),
        None,
        (x, res, w),
        (S(0), S(0), Rep),
        Rep,
        label="add_rms_norm dropout",
    )
    run_case(
        mesh,
        dropped(lambda x, r, w: ops.add_layer_norm(x, r, [16], w, None, dropout_p=0.3)),
        None,
        (x, res, w),
        (S(1), S(1), Rep),
        Rep,
        label="add_layer_norm dropout",
    )


def check_triton_backend_on_shards(mesh) -> None:
    """The rules are backend-free: each rank runs the same op, whichever backend takes it (the
    Triton kernels here, through the interpreter)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return
    import llmkit

    S, Rep, _ = _placements()
    with llmkit.use_backend("triton"):
        x, w, b = torch.randn(3, 5, 16), torch.randn(16), torch.randn(16)
        run_case(
            mesh,
            lambda x, w, b: ops.layer_norm(x, [16], w, b),
            lambda x, w, b: R64.layer_norm(x, [16], w, b, 1e-5),
            (x, w, b),
            (S(1), Rep, Rep),
            S(1),
            label="triton layer_norm",
        )
        fn, ref = _sdpa(True, True)
        q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
        run_case(mesh, fn, ref, (q, k, v), (S(1),) * 3, S(1), label="triton attention")


def check_strategy_cache_keys_on_values(mesh) -> None:
    """DTensor caches a strategy per call signature: the same input placements with another
    normalized_shape, dropout_p or activation must get their own strategy, not the cached one."""
    S, Rep, _ = _placements()
    x = torch.randn(4, 6, 8)
    run_case(
        mesh,
        lambda x: ops.layer_norm(x, [8]),
        lambda x: R64.layer_norm(x, [8], None, None, 1e-5),
        (x,),
        (S(1),),
        S(1),
        grad=False,
        label="layer_norm [8]",
    )
    run_case(
        mesh,
        lambda x: ops.layer_norm(x, [6, 8]),
        lambda x: R64.layer_norm(x, [6, 8], None, None, 1e-5),
        (x,),
        (S(1),),
        Rep,
        grad=False,
        label="layer_norm [6, 8] after [8]",
    )
    xi = torch.randn(3, 4, 16)
    wq, ws = ops.quantize_int8(torch.randn(10, 16))
    bias = torch.randn(10)
    for act in ("none", "gelu"):
        expect = _placements()[2] if act == "none" else None  # row-wise only without activation
        run_case(
            mesh,
            lambda x, w, s, b: ops.int8_linear(x, w, s, b, mode="w8a16", activation=act),  # noqa: B023
            lambda x, w, s, b: R64.int8_linear(x, w, s, b, "w8a16", act),  # noqa: B023
            (xi, wq, ws, bias),
            (S(2), S(1), Rep, Rep),
            expect,
            grad=False,
            label=f"int8_linear w8a16 {act}",
        )
    # dropout_p is checked in check_attention_dropout_replicates


# -- GELU -------------------------------------------------------------------------------


def check_gelu(mesh) -> None:
    S, Rep, _ = _placements()
    for dtype in DTYPES:
        x = torch.randn(3, 5, 12, dtype=dtype)
        bias = torch.randn(12, dtype=dtype)
        for approx in ("none", "tanh"):
            tag = f"{dtype} {approx}"
            for d in range(3):  # pointwise: any dim, the hidden one included
                run_case(
                    mesh,
                    lambda x, a=approx: ops.gelu(x, a),
                    lambda x, a=approx: R64.gelu(x, a),
                    (x,),
                    (S(d),),
                    S(d),
                    label=f"gelu {tag} Shard({d})",
                )
            for d in (0, 1):
                run_case(
                    mesh,
                    lambda x, b: ops.bias_gelu(x, b, approx),  # noqa: B023
                    lambda x, b: R64.bias_gelu(x, b, approx),  # noqa: B023
                    (x, bias),
                    (S(d), Rep),
                    S(d),
                    label=f"bias_gelu {tag} Shard({d})",
                )
            # ColwiseParallel's output and bias: the hidden dim with the bias sharded alike
            run_case(
                mesh,
                lambda x, b: ops.bias_gelu(x, b, approx),  # noqa: B023
                lambda x, b: R64.bias_gelu(x, b, approx),  # noqa: B023
                (x, bias),
                (S(2), S(0)),
                S(2),
                label=f"bias_gelu {tag} hidden sharded",
            )
        # hidden dim sharded but the bias replicated: the bias is split to match
        run_case(
            mesh,
            lambda x, b: ops.bias_gelu(x, b),
            lambda x, b: R64.bias_gelu(x, b),
            (x, bias),
            (S(2), Rep),
            S(2),
            label=f"bias_gelu {dtype} replicated bias",
        )


# -- GeGLU / SwiGLU ---------------------------------------------------------------------


def check_glu(mesh) -> None:
    S, Rep, _ = _placements()
    for dtype in DTYPES:
        gate, up = torch.randn(3, 5, 12, dtype=dtype) * 3, torch.randn(3, 5, 12, dtype=dtype)
        for d in range(3):  # elementwise: any dim, the hidden one (ColwiseParallel's output) included
            run_case(mesh, ops.swiglu, R64.swiglu, (gate, up), (S(d), S(d)), S(d), label=f"swiglu {dtype} Shard({d})")
            for approx in ("none", "tanh"):
                run_case(
                    mesh,
                    lambda g, u, a=approx: ops.geglu(g, u, a),
                    lambda g, u, a=approx: R64.geglu(g, u, a),
                    (gate, up),
                    (S(d), S(d)),
                    S(d),
                    label=f"geglu {approx} {dtype} Shard({d})",
                )
    # gate and up placed differently: redistributed to one placement, never computed mixed
    gate, up = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    run_case(mesh, ops.swiglu, R64.swiglu, (gate, up), (S(0), S(2)), None, label="swiglu mixed placements")
    run_case(mesh, ops.swiglu, R64.swiglu, (gate, up), (S(1), Rep), None, label="swiglu one replicated")


# -- attention --------------------------------------------------------------------------


def _sdpa(is_causal: bool, gqa: bool, scale: float | None = None):
    def fn(q, k, v, m=None):
        return ops.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal, enable_gqa=gqa, scale=scale)

    def ref(q, k, v, m=None):
        return R64.attention(q, k, v, m, is_causal, scale, gqa)

    return fn, ref


def check_attention(mesh) -> None:
    S, Rep, _ = _placements()
    for dtype in DTYPES:
        q, k, v = (torch.randn(2, 4, 7, 8, dtype=dtype) for _ in range(3))
        fn, ref = _sdpa(True, False)
        for d in (0, 1):
            run_case(mesh, fn, ref, (q, k, v), (S(d),) * 3, S(d), label=f"sdpa causal {dtype} Shard({d})")
    fn, ref = _sdpa(False, False)
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    # query rows sharded without is_causal: key and value gathered, dK / dV partial
    run_case(mesh, fn, ref, (q, k, v), (S(2), S(2), S(2)), S(2), label="sdpa query rows")
    # causal query rows cannot be sharded (row i sees keys <= i): gathered
    fnc, refc = _sdpa(True, False)
    run_case(mesh, fnc, refc, (q, k, v), (S(2),) * 3, None, label="sdpa causal rows")
    # masks: per-head float mask sharded with the heads (its gradient too); a key-padding
    # mask (B, 1, 1, Sk) replicated over heads (its gradient partial)
    mask = torch.randn(2, 4, 7, 7)
    run_case(mesh, fn, ref, (q, k, v, mask), (S(1),) * 3 + (S(1),), S(1), label="sdpa per-head float mask")
    pad = torch.randn(2, 1, 1, 7)
    run_case(mesh, fn, ref, (q, k, v, pad), (S(1),) * 3 + (Rep,), S(1), label="sdpa broadcast float mask, heads")
    run_case(mesh, fn, ref, (q, k, v, pad), (S(0),) * 3 + (S(0),), S(0), label="sdpa broadcast float mask, batch")
    boolmask = torch.rand(2, 1, 7, 7) > 0.3
    run_case(mesh, fn, ref, (q, k, v, boolmask), (S(2), Rep, Rep, S(2)), S(2), label="sdpa bool mask, rows")
    # strided (B, S, H, D) views, as HuggingFace projections give them
    qs, ks, vs = (torch.randn(2, 7, 4, 8).transpose(1, 2) for _ in range(3))
    run_case(mesh, fnc, refc, (qs, ks, vs), (S(1),) * 3, S(1), label="sdpa strided")


def check_attention_gqa(mesh) -> None:
    S, Rep, _ = _placements()
    fn, ref = _sdpa(True, True)
    # 8 query heads on 2 key/value heads: each rank holds one whole group
    q, k, v = torch.randn(2, 8, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    run_case(mesh, fn, ref, (q, k, v), (S(1),) * 3, S(1), label="gqa whole groups")
    # 6 query heads on 3 key/value heads: 2 ranks would split a group, so the heads are
    # not sharded (a local group of 3 / 2 would map query heads to the wrong key heads)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    run_case(mesh, fn, ref, (q, k, v), (S(1),) * 3, None, label="gqa split groups")
    from torch.distributed.tensor import distribute_tensor

    out = fn(*(distribute_tensor(t, mesh, [S(1)]) for t in (q, k, v)))
    assert tuple(out.placements) != (S(1),), f"gqa split groups ran head-sharded: {out.placements}"


def check_attention_llm_options(mesh) -> None:
    """ALiBi slopes sharded with the heads / batch they have; a sliding window with bottom-right
    alignment never shards the query rows (the scores depend on the global row index)."""
    S, Rep, _ = _placements()

    def fn(q, k, v, slopes):
        return ops.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            causal_alignment="bottom_right",
            window_size=(3, -1),
            softcap=2.0,
            alibi_slopes=slopes,
        )

    def ref(q, k, v, slopes):
        return R64.attention_llm(
            q, k, v, None, True, bottom_right=True, window=(3, -1), softcap=2.0, alibi_slopes=slopes
        )[0]

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    heads, batch_heads = torch.rand(4), torch.rand(2, 4)
    run_case(mesh, fn, ref, (q, k, v, heads), (S(1),) * 3 + (S(0),), S(1), grad=False, label="alibi (Hq,), heads")
    run_case(mesh, fn, ref, (q, k, v, heads), (S(0),) * 3 + (Rep,), S(0), grad=False, label="alibi (Hq,), batch")
    run_case(
        mesh, fn, ref, (q, k, v, batch_heads), (S(0),) * 3 + (S(0),), S(0), grad=False, label="alibi (B, Hq), batch"
    )
    run_case(
        mesh, fn, ref, (q, k, v, batch_heads), (S(2), Rep, Rep, Rep), None, grad=False, label="window rows gathered"
    )


def check_attention_dropout_replicates(mesh) -> None:
    """Dropout's keep mask is a function of the element's global index: a sharded run would
    draw other masks, so the op runs replicated and equals the whole-tensor op exactly."""
    S, Rep, _ = _placements()
    from torch.distributed.tensor import distribute_tensor

    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    fn, _ = _sdpa(False, False)
    run_case(mesh, fn, None, (q, k, v), (S(1),) * 3, S(1), grad=False, label="no dropout first (cached)")
    torch.manual_seed(7)
    want = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    dts = [distribute_tensor(t, mesh, [S(1)]) for t in (q, k, v)]
    torch.manual_seed(7)
    got = ops.scaled_dot_product_attention(*dts, dropout_p=0.3)
    assert tuple(got.placements) == (Rep,), got.placements
    assert torch.equal(got.full_tensor(), want)
    # backward, replicated too
    leaves = [t.detach().requires_grad_() for t in dts]
    plain = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    ops.scaled_dot_product_attention(*leaves, dropout_p=0.3).sum().backward()
    torch.manual_seed(7)
    ops.scaled_dot_product_attention(*plain, dropout_p=0.3).sum().backward()
    for a, b in zip(leaves, plain, strict=True):
        torch.testing.assert_close(a.grad.full_tensor(), b.grad, atol=1e-6, rtol=1e-5)


def check_decode_attention(mesh) -> None:
    S, Rep, _ = _placements()
    b, hq, hkv, t, s_max = 4, 8, 2, 2, 9
    q = torch.randn(b, hq, t, 16)
    kc, vc = torch.randn(b, hkv, s_max, 16), torch.randn(b, hkv, s_max, 16)
    lens = torch.tensor([9, 3, 5, 2], dtype=torch.int32)

    def fn(q, kc, vc, lens):
        return ops.decode_attention(q, kc, vc, lens)

    def ref(q, kc, vc, lens):
        return R64.decode_attention(q, kc, vc, lens, None, True)

    run_case(mesh, fn, ref, (q, kc, vc, lens), (S(0), S(0), S(0), S(0)), S(0), grad=False, label="decode batch")
    run_case(mesh, fn, ref, (q, kc, vc, lens), (S(1), S(1), S(1), Rep), S(1), grad=False, label="decode heads")

    # a paged cache of 3-slot blocks (sequence i's blocks scattered through the pool) and its lse
    bs, blocks = 3, torch.randperm(16).to(torch.int32).view(b, 4)
    pk, pv = torch.randn(16, bs, hkv, 16), torch.randn(16, bs, hkv, 16)
    for i in range(b):
        for j in range(s_max):
            pk[blocks[i, j // bs], j % bs], pv[blocks[i, j // bs], j % bs] = kc[i, :, j], vc[i, :, j]

    def paged(q, pk, pv, lens, blocks):
        return ops.decode_attention(q, pk, pv, lens, block_table=blocks, return_lse=True)

    def paged_ref(q, pk, pv, lens, blocks):
        return ref(q, kc.to(q.dtype), vc.to(q.dtype), lens), None

    args = (q, pk, pv, lens, blocks)
    run_case(mesh, paged, paged_ref, args, (S(0), Rep, Rep, S(0), S(0)), S(0), grad=False, label="paged batch")
    run_case(mesh, paged, paged_ref, args, (S(1), S(2), S(2), Rep, Rep), S(1), grad=False, label="paged heads")


# -- int8 -------------------------------------------------------------------------------


def check_varlen_attention(mesh) -> None:
    """Packed sequences: heads sharded (lse (Hq, total) on dim 0), cu_seqlens replicated, ALiBi
    slopes with their heads; against the whole-tensor op and float64 (backward without slopes,
    which take no gradient)."""
    S, Rep, _ = _placements()
    lengths = [3, 0, 6, 1]
    cu = torch.tensor([0, 3, 3, 9, 10], dtype=torch.int32)
    q, k, v = torch.randn(10, 8, 8), torch.randn(10, 4, 8), torch.randn(10, 4, 8)
    m = max(lengths)

    def fn(q, k, v, cu, slopes=None):
        return ops.varlen_attention(
            q,
            k,
            v,
            cu,
            cu,
            m,
            m,
            is_causal=True,
            window_size=(2, -1),
            alibi_slopes=slopes,
            enable_gqa=True,
            return_lse=True,
        )

    def ref(q, k, v, cu, slopes=None):
        outs, lses = [], []
        for b in range(len(lengths)):
            s, e = int(cu[b]), int(cu[b + 1])
            if s == e:
                continue
            dense = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
            o, lse = R64.attention_llm(*dense, None, True, window=(2, -1), alibi_slopes=slopes)
            outs.append(o[0].transpose(0, 1))
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, 1)

    run_case(mesh, fn, ref, (q, k, v, cu), (S(1), S(1), S(1), Rep), S(1), label="varlen heads")
    run_case(
        mesh,
        fn,
        ref,
        (q, k, v, cu, torch.rand(8)),
        (S(1), S(1), S(1), Rep, S(0)),
        S(1),
        grad=False,
        label="varlen heads, alibi",
    )


def check_int8(mesh) -> None:
    S, Rep, P = _placements()
    x = torch.randn(5, 6, 8)
    for d, dim in ((0, -1), (1, -1), (2, 0)):
        run_case(
            mesh,
            lambda x, dm=dim: ops.quantize_int8(x, dm),
            lambda x, dm=dim: R64.quantize_int8(x, dm),
            (x,),
            (S(d),),
            S(d),
            grad=False,
            label=f"quantize_int8 Shard({d}) dim {dim}",
        )
    run_case(
        mesh,
        lambda x: ops.quantize_int8(x, -1),
        lambda x: R64.quantize_int8(x, -1),
        (x,),
        (S(2),),
        Rep,
        grad=False,
        label="quantize_int8 along the sharded dim",
    )
    a, b = torch.randint(-127, 128, (6, 16), dtype=torch.int8), torch.randint(-127, 128, (16, 10), dtype=torch.int8)
    mm = lambda a, b: ops.int8_matmul(a, b)  # noqa: E731
    run_case(mesh, mm, None, (a, b), (S(0), Rep), S(0), grad=False, label="int8_matmul rows")
    run_case(mesh, mm, None, (a, b), (Rep, S(1)), S(1), grad=False, label="int8_matmul columns")
    run_case(mesh, mm, None, (a, b), (S(1), S(0)), P, grad=False, label="int8_matmul K (exact partial sums)")
    sa, sb, bias = torch.rand(6) + 0.1, torch.rand(10) + 0.1, torch.randn(10)

    def mms(a, b, sa, sb, bias):
        return ops.int8_matmul(a, b, sa, sb, bias)

    def mms64(a, b, sa, sb, bias):
        return R64.int8_matmul(a, b).to(F64) * sa[:, None] * sb[None, :] + bias

    run_case(
        mesh,
        mms,
        mms64,
        (a, b, sa, sb, bias),
        (S(0), Rep, S(0), Rep, Rep),
        S(0),
        grad=False,
        label="int8_matmul scaled rows",
    )
    run_case(
        mesh,
        mms,
        mms64,
        (a, b, sa, sb, bias),
        (Rep, S(1), Rep, S(0), S(0)),
        S(1),
        grad=False,
        label="int8_matmul scaled columns",
    )
    run_case(
        mesh,
        mms,
        mms64,
        (a, b, sa, sb, bias),
        (S(1), S(0), Rep, Rep, Rep),
        None,
        grad=False,
        label="int8_matmul scaled, K sharded: gathered",
    )
    xi = torch.randn(3, 5, 16)
    wq, ws = ops.quantize_int8(torch.randn(10, 16))
    lb = torch.randn(10)
    for mode in ("w8a8", "w8a16"):

        def lin(x, w, s, b):
            return ops.int8_linear(x, w, s, b, mode=mode, activation="gelu")  # noqa: B023

        def lin64(x, w, s, b):
            return R64.int8_linear(x, w, s, b, mode, "gelu")  # noqa: B023

        run_case(
            mesh,
            lin,
            lin64,
            (xi, wq, ws, lb),
            (S(1), Rep, Rep, Rep),
            S(1),
            grad=False,
            label=f"int8_linear {mode} rows",
        )
        run_case(
            mesh,
            lin,
            lin64,
            (xi, wq, ws, lb),
            (Rep, S(0), S(0), S(0)),
            S(2),
            grad=False,
            label=f"int8_linear {mode} column-wise",
        )

        def plain(x, w, s, b):
            return ops.int8_linear(x, w, s, b, mode=mode)  # noqa: B023

        def plain64(x, w, s, b):
            return R64.int8_linear(x, w, s, b, mode, "none")  # noqa: B023

        # row-wise: W8A16 gives partial sums; W8A8 needs each input row whole (its absmax)
        run_case(
            mesh,
            plain,
            plain64,
            (xi, wq, ws, lb),
            (S(2), S(1), Rep, Rep),
            P if mode == "w8a16" else None,
            grad=False,
            label=f"int8_linear {mode} row-wise",
        )


def check_2d_mesh(mesh) -> None:
    """Rules are written for one mesh dim; DTensor combines them over each dim of a 2-D mesh
    (1 x 2 and 2 x 1 here: data parallel x tensor parallel)."""
    from torch.distributed.device_mesh import init_device_mesh

    S, Rep, _ = _placements()
    for shape in ((1, 2), (2, 1)):
        mesh2 = init_device_mesh("cpu", shape)
        x, w, b = torch.randn(4, 6, 16), torch.randn(16), torch.randn(16)
        run_case(
            mesh2,
            lambda x, w, b: ops.layer_norm(x, [16], w, b),
            lambda x, w, b: R64.layer_norm(x, [16], w, b, 1e-5),
            (x, w, b),
            ((S(0), S(1)), (Rep, Rep), (Rep, Rep)),
            (S(0), S(1)),
            label=f"layer_norm {shape}",
        )
        run_case(mesh2, lambda x: ops.gelu(x), R64.gelu, (x,), ((S(1), S(2)),), (S(1), S(2)), label=f"gelu {shape}")
        fn, ref = _sdpa(True, True)
        q, k, v = torch.randn(2, 8, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
        run_case(mesh2, fn, ref, (q, k, v), ((S(0), S(1)),) * 3, (S(0), S(1)), label=f"gqa batch x heads {shape}")
        # heads sharded over both mesh dims: 2 key/value heads still split evenly on 2 ranks
        run_case(mesh2, fn, ref, (q, k, v), ((S(1), S(1)),) * 3, None, label=f"gqa heads x heads {shape}")
        xi = torch.randn(3, 5, 16)
        wq, ws = ops.quantize_int8(torch.randn(10, 16))
        run_case(
            mesh2,
            lambda x, w, s: ops.int8_linear(x, w, s, None, mode="w8a16"),
            lambda x, w, s: R64.int8_linear(x, w, s, None, "w8a16", "none"),
            (xi, wq, ws),
            ((S(0), Rep), (Rep, S(0)), (Rep, S(0))),
            (S(0), S(2)),
            grad=False,
            label=f"int8_linear rows x columns {shape}",
        )


CHECKS = {
    "ops_norms": check_norms,
    "ops_llm_norms": check_llm_norms,
    "ops_triton_backend_on_shards": check_triton_backend_on_shards,
    "ops_strategy_cache_keys_on_values": check_strategy_cache_keys_on_values,
    "ops_gelu": check_gelu,
    "ops_glu": check_glu,
    "ops_attention": check_attention,
    "ops_attention_gqa": check_attention_gqa,
    "ops_attention_llm_options": check_attention_llm_options,
    "ops_attention_dropout_replicates": check_attention_dropout_replicates,
    "ops_decode_attention": check_decode_attention,
    "ops_varlen_attention": check_varlen_attention,
    "ops_int8": check_int8,
    "ops_2d_mesh": check_2d_mesh,
}
