"""llmkit.nn.Int8Linear: construction from nn.Linear / HF Conv1D, accuracy, state dicts.

Accuracy is judged by SQNR against the float layer on Gaussian data (llmkit.testing: int8
paths by SQNR): >= 30 dB for W8A16, >= 25 dB for W8A8, on the CPU path and on the
Triton kernels (through the interpreter, or the GPU with LLMKIT_TEST_GPU=1).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import llmkit
from llmkit import reference64 as R
from llmkit.dispatch import triton_interpreting
from llmkit.nn import Int8Linear
from llmkit.testing import sqnr_db

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
MODES = ["w8a8", "w8a16"]
MIN_SQNR = {"w8a8": 25.0, "w8a16": 30.0}

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")


def _float_linear(k: int, n: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0.0, 1.0 / k**0.5)
        if bias:
            layer.bias.normal_(0.0, 0.1)
    return layer


def _ref64(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, Conv1D):
        w, b = layer.weight.detach().double().t(), layer.bias.detach().double()
    else:
        w = layer.weight.detach().double()
        b = None if layer.bias is None else layer.bias.detach().double()
    return F.linear(x.double().cpu(), w.cpu(), None if b is None else b.cpu())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_linear_sqnr_on_gaussian_data(mode, backend, dtype):
    k, n, m = (256, 96, 33) if backend == "triton" else (512, 384, 64)
    layer = _float_linear(k, n)
    q = Int8Linear.from_float(layer, mode=mode).to(DEVICE if backend == "triton" else "cpu")
    x = torch.randn(m, k).to(dtype)
    with llmkit.use_backend(backend):
        y = q(x.to(q.weight.device))
    assert y.dtype == dtype and y.shape == (m, n)
    sqnr = sqnr_db(y.cpu(), _ref64(layer, x))
    assert sqnr >= MIN_SQNR[mode], f"{mode} {backend} {dtype}: SQNR {sqnr:.1f} dB"


def test_int8_linear_w8a16_is_the_exact_dequantized_product_on_cpu():
    """W8A16's only loss is the weight rounding: its output matches the float product with
    the dequantized weight to float32 accuracy (the CPU path's int8 split of x included)."""
    layer = _float_linear(200, 70)
    q = Int8Linear.from_float(layer, mode="w8a16")
    x = torch.randn(5, 3, 200)
    exact = F.linear(x.double(), q.dequantize(torch.float64), layer.bias.double())
    assert sqnr_db(q(x), exact) > 110


def test_from_conv1d_matches_from_linear():
    k, n = 48, 72
    conv = Conv1D(n, k)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    for mode in MODES:
        a, b = Int8Linear.from_float(conv, mode=mode), Int8Linear.from_float(lin, mode=mode)
        assert (a.in_features, a.out_features) == (k, n)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_scale, b.weight_scale)
        x = torch.randn(4, 7, k)
        assert sqnr_db(a(x), _ref64(conv, x)) >= MIN_SQNR[mode]
        assert torch.equal(a(x), b(x))


def test_weight_is_per_output_channel_quantization():
    layer = _float_linear(40, 24)
    q = Int8Linear.from_float(layer)
    q_ref, s_ref = R.quantize_int8(layer.weight.detach())
    assert q.weight.dtype == torch.int8 and torch.equal(q.weight, q_ref)
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, s_ref)
    assert q.bias.requires_grad is False and torch.equal(q.bias, layer.bias)


def test_fused_activation_and_no_bias():
    layer = _float_linear(64, 32, bias=False)
    x = torch.randn(9, 64)
    for mode in MODES:
        plain = Int8Linear.from_float(layer, mode=mode)
        fused = Int8Linear.from_float(layer, mode=mode, activation="gelu_tanh")
        assert plain.bias is None
        torch.testing.assert_close(fused(x), F.gelu(plain(x), approximate="tanh"), rtol=1e-6, atol=1e-6)


def test_state_dict_round_trips_torch_save_and_safetensors(tmp_path):
    layer = _float_linear(80, 50)
    x = torch.randn(6, 80)
    for mode in MODES:
        q = Int8Linear.from_float(layer, mode=mode)
        sd = q.state_dict()
        assert set(sd) == {"weight", "weight_scale", "bias"}
        assert sd["weight"].dtype == torch.int8 and list(sd["weight"].shape) == [50, 80]
        assert sd["weight_scale"].dtype == torch.float32 and list(sd["weight_scale"].shape) == [50]
        want = q(x)

        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        fresh = Int8Linear(80, 50, mode=mode)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(fresh(x), want)

        path = tmp_path / f"int8_{mode}.safetensors"
        save_file(sd, str(path))
        fresh = Int8Linear(80, 50, mode=mode)
        fresh.load_state_dict(load_file(str(path)))
        assert torch.equal(fresh(x), want)


def test_loads_a_float_linear_state_dict_by_quantizing_it():
    layer = _float_linear(30, 20)
    q = Int8Linear(30, 20, mode="w8a16")
    q.load_state_dict(layer.state_dict())
    ref = Int8Linear.from_float(layer, mode="w8a16")
    assert torch.equal(q.weight, ref.weight) and torch.equal(q.weight_scale, ref.weight_scale)
    with pytest.raises(RuntimeError, match="size mismatch|must be"):
        Int8Linear(31, 20).load_state_dict(layer.state_dict())


def test_dtype_moves_keep_int8_weight_and_float32_scales():
    layer = _float_linear(64, 40)
    q = Int8Linear.from_float(layer, mode="w8a8")
    scale = q.weight_scale.clone()
    q = q.to(torch.bfloat16)
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert torch.equal(q.weight_scale, scale), "the scales must not pass through bfloat16"
    assert q.bias.dtype == torch.bfloat16
    x = torch.randn(5, 64)
    assert q(x.bfloat16()).dtype == torch.bfloat16
    assert q(x).dtype == torch.float32  # a bfloat16 bias is cast for a float32 input
    assert sqnr_db(q(x), _ref64(layer, x)) >= MIN_SQNR["w8a8"] - 3  # bias rounded to bfloat16
    q.half()
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.float16


def test_extra_repr_shows_mode_and_shapes():
    text = repr(Int8Linear.from_float(_float_linear(12, 7), mode="w8a16", activation="gelu"))
    for part in ("in_features=12", "out_features=7", "mode='w8a16'", "activation='gelu'", "int8[7, 12]", "float32[7]"):
        assert part in text, text


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of 'w8a8', 'w8a16', got 'int4'"):
        Int8Linear(4, 4, mode="int4")
    with pytest.raises(ValueError, match="mode must be one of"):
        Int8Linear.from_float(nn.Linear(4, 4), mode="fp8")
    with pytest.raises(ValueError, match="activation must be one of"):
        Int8Linear(4, 4, activation="relu")
    with pytest.raises(TypeError, match="expected torch.nn.Linear or transformers Conv1D, got Conv2d"):
        Int8Linear.from_float(nn.Conv2d(3, 3, 1))
    bad = nn.Linear(4, 3)
    with torch.no_grad():
        bad.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        Int8Linear.from_float(bad)
    q = Int8Linear.from_float(nn.Linear(4, 3))
    with pytest.raises(TypeError, match="input has dtype float64"):
        q(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="K mismatch"):
        q(torch.randn(2, 5))


@pytest.mark.parametrize("mode", MODES)
def test_compile_fullgraph_and_export(mode):
    q = Int8Linear.from_float(_float_linear(64, 32), mode=mode)
    x = torch.randn(5, 64)
    want = q(x)
    assert torch.equal(torch.compile(q, fullgraph=True, backend="eager")(x), want)
    program = torch.export.export(q, (x,))
    assert any("int8_linear" in str(node.target) for node in program.graph.nodes)
    assert torch.equal(program.module()(x), want)
