"""The ``"llmkit"`` attention of transformers with sliding windows and softcapping: small random
Mistral, Qwen2 and Gemma 2 models at sequence lengths beyond their window, against
``attn_implementation="eager"`` (logits, training gradients, greedy ``generate`` tokens), with
the window running in the kernel (no dense mask when there is no padding) and Gemma 2's softcap.
"""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit import ops
from llmkit.integrations.hf import attention as A
from test_models import _widen_

transformers = pytest.importorskip("transformers")

VOCAB = 97
WINDOW = 5
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=56,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MODELS = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            num_hidden_layers=2,
            sliding_window=WINDOW,
            head_dim=8,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=8,
            hidden_activation="gelu_pytorch_tanh",
        ),
    ),
}


def model_pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(eager, llmkit): the same random weights under the two attention implementations."""
    return model_pair_of(*MODELS[name])


def model_pair_of(cfg_name: str, cls_name: str, extra: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """:func:`model_pair` of a transformers config and model class (``COMMON`` plus ``extra``)."""
    llmkit.integrations.hf.ensure_registered()
    models = []
    for impl in ("eager", "llmkit"):
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_name)(**COMMON, **extra)
        cfg._attn_implementation = impl
        models.append(_widen_(getattr(transformers, cls_name)(cfg), std=0.2).eval())
    models[1].load_state_dict(models[0].state_dict())
    return models[0], models[1]


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The keyword arguments of every ops.scaled_dot_product_attention call of the HF function."""
    calls: list[dict] = []
    real = ops.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(dict(kwargs, attn_mask_given=kwargs.get("attn_mask") is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(A.ops, "scaled_dot_product_attention", spy)
    return calls


def _train(model, ids, mask):
    """Logits at the real (unpadded) positions and the gradients of a loss on them: padded
    query rows see no key, where eager averages every value and llmkit gives 0."""
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits * mask[..., None]
    logits.pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "left_padding"])
def test_sliding_window_models_match_eager(name, padded, sdpa_calls):
    eager, fused = model_pair(name)
    s = 3 * WINDOW + 2  # beyond the window
    ids = torch.randint(3, VOCAB, (2, s))
    mask = torch.ones(2, s, dtype=torch.long)
    if padded:
        mask[1, :4] = 0
    out0, g0 = _train(eager, ids, mask)
    out1, g1 = _train(fused, ids, mask)
    torch.testing.assert_close(out1, out0, atol=1e-4, rtol=1e-4)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    windowed = [c for c in sdpa_calls if c.get("window_size") == (WINDOW - 1, 0)]
    assert windowed, "the window never reached the kernel"
    assert all(c["causal_alignment"] == "bottom_right" and c["is_causal"] for c in windowed)
    assert all(c["attn_mask_given"] == padded for c in windowed), "the dense mask is dropped exactly when unpadded"
    if name == "gemma2":
        assert all(c["softcap"] == 2.0 for c in sdpa_calls)
    with torch.no_grad():
        t0 = eager.generate(
            ids[:, : WINDOW + 2], attention_mask=mask[:, : WINDOW + 2], max_new_tokens=2 * WINDOW, do_sample=False
        )
        sdpa_calls.clear()
        t1 = fused.generate(
            ids[:, : WINDOW + 2], attention_mask=mask[:, : WINDOW + 2], max_new_tokens=2 * WINDOW, do_sample=False
        )
    assert torch.equal(t1, t0)
    assert any(c.get("window_size") == (WINDOW - 1, 0) for c in sdpa_calls)


def test_window_fit_reads_the_mask_once_and_refuses_other_patterns():
    sq, sk, w = 6, 10, 3
    diag = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    band = ((j <= diag) & (j > diag - w))[None, None].expand(2, 1, sq, sk)
    assert A._window_fit(band.clone(), w) == "exact"
    padded = band.clone()
    padded[1, :, :, 5] = False
    assert A._window_fit(padded, w) == "inside"
    top_left = (j <= torch.arange(sq)[:, None])[None, None].expand(2, 1, sq, sk).clone()  # a static cache's prefill
    assert A._window_fit(top_left, w) == "no"
    assert A._window_fit(band.clone(), w + 1) == "inside"  # a wider window holds it, with the mask kept
