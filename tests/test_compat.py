"""llmkit._compat: every private torch / Triton / transformers API llmkit uses.

For each: it exists on the tested versions (an upgrade that removes it fails here, loudly,
instead of silently taking the fallback), it computes what llmkit expects, and the
fallback computes the same.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from llmkit import _compat as C

# -- torch ----------------------------------------------------------------------------------


def test_int_mm_exists_and_matches_the_exact_fallback(monkeypatch):
    assert C.HAS_INT_MM, "torch._int_mm is gone: llmkit's CPU int8 GEMM now takes the float64 fallback"
    a = torch.randint(-127, 128, (37, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 24), dtype=torch.int8)
    want = (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
    assert torch.equal(C.int_mm(a, b), want)
    monkeypatch.setattr(C, "HAS_INT_MM", False)
    assert torch.equal(C.int_mm(a, b), want)


def _int8_layouts(rows: int, cols: int) -> dict[str, torch.Tensor]:
    """One int8 (rows, cols) matrix in every layout class torch._int_mm's CPU GEMM sees,
    each holding the same values where it can (the expanded ones repeat a row / column)."""
    t = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    wide = torch.zeros(rows + 3, 2 * cols + 5, dtype=torch.int8)
    wide[1 : rows + 1, 2 : 2 * cols + 2 : 2] = t
    tall = torch.zeros(2 * cols + 1, 3 * rows + 1, dtype=torch.int8)
    tall[::2][:cols, ::3][:, :rows] = t.t()
    out = {
        "row-major": t,
        "column-major": t.t().contiguous().t(),
        "padded rows": torch.cat([t, t], 1)[:, :cols],
        "strided both ways": wide[1 : rows + 1, 2 : 2 * cols + 2 : 2],
        "strided transposed": tall[::2][:cols, ::3][:, :rows].t(),
        "expanded rows (stride 0)": t[:1].expand(rows, cols),
        "expanded columns (stride 0)": t[:, :1].expand(rows, cols),
        "one value expanded (strides 0, 0)": t[:1, :1].expand(rows, cols),
    }
    if rows == 1 or cols == 1:  # a size-1 dimension with stride 1: the transposed weight of Linear(1, N)
        out["size-1 dim with strides (1, 1)"] = t.contiguous().as_strided((rows, cols), (1, 1))
    return out


@pytest.mark.parametrize(
    "m,k,n", [(5, 1, 64), (1, 1, 7), (64, 1, 64), (3, 8, 1), (17, 33, 1), (1, 8, 5), (7, 3, 9), (40, 64, 48)]
)
def test_int_mm_is_exact_for_every_layout(m, k, n):
    """torch._int_mm (oneDNN on AVX512-VNNI CPUs) leaves its output unwritten for stride-0
    operands and for a (1, N) operand with strides (1, 1); int_mm gives it layouts it reads."""
    for la, a in _int8_layouts(m, k).items():
        for lb, b in _int8_layouts(k, n).items():
            want = (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
            for _ in range(2):  # unwritten memory differs from call to call
                got = C.int_mm(a, b)
                assert torch.equal(got, want), f"a {la} {a.stride()}, b {lb} {b.stride()}"
            fixed = C.int_mm_operand(b)
            assert torch.equal(fixed, b)
            if b.stride() in ((n, 1), (1, k)) or (b.stride()[0] > 1 and b.stride()[1] > 1):
                assert fixed.data_ptr() == b.data_ptr()  # a layout _int_mm reads: no copy


def test_cpu_flash_attention_exists_and_matches_the_math():
    assert C.HAS_CPU_FLASH_ATTENTION, "ATen's CPU flash attention is gone: the reference takes its math path"
    q, k, v = (torch.randn(2, 3, 17, 16, dtype=torch.float64).float() for _ in range(3))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = C.cpu_flash_attention(q.detach(), k.detach(), v.detach(), True, None, None)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want.detach(), atol=1e-5, rtol=1e-5)
    scores = (q.detach() @ k.detach().transpose(-1, -2)) / 4.0
    scores = scores.masked_fill(~torch.ones(17, 17, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    dq, dk, dv = torch.autograd.grad(want, (q, k, v), g)
    got = C.cpu_flash_attention_backward(g, q.detach(), k.detach(), v.detach(), out, lse, True, None, None)
    for x, y in zip(got, (dq, dk, dv), strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_reference_attention_without_cpu_flash_attention(monkeypatch):
    import llmkit
    from llmkit.backends.reference import attention as A

    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    with llmkit.use_backend("reference"):
        want = llmkit.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        monkeypatch.setattr(A, "HAS_CPU_FLASH_ATTENTION", False)
        got = llmkit.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_causal_bias_variant_reads_torchs_causal_bias_objects():
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    assert C.causal_bias_variant(causal_upper_left(4, 9)) == ("top_left", 4, 9)
    assert C.causal_bias_variant(causal_lower_right(5, 3)) == ("bottom_right", 5, 3)
    assert C.causal_bias_variant(torch.ones(4, 9, dtype=torch.bool)) is None
    assert C.causal_bias_variant(None) is None


def test_fused_rms_norm_exists_and_matches_its_fallback(monkeypatch):
    assert C.HAS_FUSED_RMS_NORM, "aten._fused_rms_norm is gone: the reference RMSNorm takes its ATen-ops fallback"
    x, w = torch.randn(5, 7, 33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    want = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w
    out, rstd = C.fused_rms_norm(x, [33], w, 1e-6)
    torch.testing.assert_close(out, want)
    assert rstd.numel() == 35
    monkeypatch.setattr(C, "_FUSED_RMS_NORM", None)
    out2, rstd2 = C.fused_rms_norm(x, [33], w, 1e-6)
    torch.testing.assert_close(out2, want)
    torch.testing.assert_close(rstd2.reshape(-1), rstd.reshape(-1))


def test_onednn_linear_exists_where_onednn_does_and_matches_f_linear():
    if not torch.backends.mkldnn.is_available():
        assert C.ONEDNN_LINEAR is None
        pytest.skip("this torch build has no oneDNN")
    assert C.ONEDNN_LINEAR is not None, "mkldnn._linear_pointwise is gone: swapped blocks use F.linear"
    x, w, b = torch.randn(6, 32), torch.randn(48, 32), torch.randn(48)
    torch.testing.assert_close(C.ONEDNN_LINEAR(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        C.ONEDNN_LINEAR(x, w, b, "gelu", [], "tanh"),
        F.gelu(F.linear(x, w, b), approximate="tanh"),
        atol=1e-5,
        rtol=1e-5,
    )


def test_mode_probes_exist_and_see_modes():
    assert C.HAS_MODE_STACKS, "torch._C's mode-stack probes are gone: every op call takes the custom-op path"
    assert C.no_active_modes()

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert not C.no_active_modes()
    seen = []
    torch.vmap(lambda t: seen.append(C.no_active_modes()) or t)(torch.ones(2, 3))
    assert seen == [False]


def test_no_active_modes_is_false_without_the_probes(monkeypatch):
    monkeypatch.setattr(C, "HAS_MODE_STACKS", False)
    assert not C.no_active_modes()


def test_dispatch_has_kernel():
    assert C.dispatch_has_kernel("aten::add.Tensor", "CPU")
    assert not C.dispatch_has_kernel("llmkit_no_such::op", "CPU")


# -- Triton ---------------------------------------------------------------------------------


def test_dtensor_strategy_api_exists():
    pytest.importorskip("torch.distributed")
    assert C.dtensor_strategy_api() is None, (
        f"DTensor's op-strategy registry changed ({C.dtensor_strategy_api()}): llmkit's ops lose their "
        "sharding strategies"
    )


def test_first_value_arg_skips_tensors_and_optional_tensors():
    import llmkit  # noqa: F401  (defines the ops)

    ops = torch.ops.llmkit
    assert C.first_value_arg(ops.layer_norm.default) == 1  # (input, normalized_shape, ...)
    assert C.first_value_arg(ops.layer_norm_backward.default) == 2
    assert C.first_value_arg(ops.scaled_dot_product_attention.default) == 4  # after attn_mask
    assert C.first_value_arg(ops.int8_linear.default) == 4  # after the optional bias


DTENSOR_CACHE_PROBE = """
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from llmkit import _compat as C

    @torch.library.custom_op("llmkit_probe::rows", mutates_args=())
    def rows(x: torch.Tensor, tag: str, k: int) -> torch.Tensor:
        return x * k

    @rows.register_fake
    def _(x, tag, k):
        return torch.empty_like(x)

    seen = []

    def placements(x, tag, k):
        seen.append((tag, k))
        return [([Replicate()], [Replicate(), None, None]), ([Shard(0)], [Shard(0), None, None])]

    refused = []

    def is_valid(inputs, output):
        refused.append(output.placements)
        return output.placements != (Shard(0),)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    C.register_dtensor_strategy(torch.ops.llmkit_probe.rows.default, placements, is_valid)
    mesh = init_device_mesh("cpu", (1,))
    x = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
    outs = [rows(x, "a", 2), rows(x, "a", 2), rows(x, "b", 2), rows(x, "a", 3)]
    print(seen)
    print([str(tuple(o.placements)) for o in outs])
    print((Shard(0),) in refused)
    dist.destroy_process_group()
"""


def test_registered_dtensor_strategy_is_keyed_on_every_value_and_filtered():
    """DTensor caches a strategy per call signature; with llmkit's registration a string or
    int argument changes the key (register_sharding would reuse the strategy of "a" for "b"),
    and ``is_valid`` removes combinations."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_gloo_available():
        pytest.skip("needs gloo")
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DTENSOR_CACHE_PROBE)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, GLOO_SOCKET_IFNAME="lo"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    seen, placements, refused = (ast.literal_eval(line) for line in res.stdout.split("\n")[:3])
    assert seen == [("a", 2), ("b", 2), ("a", 3)], seen  # a new value: a new strategy
    assert placements == ["(Replicate(),)"] * 4, placements  # Shard(0) was refused
    assert refused


def test_triton_interpreting_follows_the_environment():
    pytest.importorskip("triton")
    code = "from llmkit._compat import triton_interpreting; print(triton_interpreting())"
    for value, want in (("1", "True"), ("0", "False")):
        env = dict(os.environ, TRITON_INTERPRET=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want


def test_interpreter_runs_a_loop_over_a_runtime_scalar_on_this_stack():
    """Triton < 3.7's interpreter fails on numpy >= 2.4 at the first ``range()`` over a runtime
    scalar; llmkit's kernel modules patch it on import where needed. This runs such a loop
    in a fresh interpreter on whatever Triton / numpy this stack has."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch, triton, triton.language as tl
        import llmkit.kernels._common as common
        from llmkit import _compat

        @triton.jit
        def total(X, Y, n, BLOCK: tl.constexpr):
            acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                acc += tl.load(X + offs, mask=offs < n, other=0.0)
            tl.store(Y, tl.sum(acc, 0))

        x = torch.randn(101, dtype=torch.float64).float()
        y = torch.zeros(1)
        total[(1,)](x, y, 101, BLOCK=16)
        assert abs(float(y) - float(x.double().sum())) < 1e-4, (float(y), float(x.sum()))
        print(_compat.fix_triton_interpreter() is not None)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import numpy as np
    import triton

    needs_fix = C._version(triton.__version__) < (3, 7) and C.numpy_objects_to_int_of_1d()
    assert res.stdout.strip() == str(needs_fix), (triton.__version__, np.__version__)


def _specialization_probe(x_ptr, y_ptr, w_ptr, n, m, k, big, seed, f, flag, BLOCK):
    pass


def test_triton_launch_specialization_is_what_the_jit_derives(monkeypatch):
    """What a launch compiles: 16-byte aligned pointers and integers divisible by 16 marked,
    integers equal to 1 and None arguments as constants, i64 past the int32 range,
    ``do_not_specialize`` honoured. Through Triton's own binder, and by the fallback rules."""
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    _specialization_probe.__annotations__["BLOCK"] = tl.constexpr
    kernel = JITFunction(_specialization_probe, do_not_specialize=["seed"])
    x = torch.empty(64, dtype=torch.bfloat16)
    args = dict(x_ptr=x, y_ptr=x[1:], w_ptr=None, n=1, m=32, k=17, big=2**33, seed=48, f=0.5, flag=True, BLOCK=64)
    want_sig = {
        "x_ptr": "*bf16",
        "y_ptr": "*bf16",
        "w_ptr": "constexpr",
        "n": "constexpr",
        "m": "i32",
        "k": "i32",
        "big": "i64",
        "seed": "i32",
        "f": "fp32",
        "flag": "u1",
        "BLOCK": "constexpr",
    }
    want_const = {(2,): None, (3,): 1, (10,): 64}
    want_attrs = {(0,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]], (6,): [["tt.divisibility", 16]]}
    assert C.has_triton_jit_binder(), "Triton's JIT binder moved: the compile report now applies the rules itself"
    options = {"num_warps": 4}
    for label, got in (
        ("jit", C.triton_launch_specialization(kernel, args, options, 90)),
        ("rules", C._specialize_by_rule(kernel, args)),
    ):
        sig, const, attrs = got
        assert sig == want_sig, label
        assert {k: (v.value if hasattr(v, "value") else v) for k, v in const.items()} == want_const, label
        assert {k: v for k, v in attrs.items() if v} == want_attrs, label
    monkeypatch.setattr(C, "_jit_binder", lambda: None)
    assert C.triton_launch_specialization(kernel, args, options, 90) == C._specialize_by_rule(kernel, args)


def test_version_parsing():
    assert C._version("3.6.0") == (3, 6, 0)
    assert C._version("2.11.0+cu130") == (2, 11, 0)
    assert C._version("3.7.0rc1") == (3, 7, 0)
    assert C._version("3.9.0.dev20260101") == (3, 9, 0)


# -- transformers ---------------------------------------------------------------------------


def test_transformers_private_attributes_exist():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    assert hasattr(model.config, "_attn_implementation"), "config._attn_implementation is gone"
    assert callable(getattr(model, "_can_set_attn_implementation", None)), "_can_set_attn_implementation is gone"
    assert C.attn_implementation(model.config) == model.config._attn_implementation
    assert C.can_set_attn_implementation(model) is True


def test_can_set_attn_implementation_fallback():
    class Old:
        _supports_attention_backend = True

    assert C.can_set_attn_implementation(Old())
    assert not C.can_set_attn_implementation(object())


def test_cache_argument_name_is_one_llmkit_knows():
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert import modeling_bert
    from transformers.models.gpt2 import modeling_gpt2

    for fn in (
        modeling_gpt2.GPT2Attention.forward,
        modeling_gpt2.GPT2Block.forward,
        modeling_gpt2.GPT2LMHeadModel.forward,
        modeling_bert.BertSelfAttention.forward,
    ):
        import inspect

        params = inspect.signature(fn).parameters
        assert any(n in params for n in C.CACHE_KWARGS), f"{fn.__qualname__} takes neither cache nor past_key_values"
        assert C.cache_kwarg(fn) in params
    major_minor = C._version(transformers.__version__)[:2]
    if major_minor <= (5, 17):
        assert C.cache_kwarg(modeling_gpt2.GPT2Attention.forward) == "past_key_values"


def test_pop_cache_takes_either_name():
    for name in C.CACHE_KWARGS:
        kwargs = {name: "c", "other": 1}
        assert C.pop_cache(kwargs) == "c" and kwargs == {"other": 1}
    assert C.pop_cache({"other": 1}) is None


def test_tensor_version_counts_in_place_writes_and_is_none_for_inference_tensors():
    from llmkit._compat import tensor_version

    t = torch.zeros(3)
    v = tensor_version(t)
    assert isinstance(v, int)
    t.add_(1)
    assert tensor_version(t) == v + 1
    with torch.inference_mode():
        u = torch.zeros(3)
    assert tensor_version(u) is None
