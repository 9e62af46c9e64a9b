"""transformers' padding-free path with ``attn_implementation="llmkit"``: small random Llama,
Qwen2 (sliding window) and Mistral models called on packed ``input_ids (1, total)`` whose
``position_ids`` restart per sequence (or with ``cu_seq_lens_q`` / ``cu_seq_lens_k`` kwargs, as
``DataCollatorWithFlattening`` gives them) equal each sequence run alone (eager attention),
and the calls go to ``ops.varlen_attention``.
"""

from __future__ import annotations

import pytest
import torch

from llmkit import ops
from llmkit.integrations.hf import attention as A

transformers = pytest.importorskip("transformers")

from test_hf_attention import VOCAB, model_pair_of  # noqa: E402  (after the skip)

WINDOW = 4
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2_window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    ),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
}
LENGTHS = [5, 1, 9, 3]
LAYERS = 2


def _models(name):
    """(eager, llmkit): the same random weights under the two attention implementations."""
    cfg_name, cls_name, extra = MODELS[name]
    return model_pair_of(cfg_name, cls_name, dict(num_hidden_layers=LAYERS, **extra))


@pytest.fixture
def calls(monkeypatch):
    """How many ops.varlen_attention / ops.scaled_dot_product_attention calls the HF function made."""
    seen = {"varlen": 0, "sdpa": 0}
    real_v, real_s = ops.varlen_attention, ops.scaled_dot_product_attention

    def varlen(*a, **k):
        seen["varlen"] += 1
        return real_v(*a, **k)

    def sdpa(*a, **k):
        seen["sdpa"] += 1
        return real_s(*a, **k)

    monkeypatch.setattr(A.ops, "varlen_attention", varlen)
    monkeypatch.setattr(A.ops, "scaled_dot_product_attention", sdpa)
    return seen


def _packed_inputs():
    seqs = [torch.randint(3, VOCAB, (n,)) for n in LENGTHS]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return seqs, ids, pos, cu


def _alone(model, seqs):
    with torch.no_grad():
        return torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("how", ["position_ids", "position_ids_with_cache", "cu_seq_lens"])
def test_packed_sequences_equal_each_sequence_alone(name, how, calls):
    eager, fused = _models(name)
    seqs, ids, pos, cu = _packed_inputs()
    want = _alone(eager, seqs)
    kwargs: dict = dict(position_ids=pos, use_cache=how == "position_ids_with_cache")
    if how == "cu_seq_lens":
        m = max(LENGTHS)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
    with torch.no_grad():
        got = fused(input_ids=ids, **kwargs).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert calls["varlen"] == LAYERS and calls["sdpa"] == 0


def test_packed_training_gradients_equal_the_sequences_alone(calls):
    """A loss over the packed batch has the gradients of the same loss summed over the sequences
    run alone (eager attention)."""
    eager, fused = _models("llama")
    seqs, ids, pos, _ = _packed_inputs()
    fused.zero_grad()
    fused(input_ids=ids, position_ids=pos, use_cache=False).logits.pow(2).sum().backward()
    eager.zero_grad()
    for s in seqs:
        eager(input_ids=s[None], use_cache=False).logits.pow(2).sum().backward()
    for (n, p), (_, q) in zip(fused.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=n)
    assert calls["varlen"] == LAYERS


def test_one_sequence_and_padded_batches_keep_the_dense_path(calls):
    """Position ids of one sequence, or a mask with padding, are not a packed batch."""
    _, fused = _models("llama")
    ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        fused(input_ids=ids, use_cache=False)
        mask = torch.ones(1, 7, dtype=torch.long)
        mask[0, :2] = 0
        fused(input_ids=ids, attention_mask=mask, use_cache=False)
    assert calls["varlen"] == 0 and calls["sdpa"] == 2 * LAYERS


def test_inference_mode_reads_masks_and_position_ids_every_call(calls):
    """Under torch.inference_mode the masks and position ids are inference tensors, which have
    no version counter: they are read on every call (not cached), and the results stay right:
    packed sequences (Mistral, sliding window) and a dense batch past the window."""
    eager, fused = _models("mistral_window")
    seqs, ids, pos, _ = _packed_inputs()
    want = _alone(eager, seqs)
    dense = torch.randint(3, VOCAB, (2, 3 * WINDOW + 1))
    with torch.inference_mode():
        got = fused(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        got_dense = fused(input_ids=dense, use_cache=False).logits
        again = fused(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        want_dense = eager(input_ids=dense, use_cache=False).logits
    torch.testing.assert_close(got_dense, want_dense, rtol=1e-4, atol=1e-4)
    assert calls["varlen"] == 2 * LAYERS
