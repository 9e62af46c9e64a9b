"""llmkit.quantize and llmkit.calibrate on torch.nn and small HuggingFace models.

The HuggingFace BERT and GPT-2 models are built from small configs with random weights
(no downloads). Quantized outputs must stay close to the float model (cosine >= 0.99).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import llmkit
from llmkit.nn import Int8Linear
from llmkit.testing import sqnr_db

MODES = ["w8a8", "w8a16"]
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")


def _gpt2(layers: int = 2) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        n_layer=layers, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


def _bert_config() -> BertConfig:
    return BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=64,
    )


def _ids(batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("mode", MODES)
def test_gpt2_quantized_stays_close_to_float(mode):
    model = _gpt2()
    ids = _ids()
    ref = _logits(model, ids)
    report = llmkit.quantize(model, mode)
    out = _logits(model, ids)
    assert _cosine(out, ref) >= 0.99
    names = {q.name for q in report.quantized}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= names
    assert all(q.kind == "Conv1D" for q in report.quantized) and len(report.quantized) == 8
    assert isinstance(model.transformer.h[0].attn.c_attn, Int8Linear)
    assert model.transformer.h[0].attn.c_attn.mode == mode
    (head,) = report.skipped
    assert head.name == "lm_head" and "output head" in head.reason
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    assert report.model_bytes_after < report.model_bytes_before
    text = str(report)
    assert "transformer.h.0.attn.c_attn" in text and "lm_head" in text and "whole model" in text


@pytest.mark.parametrize("mode", MODES)
def test_bert_quantized_stays_close_to_float(mode):
    model = BertForMaskedLM(_bert_config()).eval()
    ids = _ids()
    ref = _logits(model, ids)
    report = llmkit.quantize(model, mode)
    assert _cosine(_logits(model, ids), ref) >= 0.99
    assert len(report.quantized) == 13  # 6 per layer + the prediction transform
    assert [s.name for s in report.skipped] == ["cls.predictions.decoder"]
    assert isinstance(model.bert.encoder.layer[1].intermediate.dense, Int8Linear)


def test_bert_without_an_lm_head_keeps_its_last_linear():
    model = BertModel(_bert_config(), add_pooling_layer=True).eval()
    ids = _ids()
    ref = _logits(model, ids)
    report = llmkit.quantize(model, "w8a8")
    assert [(s.name, s.reason) for s in report.skipped] == [
        ("pooler.dense", "last linear of the model, kept as the output head")
    ]
    assert _cosine(_logits(model, ids), ref) >= 0.99
    again = llmkit.quantize(BertModel(_bert_config()).eval(), "w8a8", keep_head=False)
    assert not again.skipped and len(again.quantized) == 13


def test_quantized_gpt2_runs_on_the_triton_kernels():
    model = _gpt2(layers=1)
    ids = _ids(1, 12)
    ref = _logits(model, ids)
    llmkit.quantize(model, "w8a8")
    cpu = _logits(model, ids)
    with llmkit.use_backend(int8_linear="triton"):
        tri = _logits(model, ids)
    assert _cosine(tri, ref) >= 0.99
    assert _cosine(tri, cpu) >= 0.9999  # same quantization, same GEMM, epilogues within rounding


def test_memory_of_a_bfloat16_model_halves():
    model = _gpt2().to(torch.bfloat16)
    report = llmkit.quantize(model, "w8a16")
    assert report.layer_bytes_after <= 0.55 * report.layer_bytes_before
    ids = _ids()
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


def test_skip_names_prefixes_and_patterns():
    model = _gpt2()
    report = llmkit.quantize(model, "w8a8", skip=["transformer.h.0", "*.mlp.c_fc", "transformer.h.1.attn.c_proj"])
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped["transformer.h.0.attn.c_attn"] == "named in skip ('transformer.h.0')"
    assert skipped["transformer.h.1.mlp.c_fc"] == "named in skip ('*.mlp.c_fc')"
    assert "transformer.h.1.attn.c_proj" in skipped
    assert [q.name for q in report.quantized] == ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    one = llmkit.quantize(_gpt2(), "w8a16", skip="transformer.h.1")  # a single str is one pattern
    assert len(one.quantized) == 4


def test_torch_nn_model_and_model_without_linears():
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    model.add_module("attn", mha)
    report = llmkit.quantize(model, "w8a16")
    assert [q.name for q in report.quantized] == ["0", "2"]
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped["4"] == "last linear of the model, kept as the output head"
    assert "subclass of nn.Linear" in skipped["attn.out_proj"]
    x = torch.randn(3, 5, 32)
    mha(x, x, x)  # MultiheadAttention still works: its out_proj was left alone

    empty = llmkit.quantize(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), "w8a8")
    assert empty.empty and not empty.quantized and not empty.skipped
    assert "0 quantized" in str(empty)


def test_quantize_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of 'w8a8', 'w8a16', got 'int4'"):
        llmkit.quantize(nn.Linear(4, 4), "int4")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        llmkit.quantize({"weight": torch.ones(2)}, "w8a8")
    with pytest.raises(TypeError, match="skip must hold module names"):
        llmkit.quantize(nn.Sequential(nn.Linear(4, 4)), "w8a8", skip=[3])


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_quantized_model_save_load_round_trip(fmt, tmp_path):
    model = _gpt2()
    llmkit.quantize(model, "w8a8")
    ids = _ids()
    want = _logits(model, ids)
    fresh = _gpt2()
    llmkit.quantize(fresh, "w8a8")  # same structure, different weights
    if fmt == "torch":
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
    else:  # GPT-2 ties lm_head to wte: save_model / load_model handle the shared tensor
        path = str(tmp_path / "gpt2_int8.safetensors")
        save_model(model, path)
        load_model(fresh, path)
    assert torch.equal(_logits(fresh, ids), want)
    assert fresh.transformer.h[0].attn.c_attn.weight.dtype == torch.int8


# --------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------


def _gpt2_with_outliers() -> GPT2LMHeadModel:
    """GPT-2 whose pre-attention / pre-MLP norms blow a few channels up (activation outliers)."""
    model = _gpt2()
    with torch.no_grad():
        for block in model.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight[torch.randperm(64)[:3]] *= 40.0
    return model


def test_calibrate_folds_into_pre_norms_and_helps_w8a8():
    model = _gpt2_with_outliers()
    batches = [_ids(2, 24) for _ in range(3)]
    ids = _ids(2, 24)
    ref = _logits(model, ids)
    plain = copy.deepcopy(model)
    llmkit.quantize(plain, "w8a8")
    report = llmkit.calibrate(model, batches, alpha=0.5)
    assert report.batches == 3
    assert [g.norm for g in report.smoothed] == [f"transformer.h.{i}.{ln}" for i in (0, 1) for ln in ("ln_1", "ln_2")]
    assert all(g.channel_ratio_after < g.channel_ratio_before for g in report.smoothed)
    left = dict(report.left)
    assert set(left) == {
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.c_proj",
        "lm_head",
    }
    # the float model computes the same function
    assert _cosine(_logits(model, ids), ref) > 0.99999 and report.output_cosine > 0.99999
    llmkit.quantize(model, "w8a8")
    before, after = sqnr_db(_logits(plain, ids), ref), sqnr_db(_logits(model, ids), ref)
    assert after > before + 3.0, f"smoothing gave {before:.1f} -> {after:.1f} dB"
    assert "transformer.h.0.ln_1" in str(report)


def test_calibrate_leaves_post_norm_bert_alone():
    model = BertModel(_bert_config()).eval()
    ids = _ids()
    ref = _logits(model, ids)
    report = llmkit.calibrate(model, [ids], alpha=0.5)
    assert not report.smoothed
    reasons = dict(report.left)
    assert "also read outside linears" in reasons["encoder.layer.0.intermediate.dense"]
    assert torch.equal(_logits(model, ids), ref)


def test_calibrate_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be in"):
        llmkit.calibrate(_gpt2(), [_ids()], alpha=1.5)
    with pytest.raises(ValueError, match="gave no batch"):
        llmkit.calibrate(_gpt2(), [])
