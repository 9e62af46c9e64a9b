"""llmkit.nn, models and swapped HF models on the kernel backends, not only the reference.

On this CPU-only machine the Triton kernels run through the Triton interpreter
(conftest sets TRITON_INTERPRET=1) on small shapes, asked for by name so that nothing
falls back silently; the C++ extension's CPU kernels run where they are built. The
GPU tests at the end skip without a GPU and run the real kernels on one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llmkit
import llmkit.nn as lnn
from conftest import select_linear_path
from llmkit.dispatch import BACKENDS, triton_interpreting
from llmkit.models import GPT, GPTConfig
from test_nn_modules import _assert_same

TRITON_CPU = pytest.mark.skipif(
    BACKENDS["triton"].unavailable_reason("cpu") is not None, reason="Triton cannot run CPU tensors here"
)
GPU = pytest.mark.skipif(not torch.cuda.is_available() or triton_interpreting(), reason="needs a CUDA GPU")
TOL = dict(atol=2e-5, rtol=2e-5)  # fp32 kernels sum in other orders than ATen


@pytest.fixture
def bias_gelu_path(monkeypatch):
    """Run the GPU form (bias fused into the GELU kernel) on CPU tensors too."""
    select_linear_path(monkeypatch, "bias_gelu")


def _backends_here() -> list[str]:
    return [b for b in ("triton", "cuda_ext") if BACKENDS[b].unavailable_reason("cpu") is None]


@pytest.mark.parametrize(
    "backend", _backends_here() or [pytest.param("none", marks=pytest.mark.skip("no kernel backend"))]
)
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_on_kernel_backends(backend, norm_first, bias_gelu_path):
    d, h = 16, 2
    ref = nn.TransformerEncoderLayer(d, h, 24, 0.0, "gelu", batch_first=True, norm_first=norm_first)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
    ours = lnn.TransformerEncoderLayer(d, h, 24, 0.0, "gelu", batch_first=True, norm_first=norm_first)
    ours.load_state_dict(ref.state_dict())
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    # triton by name: strict; the extension implements only some ops on the CPU: it goes first
    order = "triton" if backend == "triton" else ["cuda_ext", "reference"]
    with llmkit.use_backend(order):
        _assert_same(
            ref,
            ours,
            lambda: [torch.randn(2, 5, d, requires_grad=True)],
            lambda m, x: m(x, src_key_padding_mask=kpm),
            tol=TOL,
        )


@TRITON_CPU
def test_gpt_generate_on_triton_matches_reference(bias_gelu_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_positions=24, n_embd=16, n_layer=2, n_head=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(0, 40, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    want = model.generate(ids, 5, attention_mask=mask)
    with llmkit.use_backend("triton"):  # prefill attention, decode_attention, norms, bias+GELU
        got = model.generate(ids, 5, attention_mask=mask)
        logits = model(ids)
    assert torch.equal(got, want)
    torch.testing.assert_close(logits, model(ids), **TOL)


@TRITON_CPU
def test_swapped_hf_bert_on_triton(bias_gelu_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 30, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state
        llmkit.swap(model)
        with llmkit.use_backend("triton"):
            got = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# -- on a GPU -------------------------------------------------------------------------------


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_swapped_hf_gpt2(dtype):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=500,
        n_positions=128,
        n_embd=256,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).cuda().eval()
    ids = torch.randint(0, 500, (4, 50), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()  # float32 on ATen
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        model.to(dtype)
        base = model(ids).logits.float()
        llmkit.swap(model)
        got = model(ids).logits.float()
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        assert (got - ref).abs().max().item() <= 1e-4 * scale
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), tokens)
    else:  # no worse than transformers' own bf16 error, with a little room
        assert (got - ref).abs().max().item() <= 2 * (base - ref).abs().max().item() + 1e-3 * scale


@GPU
def test_gpu_gpt_decoding_uses_kernels_and_matches_reference():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=128, n_embd=128, n_layer=2, n_head=4)).cuda().eval()
    ids = torch.randint(0, 300, (3, 20), device="cuda")
    with llmkit.use_backend("reference"):
        want = model.generate(ids, 16)
        ref_logits = model(ids)
    got = model.generate(ids, 16)
    torch.testing.assert_close(model(ids), ref_logits, atol=1e-4, rtol=1e-4)
    assert (got == want).float().mean().item() > 0.9  # fp32 near-ties may flip a late token
