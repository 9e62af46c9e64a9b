"""llmkit.nn LayerNorm / RMSNorm / GELU / MultiheadAttention against torch.nn, RMSNorm's LLM
options and GatedMLP against the models' code.

Each test builds the torch.nn module, loads its state dict into the llmkit module with
``strict=True`` and compares outputs and every gradient (input and parameters) in
float32 on the CPU within 1e-5, on fresh random data with odd sizes.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

import llmkit
import llmkit.nn as lnn

TOL = dict(atol=1e-5, rtol=1e-5)


def _twin(torch_module: nn.Module, llmkit_cls: type, *args, **kwargs) -> nn.Module:
    """An llmkit module with the torch module's weights, loaded strictly."""
    ours = llmkit_cls(*args, **kwargs)
    ours.load_state_dict(torch_module.state_dict(), strict=True)
    ours.train(torch_module.training)
    return ours


def _grads(module: nn.Module, inputs: list[torch.Tensor], out: torch.Tensor, g: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]
    leaves = [t for t in inputs if t.requires_grad] + params
    return torch.autograd.grad(out, leaves, g, allow_unused=True)


def _assert_same(a: nn.Module, b: nn.Module, make_inputs, call, tol=TOL):
    """Forward and backward of ``call(module, *inputs)`` agree between a and b."""
    xa = make_inputs()
    xb = [t.detach().clone().requires_grad_(t.requires_grad) for t in xa]
    out_a, out_b = call(a, *xa), call(b, *xb)
    torch.testing.assert_close(out_b, out_a, **tol)
    g = torch.randn_like(out_a)
    for ga, gb in zip(_grads(a, xa, out_a, g), _grads(b, xb, out_b, g), strict=True):
        if ga is None or gb is None:
            assert ga is None and gb is None
        else:
            torch.testing.assert_close(gb, ga, **tol)


# -- norms and GELU -------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,normalized", [((3, 7, 33), (33,)), ((1, 1023), (1023,)), ((2, 5, 6, 7), (6, 7)), ((0, 9), (9,))]
)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_torch(shape, normalized, affine, bias):
    ref = nn.LayerNorm(normalized, eps=1e-6, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            if bias:
                ref.bias.normal_()
    ours = _twin(ref, lnn.LayerNorm, normalized, eps=1e-6, elementwise_affine=affine, bias=bias)
    assert isinstance(ours, nn.LayerNorm) and repr(ours) == repr(ref)
    _assert_same(ref, ours, lambda: [(torch.randn(shape) * 3 + 1).requires_grad_()], lambda m, x: m(x))


def test_layer_norm_strided_input():
    ref = nn.LayerNorm(17)
    ours = _twin(ref, lnn.LayerNorm, 17)
    x = torch.randn(17, 5, 9).transpose(0, 2)[:, ::2]  # (9, 3, 17), non-contiguous
    torch.testing.assert_close(ours(x), ref(x), **TOL)


@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_torch(eps, affine):
    ref = nn.RMSNorm([5, 11], eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
    ours = _twin(ref, lnn.RMSNorm, [5, 11], eps=eps, elementwise_affine=affine)
    _assert_same(ref, ours, lambda: [torch.randn(3, 5, 11).requires_grad_()], lambda m, x: m(x))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(7,), (3, 1023), (0, 4)])
def test_gelu_matches_torch(approximate, shape):
    ref = nn.GELU(approximate=approximate)
    ours = lnn.GELU(approximate=approximate)
    assert repr(ours) == repr(ref)
    _assert_same(ref, ours, lambda: [(torch.randn(shape) * 4).requires_grad_()], lambda m, x: m(x))


class _GemmaStyle(nn.Module):
    """Gemma's RMSNorm (x_hat * (1 + w) in float32, cast back) and Llama's (w * x_hat.to(dtype))."""

    def __init__(self, n: int, offset: float, cast_before_weight: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.offset, self.cast = offset, cast_before_weight

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.cast:
            return (self.weight + self.offset) * h.to(x.dtype)
        return (h * (self.offset + self.weight.float())).to(x.dtype)


@pytest.mark.parametrize("offset,cast", [(1.0, False), (0.0, True), (1.0, True)])
def test_rms_norm_offset_and_casting_match_the_models(offset, cast):
    ref = _GemmaStyle(33, offset, cast)
    ours = lnn.RMSNorm(33, eps=1e-6, offset=offset, cast_before_weight=cast)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _assert_same(ref, ours, lambda: [torch.randn(4, 33).requires_grad_()], lambda m, x: m(x))
    assert f"offset={offset}" in repr(ours) if offset else "offset" not in repr(ours)


def test_rms_norm_with_offset_starts_as_identity_scale():
    m = lnn.RMSNorm(8, offset=1.0)
    assert torch.equal(m.weight, torch.zeros(8))
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), torch.nn.functional.rms_norm(x, [8]), **TOL)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_mlp_matches_the_unfused_code_and_loads_llama_mlp_weights(activation):
    transformers = pytest.importorskip("transformers")
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[activation]
    cfg = transformers.LlamaConfig(hidden_size=24, intermediate_size=40, num_attention_heads=4, hidden_act=act)
    ref = transformers.models.llama.modeling_llama.LlamaMLP(cfg)
    ours = _twin(ref, lnn.GatedMLP, 24, 40, activation)
    _assert_same(ref, ours, lambda: [torch.randn(2, 3, 24).requires_grad_()], lambda m, x: m(x))


def test_gated_mlp_refuses_an_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of 'silu', 'gelu', 'gelu_tanh', got 'relu'"):
        lnn.GatedMLP(8, 16, "relu")


def test_norm_state_dict_wrong_shape_raises_torch_error():
    with pytest.raises(RuntimeError, match="size mismatch"):
        lnn.LayerNorm(8).load_state_dict(nn.LayerNorm(9).state_dict(), strict=True)


# -- MultiheadAttention -----------------------------------------------------------------

E, H = 24, 3  # odd number of heads: torch.nn's own fast path never kicks in either


def _mha_pair(**kw):
    ref = nn.MultiheadAttention(E, H, **kw)
    with torch.no_grad():  # nonzero biases so that every bias gradient is exercised
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
    return ref, _twin(ref, lnn.MultiheadAttention, E, H, **kw)


def _masks(kind: str, b: int, sq: int, s: int):
    """(attn_mask, key_padding_mask, is_causal) of one kind, torch.nn conventions."""
    gen_pad = torch.zeros(b, s, dtype=torch.bool)
    gen_pad[:, s - 2 :] = True  # the last two keys are padding; every query keeps a key
    if kind == "none":
        return None, None, False
    if kind == "kpm_bool":
        return None, gen_pad, False
    if kind == "kpm_float":
        return None, torch.zeros(b, s).masked_fill(gen_pad, float("-inf")) + torch.randn(b, s), False
    if kind == "mask_bool":
        m = torch.rand(sq, s) < 0.3
        m[:, 0] = False
        return m, None, False
    if kind == "mask_float":
        return torch.randn(sq, s), None, False
    if kind == "mask3d_float":
        return torch.randn(b * H, sq, s), None, False
    if kind == "causal":
        return nn.Transformer.generate_square_subsequent_mask(sq), None, True
    if kind == "causal_kpm":
        m = torch.ones(sq, s, dtype=torch.bool).triu(1)
        kpm = torch.zeros(b, s, dtype=torch.bool)
        kpm[:, -1] = sq == s and s > 1
        return m, kpm, True
    if kind == "both_bool":
        m = torch.rand(sq, s) < 0.3
        m[:, 0] = False
        return m, gen_pad & (torch.arange(s) > 0), False
    raise AssertionError(kind)


MASK_KINDS = [
    "none",
    "kpm_bool",
    "kpm_float",
    "mask_bool",
    "mask_float",
    "mask3d_float",
    "causal",
    "causal_kpm",
    "both_bool",
]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("attn_kind", ["self", "cross_kv_same", "cross"])
def test_mha_matches_torch(batch_first, bias, mask_kind, attn_kind):
    b, sq = 3, 7
    s = sq if attn_kind == "self" or mask_kind.startswith("causal") else 9
    ref, ours = _mha_pair(bias=bias, batch_first=batch_first)
    attn_mask, kpm, is_causal = _masks(mask_kind, b, sq, s)

    def shape(n):
        return (b, n, E) if batch_first else (n, b, E)

    def make():
        q = torch.randn(shape(sq), requires_grad=True)
        if attn_kind == "self":
            return [q]
        k = torch.randn(shape(s), requires_grad=True)
        if attn_kind == "cross_kv_same":
            return [q, k]
        return [q, k, torch.randn(shape(s), requires_grad=True)]

    def call(m, q, k=None, v=None):
        k = q if k is None else k
        v = k if v is None else v
        out, w = m(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False, is_causal=is_causal)
        assert w is None
        return out

    _assert_same(ref, ours, make, call)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_kdim_vdim_and_unbatched(batch_first):
    ref, ours = _mha_pair(kdim=5, vdim=11, batch_first=batch_first)
    assert "q_proj_weight" in dict(ours.named_parameters())
    kpm = torch.zeros(9, dtype=torch.bool)
    kpm[-3:] = True

    def make():
        return [
            torch.randn(7, E, requires_grad=True),
            torch.randn(9, 5, requires_grad=True),
            torch.randn(9, 11, requires_grad=True),
        ]

    def call(m, q, k, v):
        return m(q, k, v, key_padding_mask=kpm, need_weights=False)[0]

    _assert_same(ref, ours, make, call)


@pytest.mark.parametrize("average", [True, False])
def test_mha_need_weights_takes_reference_path_and_says_so_once(average, caplog):
    from llmkit.nn import attention as attention_module

    attention_module._said.clear()
    ref, ours = _mha_pair(batch_first=True)
    x = torch.randn(2, 5, E)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        for _ in range(3):
            out, w = ours(x, x, x, key_padding_mask=kpm, average_attn_weights=average)
    ref_out, ref_w = ref(x, x, x, key_padding_mask=kpm, average_attn_weights=average)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)
    said = [r for r in caplog.records if "need_weights=True" in r.getMessage()]
    assert len(said) == 1 and "reference path" in said[0].getMessage()


@pytest.mark.parametrize("option", ["add_bias_kv", "add_zero_attn"])
def test_mha_unfused_options_work_through_reference(option):
    ref, ours = _mha_pair(**{option: True})
    _assert_same(
        ref, ours, lambda: [torch.randn(6, 2, E, requires_grad=True)], lambda m, x: m(x, x, x, need_weights=False)[0]
    )


def test_mha_eval_matches_torch_fast_path():
    """In eval + no_grad torch.nn takes its native fast path; we still agree."""
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ours = _twin(ref, lnn.MultiheadAttention, 32, 4, batch_first=True).eval()
    x = torch.randn(3, 10, 32)
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[1, 6:] = True
    with torch.no_grad():
        a = ref(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        b = ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(b, a, **TOL)


def test_mha_fully_masked_row_gives_zeros_not_nan():
    _, ours = _mha_pair(batch_first=True, bias=False)
    x = torch.randn(2, 4, E, requires_grad=True)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2] = True  # query 2 may see no key
    out = ours(x, x, x, attn_mask=mask, need_weights=False)[0]
    assert torch.isfinite(out).all()
    # with bias=False the output projection of a zero attention row is exactly zero
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_mha_is_causal_without_mask_is_torchs_error():
    _, ours = _mha_pair()
    x = torch.randn(4, 2, E)
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(x, x, x, need_weights=False, is_causal=True)


@pytest.mark.parametrize("bad", ["mask_shape", "kpm_shape", "mask_dtype"])
def test_mha_bad_masks_raise_clear_errors(bad):
    _, ours = _mha_pair(batch_first=True)
    x = torch.randn(2, 5, E)
    kw = {
        "mask_shape": dict(attn_mask=torch.zeros(5, 4)),
        "kpm_shape": dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
        "mask_dtype": dict(attn_mask=torch.zeros(5, 5, dtype=torch.int32)),
    }[bad]
    with pytest.raises((RuntimeError, TypeError), match="mask"):
        ours(x, x, x, need_weights=False, **kw)


def test_mha_uses_the_llmkit_attention_op(monkeypatch):
    """The fused path really runs llmkit's op (once per call), with masks merged."""
    calls = []
    real = llmkit.ops.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(llmkit.ops, "scaled_dot_product_attention", spy)
    _, ours = _mha_pair(batch_first=True)
    x = torch.randn(2, 5, E)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    ours(x, x, x, need_weights=False, key_padding_mask=kpm)
    assert len(calls) == 1 and calls[0]["attn_mask"].dtype == torch.bool
    assert calls[0]["attn_mask"].shape == (2, 1, 1, 5)


def test_seeded_construction_gives_torchs_weights():
    for args in ((E, H),):
        torch.manual_seed(3)
        ref = nn.MultiheadAttention(*args, kdim=7)
        torch.manual_seed(3)
        ours = lnn.MultiheadAttention(*args, kdim=7)
        for (ka, a), (kb, b) in itertools.zip_longest(ref.state_dict().items(), ours.state_dict().items()):
            assert ka == kb and torch.equal(a, b)
