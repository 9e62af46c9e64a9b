"""llmkit.swap / llmkit.unswap on torch.nn models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llmkit
import llmkit.nn as lnn


class ToyModel(nn.Module):
    """A mix of everything torch.nn llmkit knows, and things it does not."""

    def __init__(self, d: int = 24, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.norm_in = nn.LayerNorm(d)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, heads, 40, 0.0, "gelu", batch_first=True, norm_first=True),
            2,
            nn.LayerNorm(d),
            enable_nested_tensor=False,
        )
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.act = nn.GELU(approximate="tanh")
        self.rms = nn.RMSNorm(d)
        self.head = nn.Sequential(nn.Linear(d, 3), nn.ReLU())

    def forward(self, x: torch.Tensor, kpm: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm_in(self.embed(x))
        h = self.encoder(h, src_key_padding_mask=kpm)
        a, _ = self.mha(h, h, h, key_padding_mask=kpm, need_weights=False)
        return self.head(self.rms(self.act(a + h)))


def _randomize_(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
    return model


def _run(model, x, kpm):
    model.zero_grad()
    out = model(x, kpm)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_swap_torch_model_forward_backward_and_unswap_bit_identical():
    model = _randomize_(ToyModel())
    params = {n: p for n, p in model.named_parameters()}
    x = torch.randn(3, 7, 5)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    out0, grads0 = _run(model, x, kpm)

    report = llmkit.swap(model)
    assert report.counts() == {"norm": 7, "gelu": 1, "attention": 3, "transformer": 3}
    assert type(model.encoder) is lnn.TransformerEncoder
    assert type(model.encoder.layers[1]) is lnn.TransformerEncoderLayer
    assert type(model.mha) is lnn.MultiheadAttention and type(model.rms) is lnn.RMSNorm
    assert type(model.head[0]) is nn.Linear  # nothing else touched
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    out1, grads1 = _run(model, x, kpm)
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-5)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], atol=1e-5, rtol=1e-5)

    restored = llmkit.unswap(model)
    assert len(restored) == len(report)
    assert type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention and type(model.rms) is nn.RMSNorm
    out2, grads2 = _run(model, x, kpm)
    assert torch.equal(out2, out0)
    assert all(torch.equal(grads2[n], grads0[n]) for n in grads0)
    assert len(llmkit.unswap(model)) == 0  # nothing left to undo


def test_swap_only_some_kinds_and_exclude():
    model = ToyModel()
    report = llmkit.swap(model, kinds=["norm"], exclude=["encoder.layers.0"])
    assert set(report.counts()) == {"norm"}
    assert type(model.norm_in) is lnn.LayerNorm and type(model.encoder.layers[1].norm2) is lnn.LayerNorm
    assert type(model.encoder.layers[0].norm1) is nn.LayerNorm  # excluded
    assert type(model.mha) is nn.MultiheadAttention and type(model.act) is nn.GELU
    again = llmkit.swap(model, kinds="attention")  # a second swap adds to the first
    assert report.counts()["norm"] + again.counts()["attention"] == len(report) + len(again)
    llmkit.unswap(model)
    assert all(type(m).__module__.startswith("torch.") for m in model.modules() if m is not model)


def test_swapping_a_swapped_model_says_so():
    model = ToyModel()
    first = llmkit.swap(model)
    assert first.already == 0 and "already" not in str(first)
    second = llmkit.swap(model)
    assert len(second) == 0 and second.already == len(first) > 0
    assert f"{len(first)} already llmkit's" in str(second) and "nothing llmkit knows" not in str(second)
    llmkit.unswap(model)
    third = llmkit.swap(model)
    assert third.already == 0 and len(third) == len(first)


def test_swap_nothing_to_swap_gives_empty_report():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    report = llmkit.swap(model)
    assert len(report) == 0 and report.left == [] and not report.swapped
    assert "nothing llmkit knows" in str(report)
    assert not hasattr(model, "_llmkit_swap_undo")


def test_subclasses_are_left_with_a_reason():
    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyNorm(4), nn.LayerNorm(4))
    report = llmkit.swap(model)
    assert [e.name for e in report.swapped] == ["1"]
    assert [(e.name, e.kind) for e in report.left] == [("0", "norm")]
    assert "subclass of torch.nn.LayerNorm" in report.left[0].after
    text = str(report)
    assert "left" in text and "MyNorm" in text and "swapped" in text


def test_swap_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="unknown kind"):
        llmkit.swap(nn.LayerNorm(3), kinds=["layernorm"])


def test_swap_shared_module_and_already_llmkit():
    shared = nn.GELU()
    model = nn.Sequential(nn.Linear(2, 2), shared, nn.Linear(2, 2), shared, lnn.LayerNorm(2))
    report = llmkit.swap(model)
    assert len(report) == 1 and model[1] is model[3] and type(model[3]) is lnn.GELU
    llmkit.unswap(model)
    assert type(model[1]) is nn.GELU and type(model[4]) is lnn.LayerNorm


def test_swapped_model_state_dict_round_trips():
    model = ToyModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llmkit.swap(model)
    assert list(model.state_dict()) == list(before)
    fresh = ToyModel()
    llmkit.swap(fresh)
    fresh.load_state_dict(before, strict=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        ToyModel(d=28).load_state_dict(model.state_dict())
