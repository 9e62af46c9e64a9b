"""Every llmkit op is a well-formed torch.library custom op on the reference path.

``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT dispatch),
``gradcheck`` in float64, and graph capture: ``torch.compile(fullgraph=True)`` and
``torch.export`` see each op as a single node with no graph break.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import llmkit  # noqa: F401  (registers the ops)
from llmkit import ops, use_backend

L = torch.ops.llmkit


def rq(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


OPCHECK_CASES = {
    "layer_norm": lambda: (L.layer_norm, (rq(3, 5, 7), [7], rq(7), rq(7), 1e-5)),
    "layer_norm 2 dims, no affine": lambda: (L.layer_norm, (rq(3, 5, 7), [5, 7], None, None, 1e-5)),
    "rms_norm": lambda: (L.rms_norm, (rq(4, 9), [9], rq(9), 1e-6)),
    "add_layer_norm": lambda: (L.add_layer_norm, (rq(3, 7), rq(3, 7), [7], rq(7), rq(7), 1e-5)),
    "gelu": lambda: (L.gelu, (rq(3, 7), "none")),
    "gelu tanh": lambda: (L.gelu, (rq(3, 7), "tanh")),
    "bias_gelu": lambda: (L.bias_gelu, (rq(3, 7), rq(7), "tanh")),
    "geglu": lambda: (L.geglu, (rq(3, 7), rq(3, 7), "none")),
    "swiglu": lambda: (L.swiglu, (rq(3, 7), rq(3, 7))),
    "sdpa causal gqa": lambda: (
        L.scaled_dot_product_attention,
        (rq(2, 4, 5, 8), rq(2, 2, 6, 8), rq(2, 2, 6, 8), None, 0.0, True, 0.3, True, 0, 0),
    ),
    "sdpa float mask with grad and dropout": lambda: (
        L.scaled_dot_product_attention,
        (rq(1, 2, 5, 8), rq(1, 2, 6, 8), rq(1, 2, 6, 8), rq(1, 1, 5, 6), 0.25, False, 0.35, False, 1234, 7),
    ),
    "decode_attention": lambda: (
        L.decode_attention,
        (
            torch.randn(2, 4, 2, 8),
            torch.randn(2, 2, 6, 8),
            torch.randn(2, 2, 6, 8),
            torch.tensor([3, 6], dtype=torch.int32),
            0.3,
            True,
        ),
    ),
    "varlen_attention bottom-right window gqa": lambda: (
        L.varlen_attention,
        (
            rq(9, 4, 8),
            rq(11, 2, 8),
            rq(11, 2, 8),
            torch.tensor([0, 3, 3, 9], dtype=torch.int32),
            torch.tensor([0, 5, 6, 11], dtype=torch.int32),
            6,
            5,
            0.0,
            True,
            0.3,
            True,
            0,
            0,
            2,
            -1,
            True,
            0.0,
            None,
        ),
    ),
    "quantize_int8": lambda: (L.quantize_int8, (torch.randn(3, 7), 0)),
    "int8_matmul int32": lambda: (L.int8_matmul, (i8(5, 7), i8(7, 3), None, None, None, None)),
    "int8_matmul scaled": lambda: (
        L.int8_matmul,
        (i8(5, 7), i8(7, 3), torch.rand(5), torch.rand(3), torch.rand(3), torch.bfloat16),
    ),
    "int8_linear": lambda: (
        L.int8_linear,
        (torch.randn(2, 5, 7), i8(3, 7), torch.rand(3), torch.rand(3), "w8a8", "gelu"),
    ),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck(name):
    op, args = OPCHECK_CASES[name]()
    with use_backend("reference"):
        opcheck(op, args)


GRADCHECK_CASES = {
    "layer_norm": (lambda x, w, b: ops.layer_norm(x, [x.shape[-1]], w, b), [(3, 6), (6,), (6,)]),
    "rms_norm": (lambda x, w: ops.rms_norm(x, [x.shape[-1]], w, 1e-6), [(3, 6), (6,)]),
    "add_layer_norm": (lambda x, r, w, b: ops.add_layer_norm(x, r, [6], w, b), [(3, 6), (3, 6), (6,), (6,)]),
    "gelu": (lambda x: ops.gelu(x), [(4, 5)]),
    "gelu tanh": (lambda x: ops.gelu(x, "tanh"), [(4, 5)]),
    "bias_gelu": (lambda x, b: ops.bias_gelu(x, b, "none"), [(4, 5), (5,)]),
    "geglu tanh": (lambda g, u: ops.geglu(g, u, "tanh"), [(4, 5), (4, 5)]),
    "swiglu": (lambda g, u: ops.swiglu(g, u), [(4, 5), (4, 5)]),
    "sdpa causal gqa": (
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        [(1, 4, 5, 4), (1, 2, 7, 4), (1, 2, 7, 3)],
    ),
    "varlen_attention causal gqa": (
        lambda q, k, v: ops.varlen_attention(
            q, k, v, *(torch.tensor([0, 2, 2, 5], dtype=torch.int32),) * 2, 3, 3, is_causal=True, enable_gqa=True
        ),
        [(5, 4, 4), (5, 2, 4), (5, 2, 3)],
    ),
    "sdpa float mask": (
        lambda q, k, v, m: ops.scaled_dot_product_attention(q, k, v, m),
        [(1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4), (1, 1, 3, 5)],
    ),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_float64_reference(name):
    fn, shapes = GRADCHECK_CASES[name]
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    with use_backend("reference"):
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


def test_gradcheck_attention_dropout_is_a_fixed_function_of_the_seed():
    q, k, v = (torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        out, _ = L.scaled_dot_product_attention(q, k, v, None, 0.3, False, 0.5, False, 99, 0)
        return out

    with use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


def test_dropout_is_reproducible_under_manual_seed():
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    torch.manual_seed(5)
    a = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    b = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    c = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _block(x, w, b, r, bias, q_w):
    h, res = ops.add_layer_norm(x, r, [x.shape[-1]], w, b)
    h = ops.bias_gelu(h, bias, "tanh")
    B, S, E = h.shape
    q = h.view(B, S, 2, E // 2).transpose(1, 2)
    a = ops.scaled_dot_product_attention(q, q, q, is_causal=True)
    h = a.transpose(1, 2).reshape(B, S, E)
    h = ops.rms_norm(h, [E], w)
    return ops.int8_linear(h, q_w, torch.ones(q_w.shape[0]), None, "w8a8", "none") + res.sum()


def _block_args():
    return (torch.randn(2, 5, 8), torch.randn(8), torch.randn(8), torch.randn(2, 5, 8), torch.randn(8), i8(6, 8))


def test_torch_compile_fullgraph_sees_no_graph_break():
    torch._dynamo.reset()
    args = _block_args()
    expected = _block(*args)
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), expected)


def test_torch_export_keeps_each_op_as_one_node():
    class Block(torch.nn.Module):
        def forward(self, *args):
            return _block(*args)

    ep = torch.export.export(Block(), _block_args())
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    for name in ("add_layer_norm", "bias_gelu", "scaled_dot_product_attention", "rms_norm", "int8_linear"):
        assert f"llmkit.{name}.default" in targets, targets
    args = _block_args()
    torch.testing.assert_close(ep.module()(*args), _block(*args))
