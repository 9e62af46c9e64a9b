"""llmkit modules with the PyTorch ecosystem: torch.compile, torch.export, DDP, autocast.

Compiles use ``fullgraph=True`` (any graph break fails the test) with the
``aot_eager`` backend: it traces through dynamo and AOTAutograd (fake tensors, the ops'
fake implementations and autograd formulas) like inductor does, without spending a
minute of the 2-core CI machine on C++ code generation.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import llmkit
import llmkit.nn as lnn
from llmkit.models import GPT, GPTConfig

D, H, FF = 32, 4, 48


def _layer(**kw) -> lnn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return lnn.TransformerEncoderLayer(D, H, FF, dropout=0.0, activation="gelu", batch_first=True, **kw)


def _llmkit_ops_in(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "llmkit" in str(n.target)}


@pytest.mark.parametrize("norm_first", [False, True])
def test_compile_fullgraph_encoder_layer_forward_backward(norm_first):
    torch._dynamo.reset()
    layer = _layer(norm_first=norm_first)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, D, requires_grad=True)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    out = compiled(x, src_key_padding_mask=kpm)
    ref = layer(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (rx,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_swapped_hf_model():
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(cfg).eval()
    llmkit.swap(model)
    ids = torch.randint(0, 60, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1  # one graph: no breaks
    gelu = "llmkit.gelu"  # CPU: the GEMM adds the bias (the bias_in_gemm variant of the linear point)
    assert _llmkit_ops_in(graphs[0]) == {
        "llmkit.layer_norm",
        "llmkit.add_layer_norm",
        gelu,
        "llmkit.scaled_dot_product_attention",
    }


def test_export_encoder_layer():
    layer = _layer().eval()
    x = torch.randn(2, 7, D)
    exported = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("llmkit.scaled_dot_product_attention" in t for t in targets)
    assert any("llmkit.add_layer_norm" in t for t in targets)
    x2 = torch.randn(2, 7, D)
    torch.testing.assert_close(exported.module()(x2), layer(x2), atol=1e-6, rtol=1e-6)


# -- DDP ----------------------------------------------------------------------------------


def _tiny_gpt() -> GPT:
    torch.manual_seed(1234)
    return GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=3))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _ddp_worker(rank: int, world: int, init_file: str, ids: torch.Tensor, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_tiny_gpt())
        shard = ids.chunk(world)[rank]
        _loss(model, shard).backward()
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_same_gradients_as_one():
    ids = torch.randint(0, 50, (4, 12))
    single = _tiny_gpt()
    _loss(single, ids).backward()  # mean over the whole batch = average of the two shards' means
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_ddp_worker, args=(2, init_file, ids, tmp), nprocs=2, join=True)
        grads = [torch.load(os.path.join(tmp, f"grads{r}.pt")) for r in range(2)]
    for name, p in single.named_parameters():
        torch.testing.assert_close(grads[0][name], p.grad, atol=1e-5, rtol=1e-4)
        assert torch.equal(grads[0][name], grads[1][name])


# -- autocast ------------------------------------------------------------------------------


def test_autocast_bf16_encoder_layer_and_gpt():
    layer = _layer()
    ref = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, activation="gelu", batch_first=True)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = layer(x), ref(x)
    full = layer(x)
    err_ours = (ours.float() - full).abs().max().item()
    err_theirs = (theirs.float() - full).abs().max().item()
    assert torch.isfinite(ours).all() and err_ours < 0.1
    assert err_ours <= 2 * err_theirs + 1e-2  # no worse than torch.nn's own bf16 autocast error

    gpt = _tiny_gpt()
    ids = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = gpt(ids)
        _loss(gpt, ids).backward()
    assert logits.dtype == torch.bfloat16
    full = gpt(ids)
    assert (logits.float() - full).abs().max().item() < 0.05 * full.abs().max().item() + 0.05
    assert all(torch.isfinite(p.grad).all() for p in gpt.parameters())
