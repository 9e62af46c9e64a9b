"""llmkit.models.GPT and BERT: HuggingFace weights, KV cache, generate, gradients.

HuggingFace models are built from small configs with random weights (no downloads);
weights are drawn wider than the usual N(0, 0.02) so that logits are far from
uniform and greedy decoding does not collapse onto one token.
"""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.models import BERT, GPT, BERTConfig, GPTConfig, KVCache

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-4, rtol=1e-4)
VOCAB = 97


def _widen_(model: torch.nn.Module, std: float = 0.15) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


def hf_gpt2(**kw) -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=48,
        n_layer=3,
        n_head=4,
        bos_token_id=0,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **kw,
    )
    return _widen_(transformers.GPT2LMHeadModel(cfg)).eval()


def hf_bert(**kw) -> torch.nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=40,
        num_hidden_layers=2,
        num_attention_heads=5,
        intermediate_size=52,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )
    return _widen_(transformers.BertModel(cfg)).eval()


# -- GPT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"activation_function": "gelu"}, {"tie_word_embeddings": False}, {"n_inner": 70}])
def test_gpt_from_hf_gives_the_same_logits(kw):
    hf = hf_gpt2(**kw)
    ours = GPT.from_hf(hf)
    assert (ours.lm_head.weight is ours.wte.weight) == hf.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (3, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **TOL)


@pytest.mark.parametrize("bias_in_gemm", [True, False])
def test_gpt_gradients_match_hf(monkeypatch, bias_in_gemm):
    from conftest import select_linear_path

    select_linear_path(monkeypatch, "onednn" if bias_in_gemm else "bias_gelu")
    hf = hf_gpt2()
    ours = GPT.from_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 9))
    target = torch.randn(2, 9, VOCAB)
    (hf(ids).logits * target).sum().backward()
    (ours(ids) * target).sum().backward()
    base = hf.transformer
    torch.testing.assert_close(ours.wte.weight.grad, base.wte.weight.grad, **TOL)
    torch.testing.assert_close(ours.wpe.weight.grad, base.wpe.weight.grad, **TOL)
    for mine, theirs in zip(ours.h, base.h, strict=True):
        torch.testing.assert_close(mine.attn.c_attn.weight.grad, theirs.attn.c_attn.weight.grad.t(), **TOL)
        torch.testing.assert_close(mine.mlp.c_fc.bias.grad, theirs.mlp.c_fc.bias.grad, **TOL)
        torch.testing.assert_close(mine.ln_1.weight.grad, theirs.ln_1.weight.grad, **TOL)
        torch.testing.assert_close(mine.ln_2.bias.grad, theirs.ln_2.bias.grad, **TOL)


def test_cached_decoding_equals_full_forward():
    model = _widen_(GPT(GPTConfig(vocab_size=VOCAB, n_positions=40, n_embd=24, n_layer=2, n_head=3))).eval()
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 17)
        steps = [model(ids[:, :9], cache)]  # prefill
        steps.append(model(ids[:, 9:12], cache))  # a chunk of 3 against the cache
        steps += [model(ids[:, i : i + 1], cache) for i in range(12, 17)]  # one token at a time
    assert cache.uniform_length == 17
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_ragged_cache_writes_each_sequence_at_its_length():
    model = _widen_(GPT(GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2))).eval()
    a, b = torch.randint(0, VOCAB, (1, 7)), torch.randint(0, VOCAB, (1, 4))
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
    nxt = torch.randint(0, VOCAB, (2, 1))
    with torch.no_grad():
        cache = model.new_cache(2, 10)
        model(padded, cache)
        cache.set_lengths(torch.tensor([7, 4]))
        assert cache.uniform_length is None
        got = model(nxt, cache)[:, -1]
        want_a = model(torch.cat([a, nxt[:1]], 1))[:, -1]
        want_b = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    torch.testing.assert_close(got, torch.cat([want_a, want_b]), atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [8, 5]


def test_decoding_uses_the_decode_attention_op(monkeypatch):
    calls = []
    real = llmkit.ops.decode_attention
    monkeypatch.setattr(llmkit.ops, "decode_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    model = GPT(GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    model.generate(torch.randint(0, VOCAB, (3, 5)), 4)
    assert calls == [torch.Size([3, 2, 1, 8])] * 2 * 3  # 3 decode steps after the prefill, 2 layers


def test_greedy_generate_matches_hf():
    hf = hf_gpt2()
    ours = GPT.from_hf(hf)
    ids = torch.randint(2, VOCAB, (3, 6))
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, 12, eos_token_id=1, pad_token_id=0)  # the HF config's eos ends rows there too
    assert got.shape == want.shape
    for row in range(ids.shape[0]):
        diverge = (got[row] != want[row]).nonzero()
        if len(diverge):
            # Random weights can leave two tokens within float32 noise of each other; a
            # divergence is only acceptable at such a near tie of the HF logits.
            t = int(diverge[0])
            with torch.no_grad():
                logits = hf(want[row : row + 1, :t]).logits[0, -1]
            gap = logits[want[row, t]] - logits[got[row, t]]
            assert abs(float(gap)) < 1e-4, f"row {row} diverges at {t} with a logit gap of {float(gap)}"
    # not a degenerate continuation (random weights may well repeat a few tokens: 3 seen)
    assert len(set(want[:, 6:].flatten().tolist())) >= 2


def test_left_padded_generate_matches_hf_and_unpadded_rows():
    hf = hf_gpt2()
    ours = GPT.from_hf(hf)
    ids = torch.randint(2, VOCAB, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :7] = 0
    # the HF config's eos_token_id=1 ends a row in HF's generate: ours is told the same
    got = ours.generate(ids, 6, attention_mask=mask, eos_token_id=1, pad_token_id=0)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    alone = ours.generate(ids[:1, 3:], 6, eos_token_id=1, pad_token_id=0)
    # alone stops at its eos; in the batch that row goes on with pad tokens
    n = alone.shape[1] - 5
    assert torch.equal(got[0, 8 : 8 + n], alone[0, 5:])
    assert bool((got[0, 8 + n :] == 0).all())


def test_eos_stops_and_pads_like_hf():
    hf = hf_gpt2()
    ours = GPT.from_hf(hf)
    ids = torch.randint(2, VOCAB, (4, 5))
    free = ours.generate(ids, 10)
    eos = int(free[0, 7])  # a token that row 0 produces, so generation hits it
    got = ours.generate(ids, 10, eos_token_id=eos, pad_token_id=0)
    want = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    row = got[0, 5:].tolist()
    assert eos in row and all(t == 0 for t in row[row.index(eos) + 1 :])


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = _widen_(GPT(GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2))).eval()
    ids = torch.randint(0, VOCAB, (2, 4))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = model.generate(ids, 8, do_sample=True, temperature=0.8, top_k=20, generator=g1)
    b = model.generate(ids, 8, do_sample=True, temperature=0.8, top_k=20, generator=g2)
    assert torch.equal(a, b)
    top1 = model.generate(ids, 8, do_sample=True, top_k=1)
    assert torch.equal(top1, model.generate(ids, 8))


def test_top_k_restricts_the_support():
    logits = torch.randn(2, VOCAB)
    allowed = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        tok = GPT._pick(logits, True, 1.5, 5, g)
        assert all(t in row for t, row in zip(tok.tolist(), allowed.tolist(), strict=True))


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=40), "n_positions"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(attention_mask=torch.tensor([[1, 1, 0]])), "left"),
    ],
)
def test_generate_rejects_bad_arguments(bad, match):
    model = GPT(GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    kw = dict(max_new_tokens=2) | bad
    with pytest.raises(ValueError, match=match):
        model.generate(torch.randint(0, VOCAB, (1, 3)), **kw)


def test_cache_overflow_and_config_errors():
    model = GPT(GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.randint(0, VOCAB, (1, 5)), cache)
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="n_positions"):
        KVCache(model.config, 1, 33, dtype=torch.float32, device="cpu")


def test_cache_step_methods_outside_a_step_say_so():
    model = GPT(GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    cache = model.new_cache(1, 4)
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(RuntimeError, match=r"KVCache.end: no step in progress; call begin\(t\) first"):
        cache.end()
    with pytest.raises(RuntimeError, match=r"KVCache.attend: no step in progress"):
        cache.attend(0, q, q, q)
    cache.begin(1)
    cache.attend(0, q, q, q)
    cache.end()
    assert cache.lengths.tolist() == [1]
    with pytest.raises(RuntimeError, match="KVCache.end: no step in progress"):
        cache.end()  # a step ends once


def test_gpt2_small_default_shape():
    with torch.device("meta"):
        model = GPT()
    n = sum(p.numel() for p in model.parameters())
    assert n == 124_439_808  # GPT-2 small, tied embeddings
    assert GPTConfig.gpt2("medium").n_layer == 24


def test_gpt_from_hf_rejects_unsupported_configs():
    with pytest.raises(ValueError, match="inverse layer"):
        GPT.from_hf(
            transformers.GPT2LMHeadModel(
                transformers.GPT2Config(
                    vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, scale_attn_by_inverse_layer_idx=True
                )
            )
        )


def test_from_hf_of_a_quantized_model_says_so_and_quantizing_ours_instead_works():
    hf = hf_gpt2().eval()
    ours = GPT.from_hf(hf).eval()
    llmkit.quantize(hf, "w8a16")
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn is an llmkit\.nn\.Int8Linear"):
        GPT.from_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = ours(ids)
        report = llmkit.quantize(ours, "w8a16")
        got = ours(ids)
    assert report.quantized
    cos = torch.nn.functional.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0)
    assert cos > 0.99


# -- BERT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"hidden_act": "gelu_new"}])
def test_bert_from_hf_gives_the_same_hidden_states(kw):
    hf = hf_bert(**kw)
    ours = BERT.from_hf(hf)
    ids = torch.randint(0, VOCAB, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    types = torch.randint(0, 2, (3, 11))
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types)
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **TOL)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL)


def test_bert_from_hf_head_model_and_gradients():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=3,
        intermediate_size=30,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = _widen_(transformers.BertForSequenceClassification(cfg))
    ours = BERT.from_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 7))
    want = hf.bert(ids).last_hidden_state
    got = ours(ids).last_hidden_state
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    hl, ol = hf.bert.encoder.layer[0], ours.encoder.layers[0]
    torch.testing.assert_close(ol.linear1.weight.grad, hl.intermediate.dense.weight.grad, **TOL)
    torch.testing.assert_close(ol.self_attn.in_proj_weight.grad[:24], hl.attention.self.query.weight.grad, **TOL)
    torch.testing.assert_close(ol.norm2.weight.grad, hl.output.LayerNorm.weight.grad, **TOL)


def test_bert_defaults_and_errors():
    with torch.device("meta"):
        model = BERT()
    assert sum(p.numel() for p in model.parameters()) == 109_482_240  # bert-base-uncased
    with pytest.raises(ValueError, match="attention_mask"):
        BERT(BERTConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))(
            torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4)
        )
    with pytest.raises(ValueError, match="relative position"):
        BERT.from_hf(
            transformers.BertModel(
                transformers.BertConfig(
                    vocab_size=VOCAB,
                    hidden_size=8,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=8,
                    position_embedding_type="relative_key",
                )
            )
        )


# -- the demo (the README's main command) -----------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--layers", "1", "--seq-len", "8", "--new-tokens", "3", "--repeats", "1"],
        ["demo", "--model", "bert", "--layers", "1", "--batch", "2", "--seq-len", "8", "--repeats", "1"],
        ["demo", "--no-hf", "--layers", "1", "--seq-len", "5", "--new-tokens", "2", "--repeats", "1"],
    ],
)
def test_demo_runs_checks_and_prints_tables(argv, capsys):
    from llmkit.cli import main

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    assert "vs reference" in out
    if "--no-hf" in argv:
        assert "HF" not in out.split("check")[0].split("model")[-1]
    else:
        assert "HF + llmkit.swap" in out and "identical" in out or "--model" in argv
    if "--model" not in argv:  # tokens/s is new tokens over the generate time, never a difference of medians
        new = int(argv[argv.index("--new-tokens") + 1])
        rows = [r.split() for r in out.splitlines() if r.startswith(("HF ", "HF + llmkit.swap", "llmkit GPT "))]
        rows = [r for r in rows if len(r) >= 6 and r[-1].endswith("x")]
        assert rows
        for r in rows:
            generate_ms, tokens_per_s = float(r[-3]), float(r[-2])
            assert generate_ms > 0 and tokens_per_s == pytest.approx(new / (generate_ms / 1e3), rel=0.02, abs=0.1)


def test_demo_rejects_bad_sizes():
    from llmkit.demo import main

    with pytest.raises(SystemExit, match="seq-len"):
        main(["--seq-len", "1020", "--new-tokens", "10", "--layers", "1"])
    with pytest.raises(SystemExit, match="batch"):
        main(["--batch", "0"])
