"""llmkit.nn Transformer layers and stacks against torch.nn, forward and backward.

The torch.nn module is built first, its state dict loads into the llmkit module with
``strict=True``, and outputs plus every gradient agree within 1e-5 in float32 on CPU
for each option the issue lists: batch_first, norm_first, activation relu / gelu /
callable, bias, key padding masks, attention masks (bool / float), is_causal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmkit.nn as lnn
from conftest import select_linear_path
from llmkit.nn import _fused
from test_nn_modules import TOL, _assert_same

D, H, FF = 20, 4, 36  # d_model, heads, feed-forward width


def _randomize_(module: nn.Module) -> nn.Module:
    with torch.no_grad():  # non-trivial norm and bias parameters
        for name, p in module.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return module


ACTIVATIONS = {
    "relu": lambda: "relu",
    "gelu": lambda: "gelu",
    "gelu_tanh_module": lambda: nn.GELU(approximate="tanh"),
    "callable": lambda: torch.tanh,
}


def _layer_masks(kind: str, b: int, s: int):
    """(attn_mask, key_padding_mask, is_causal) in torch.nn conventions."""
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[0, s - 2 :] = True
    if kind == "none":
        return None, None, False
    if kind == "kpm":
        return None, kpm, False
    if kind == "mask_bool":
        m = torch.rand(s, s) < 0.4
        m.fill_diagonal_(False)
        return m, None, False
    if kind == "mask_float":
        return torch.randn(s, s), None, False
    if kind == "causal":
        return nn.Transformer.generate_square_subsequent_mask(s), None, True
    if kind == "causal_kpm":
        kpm_float = torch.zeros(b, s).masked_fill(kpm, float("-inf"))
        return nn.Transformer.generate_square_subsequent_mask(s), kpm_float, True
    raise AssertionError(kind)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "kpm", "mask_bool", "mask_float", "causal", "causal_kpm"])
def test_encoder_layer_matches_torch(batch_first, norm_first, activation, bias, mask_kind):
    b, s = 2, 7
    kw = dict(
        dim_feedforward=FF,
        dropout=0.0,
        activation=ACTIVATIONS[activation](),
        layer_norm_eps=1e-6,
        batch_first=batch_first,
        norm_first=norm_first,
        bias=bias,
    )
    ref = _randomize_(nn.TransformerEncoderLayer(D, H, **kw))
    ours = lnn.TransformerEncoderLayer(D, H, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    mask, kpm, causal = _layer_masks(mask_kind, b, s)
    shape = (b, s, D) if batch_first else (s, b, D)
    _assert_same(
        ref,
        ours,
        lambda: [torch.randn(shape, requires_grad=True)],
        lambda m, x: m(x, src_mask=mask, src_key_padding_mask=kpm, is_causal=causal),
    )


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "callable"])
@pytest.mark.parametrize("masks", ["none", "causal_padded", "bool_masks"])
def test_decoder_layer_matches_torch(batch_first, norm_first, activation, masks):
    b, t, s = 3, 6, 5
    kw = dict(
        dim_feedforward=FF,
        dropout=0.0,
        activation=ACTIVATIONS[activation](),
        batch_first=batch_first,
        norm_first=norm_first,
    )
    ref = _randomize_(nn.TransformerDecoderLayer(D, H, **kw))
    ours = lnn.TransformerDecoderLayer(D, H, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    call_kw: dict = {}
    if masks == "causal_padded":
        mem_kpm = torch.zeros(b, s, dtype=torch.bool)
        mem_kpm[1, -2:] = True
        call_kw = dict(
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(t),
            tgt_is_causal=True,
            memory_key_padding_mask=mem_kpm,
        )
    elif masks == "bool_masks":
        tgt_kpm = torch.zeros(b, t, dtype=torch.bool)
        tgt_kpm[:, -1] = True
        mm = torch.rand(t, s) < 0.3
        mm[:, 0] = False
        call_kw = dict(tgt_key_padding_mask=tgt_kpm, memory_mask=mm)

    def make():
        if batch_first:
            return [torch.randn(b, t, D, requires_grad=True), torch.randn(b, s, D, requires_grad=True)]
        return [torch.randn(t, b, D, requires_grad=True), torch.randn(s, b, D, requires_grad=True)]

    _assert_same(ref, ours, make, lambda m, x, mem: m(x, mem, **call_kw))


@pytest.mark.parametrize("norm_first", [False, True])
def test_unbatched_layers(norm_first):
    ref = _randomize_(nn.TransformerEncoderLayer(D, H, FF, 0.0, "gelu", norm_first=norm_first))
    ours = lnn.TransformerEncoderLayer(D, H, FF, 0.0, "gelu", norm_first=norm_first)
    ours.load_state_dict(ref.state_dict())
    kpm = torch.tensor([False] * 4 + [True])
    _assert_same(
        ref, ours, lambda: [torch.randn(5, D, requires_grad=True)], lambda m, x: m(x, src_key_padding_mask=kpm)
    )


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm", [True, False])
def test_encoder_stack_matches_torch_with_causal_detection(batch_first, norm):
    layer = nn.TransformerEncoderLayer(D, H, FF, 0.0, "gelu", batch_first=batch_first)
    ref = _randomize_(nn.TransformerEncoder(layer, 3, nn.LayerNorm(D) if norm else None, enable_nested_tensor=False))
    ours = lnn.TransformerEncoder(
        lnn.TransformerEncoderLayer(D, H, FF, 0.0, "gelu", batch_first=batch_first),
        3,
        lnn.LayerNorm(D) if norm else None,
        enable_nested_tensor=False,
    )
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert all(type(layer) is lnn.TransformerEncoderLayer for layer in ours.layers)
    causal = nn.Transformer.generate_square_subsequent_mask(6)  # is_causal=None: detected
    shape = (2, 6, D) if batch_first else (6, 2, D)
    _assert_same(ref, ours, lambda: [torch.randn(shape, requires_grad=True)], lambda m, x: m(x, mask=causal))


def test_encoder_from_torch_layer_converts_the_copies_only():
    layer = nn.TransformerEncoderLayer(D, H, FF, 0.0, batch_first=True)
    enc = lnn.TransformerEncoder(layer, 2)
    assert type(layer) is nn.TransformerEncoderLayer and type(layer.self_attn) is nn.MultiheadAttention
    assert type(enc.layers[0]) is lnn.TransformerEncoderLayer
    assert type(enc.layers[1].self_attn) is lnn.MultiheadAttention


def test_encoder_eval_padding_matches_torch_nested_tensor_path():
    """torch.nn turns a padded eval batch into a NestedTensor: zeros at padding, then norm."""
    layer = nn.TransformerEncoderLayer(D, H, FF, 0.0, batch_first=True)
    ref = _randomize_(nn.TransformerEncoder(layer, 2, nn.LayerNorm(D))).eval()
    ours = lnn.TransformerEncoder(lnn.TransformerEncoderLayer(D, H, FF, 0.0, batch_first=True), 2, lnn.LayerNorm(D))
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    x = torch.randn(3, 7, D)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[2, 6:] = True
    with torch.no_grad():
        a, b = ref(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(b, a, **TOL)
    # and with autograd on (no NestedTensor in torch.nn either) padded rows are computed
    a, b = ref(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_full_transformer_matches_torch(batch_first, norm_first):
    kw = dict(
        d_model=D,
        nhead=H,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=FF,
        dropout=0.0,
        activation="gelu",
        batch_first=batch_first,
        norm_first=norm_first,
    )
    torch.manual_seed(11)
    ref = _randomize_(nn.Transformer(**kw))
    torch.manual_seed(11)
    ours = _randomize_(lnn.Transformer(**kw))
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert type(ours.encoder.norm) is lnn.LayerNorm and type(ours.decoder.layers[1]) is lnn.TransformerDecoderLayer
    b, s, t = 2, 7, 5
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(t)
    src_kpm = torch.zeros(b, s, dtype=torch.bool)
    src_kpm[1, -3:] = True

    def make():
        if batch_first:
            return [torch.randn(b, s, D, requires_grad=True), torch.randn(b, t, D, requires_grad=True)]
        return [torch.randn(s, b, D, requires_grad=True), torch.randn(t, b, D, requires_grad=True)]

    _assert_same(
        ref,
        ours,
        make,
        lambda m, src, tgt: m(
            src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=src_kpm, memory_key_padding_mask=src_kpm
        ),
    )


def test_seeded_transformer_has_torchs_weights():
    torch.manual_seed(5)
    ref = nn.Transformer(D, H, 1, 1, FF)
    torch.manual_seed(5)
    ours = lnn.Transformer(D, H, 1, 1, FF)
    sa, sb = ref.state_dict(), ours.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh_module"])
@pytest.mark.parametrize("bias", [True, False])
def test_encoder_layer_bias_gelu_path_matches_torch(monkeypatch, norm_first, activation, bias):
    """The bias_gelu fusion that GPUs take, forced on the CPU."""
    select_linear_path(monkeypatch, "bias_gelu")
    test_encoder_layer_matches_torch(True, norm_first, activation, bias, "kpm")


@pytest.mark.parametrize("bias_in_gemm", [True, False])
def test_layers_use_fused_ops(monkeypatch, bias_in_gemm):
    """Post-norm layer: two add+LayerNorm, one bias+GELU, one attention call.

    On the CPU the bias goes into the GEMM and the GELU runs alone (the ``bias_in_gemm`` variant of
    the ``linear`` point).
    """
    import llmkit

    select_linear_path(monkeypatch, "bias_in_gemm" if bias_in_gemm else "bias_gelu")
    gelu_op = "gelu" if bias_in_gemm else "bias_gelu"

    counts: dict[str, int] = {}
    for name in ("add_layer_norm", "bias_gelu", "gelu", "scaled_dot_product_attention", "layer_norm"):
        real = getattr(llmkit.ops, name)

        def spy(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(llmkit.ops, name, spy)
    layer = lnn.TransformerEncoderLayer(D, H, FF, 0.0, "gelu", batch_first=True)
    layer(torch.randn(2, 3, D))
    assert counts == {"add_layer_norm": 2, gelu_op: 1, "scaled_dot_product_attention": 1}
    counts.clear()
    layer.norm_first = True
    layer(torch.randn(2, 3, D))
    assert counts == {"layer_norm": 1, "add_layer_norm": 1, gelu_op: 1, "scaled_dot_product_attention": 1}


def test_fusion_falls_back_for_hooked_or_foreign_modules():
    ln = nn.LayerNorm(D)
    seen = []
    ln.register_forward_hook(lambda m, i, o: seen.append(1))
    x, r = torch.randn(3, D), torch.randn(3, D)
    out, total = _fused.add_norm(x, r, ln)
    assert seen == [1]
    torch.testing.assert_close(out, F.layer_norm(x + r, (D,)), **TOL)
    torch.testing.assert_close(total, x + r)
    assert _fused.gelu_approximate(torch.tanh) is None and _fused.gelu_approximate(F.gelu) == "none"


def test_is_causal_detection_matches_torch():
    from torch.nn.modules.transformer import _detect_is_causal_mask

    causal = nn.Transformer.generate_square_subsequent_mask(5)
    cases = [
        (causal, None, 5),
        (causal, None, 4),
        (causal.bool(), None, 5),
        (torch.zeros(5, 5), None, 5),
        (None, None, 5),
        (torch.zeros(5, 5), True, 5),
        (causal, False, 5),
    ]
    for mask, hint, size in cases:
        ref_mask = mask
        if mask is not None and mask.dtype == torch.bool:
            ref_mask = torch.zeros(5, 5).masked_fill(mask, float("-inf"))
        assert _fused.is_causal_hint_mask(mask, hint, size) == _detect_is_causal_mask(ref_mask, hint, size)
