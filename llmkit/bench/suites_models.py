"""End-to-end suites: ``bert`` (encoder forward), ``gpt2_prefill``, ``gpt2_decode`` and
``llama_prefill``.

Models are HuggingFace ``BertModel`` / ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` built from a
config of the shapes file with random weights (no download), in eval mode. Implementations,
all with the same weights:

* ``eager``: the HuggingFace model as shipped (its default SDPA attention), the baseline;
* ``hf+swap``: a copy passed through ``llmkit.swap``;
* ``hf+quantize[w8a8]``: a copy passed through ``llmkit.quantize(mode="w8a8")``;
* ``hf+swap+quantize[w8a8]``: both;
* ``torch.compile``: ``torch.compile`` of the HuggingFace model (prefill only);
* ``llmkit.models.BERT`` / ``llmkit.models.GPT``: llmkit's own model loaded with
  ``from_hf`` from the HuggingFace one (no Llama model of llmkit's own).

``gpt2_prefill`` / ``llama_prefill`` time one plain forward, as a user's ``model(input_ids,
attention_mask=...)`` runs it: the LM head computes the logits of every position on both
sides (``generate``'s own prefill passes ``logits_to_keep=1`` and computes only the last).

``gpt2_decode`` times ``generate`` (greedy, ``new`` tokens after a ``prompt``-token
prompt, prompt prefill included) and reports new tokens per second. Every
implementation's output is checked on one forward pass: logits (last hidden state for
BERT) close to the HuggingFace model's, or, for quantized copies, a cosine similarity of
at least 0.98.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from . import formulas
from .suite import BASELINE, Case, Context, Impl, Suite, llmkit_attr, optional_module, register

_MODEL_CACHE: dict[tuple[str, str, str], Any] = {}


def hf_model(family: str, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """A HuggingFace BERT or GPT-2 with random weights of the given shape."""
    import transformers as tf

    config: Any  # (transformers' classes, imported here)
    model: Any
    if family == "bert":
        config = tf.BertConfig(
            vocab_size=cfg["vocab"],
            hidden_size=cfg["hidden"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            intermediate_size=cfg["ffn"],
            max_position_embeddings=cfg["positions"],
        )
        model = tf.BertModel(config)
    elif family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=cfg["vocab"],
            n_positions=cfg["positions"],
            n_embd=cfg["hidden"],
            n_layer=cfg["layers"],
            n_head=cfg["heads"],
            n_inner=cfg["ffn"],
        )
        model = tf.GPT2LMHeadModel(config)
    elif family == "llama":
        config = tf.LlamaConfig(
            vocab_size=cfg["vocab"],
            max_position_embeddings=cfg["positions"],
            hidden_size=cfg["hidden"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            num_key_value_heads=cfg.get("kv_heads", cfg["heads"]),
            intermediate_size=cfg["ffn"],
        )
        model = tf.LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown model family {family!r}")
    return model.to(device=device, dtype=dtype).eval()


def _first_tensor(out: Any) -> torch.Tensor:
    """Logits or last hidden state from whatever a model's forward returns."""
    for attr in ("logits", "last_hidden_state"):
        t = getattr(out, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"cannot find logits in a {type(out).__name__}")


def _is_hf(model: Any) -> bool:
    """A HuggingFace model (or a torch.compile wrapper of one)."""
    import transformers

    return isinstance(getattr(model, "_orig_mod", model), transformers.PreTrainedModel)


def _variants(ctx: Context, family: str, base: Any) -> list[tuple[str, Callable[[], Any] | None, str | None, bool]]:
    """(name, make-model, skip reason, quantized) for every implementation but the baseline."""
    swap, why_swap = llmkit_attr("swap")
    quantize, why_q = llmkit_attr("quantize")
    out: list[tuple[str, Callable[[], Any] | None, str | None, bool]] = []

    def swapped() -> Any:
        m = copy.deepcopy(base)
        swap(m)
        return m

    def quantized(do_swap: bool) -> Any:
        m = copy.deepcopy(base)
        if do_swap:
            swap(m)
        quantize(m, mode="w8a8")
        return m

    out.append(("hf+swap", swapped if swap else None, why_swap, False))
    out.append(("hf+quantize[w8a8]", (lambda: quantized(False)) if quantize else None, why_q, True))
    out.append(
        ("hf+swap+quantize[w8a8]", (lambda: quantized(True)) if swap and quantize else None, why_swap or why_q, True)
    )
    if family == "llama":
        return out  # llmkit has no Llama model of its own
    cls_name = "BERT" if family == "bert" else "GPT"
    cls, why = llmkit_attr(f"models.{cls_name}")
    from_hf = getattr(cls, "from_hf", None) if cls is not None else None
    if cls is not None and from_hf is None:
        why = f"llmkit.models.{cls_name} has no from_hf"
    out.append(
        (f"llmkit.models.{cls_name}", (lambda: from_hf(base).to(ctx.device).eval()) if from_hf else None, why, False)
    )
    return out


def _model_builder(family: str, pass_kind: str):
    def build(ctx: Context, point: dict[str, Any], pass_: str, dtype: torch.dtype) -> Case:
        suite = "bert" if family == "bert" else f"{family}_{pass_kind}"
        cfg = ctx.shapes.model(point["model"])
        if cfg["family"] != family:
            raise ValueError(f"suite {suite}: model {point['model']} is a {cfg['family']} shape")
        b = point["B"]
        s = point["S"] if pass_kind == "prefill" else point["prompt"]
        if optional_module("transformers") is None:
            return Case(
                suite, pass_, point, dtype, None, None, [Impl.skipped(BASELINE, "transformers is not installed")]
            )
        key = (point["model"], str(ctx.device), str(dtype))
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()  # one model alive at a time
            _MODEL_CACHE[key] = hf_model(family, cfg, ctx.device, dtype)
        base = _MODEL_CACHE[key]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg["vocab"], (b, s), generator=gen).to(ctx.device)
        mask = torch.ones_like(ids)

        def forward(model: Any) -> Callable[[], Any]:
            def run() -> torch.Tensor:
                with torch.no_grad():
                    if _is_hf(model):
                        return _first_tensor(model(input_ids=ids, attention_mask=mask))
                    return _first_tensor(model(ids))  # llmkit's models; the mask is all ones

            return run

        new = point.get("new", 0)

        def timed(model: Any, generate: bool) -> Callable[[], Any]:
            if not generate:
                return forward(model)

            def run() -> Any:
                with torch.no_grad():
                    if _is_hf(model):
                        return model.generate(
                            input_ids=ids,
                            attention_mask=mask,
                            max_new_tokens=new,
                            min_new_tokens=new,
                            do_sample=False,
                            pad_token_id=0,
                        )
                    return model.generate(ids, max_new_tokens=new)

            return run

        generate = pass_kind == "decode"
        made: dict[str, Any] = {}
        impls = [
            Impl(
                BASELINE,
                fn=timed(base, generate),
                output=forward(base),
                check="none",
                note="HuggingFace transformers as shipped",
            )
        ]
        if ctx.compile and not generate:

            def make_compiled() -> Callable[[], Any]:
                return forward(torch.compile(base))

            compiled_check: dict[str, Any] = {} if dtype == torch.float32 else {"check": "cosine", "min_cosine": 0.995}
            impls.append(Impl("torch.compile", make=make_compiled, **compiled_check))
        for name, make_model, why, quantized in _variants(ctx, family, base):
            if make_model is None:
                impls.append(Impl.skipped(name, why or "missing"))
                continue

            def make(make_model=make_model, impl_name=name) -> Callable[[], Any]:
                model = make_model()
                made[impl_name] = model
                return timed(model, generate)

            check: dict[str, Any]
            if quantized:
                check = {"check": "cosine", "min_cosine": 0.98}
            elif dtype != torch.float32:  # half precision through many layers: direction, not digits
                check = {"check": "cosine", "min_cosine": 0.995}
            else:
                check = {"check": "close"}
            impls.append(Impl(name, make=make, **check))
            impls[-1].output = lambda n=name: forward(made[n])()
        layers, hidden, ffn = cfg["layers"], cfg["hidden"], cfg["ffn"]
        if generate:
            tokens = b * new
            flops = formulas.transformer_tokens(layers, hidden, ffn, b * s, s, causal=True)
            flops += sum(formulas.transformer_tokens(layers, hidden, ffn, b, s + i + 1) for i in range(new))
        else:
            tokens = b * s
            # a gated MLP (Llama) has three ffn-sized matrices where GPT-2 has two: ffn * 1.5
            ffn_eff = ffn * 3 // 2 if family == "llama" else ffn
            flops = formulas.transformer_tokens(layers, hidden, ffn_eff, tokens, s, causal=family != "bert")
        return Case(suite, pass_, point, dtype, formulas.Work(flops, 0.0), None, impls, tokens=tokens, cuda_graph=False)

    return build


register(
    Suite(
        "bert",
        "model",
        ("prefill",),
        _model_builder("bert", "prefill"),
        "HuggingFace BERT encoder forward (random weights): eager vs swapped vs quantized vs compiled",
    )
)
register(
    Suite(
        "gpt2_prefill",
        "model",
        ("prefill",),
        _model_builder("gpt2", "prefill"),
        "HuggingFace GPT-2 forward over a prompt (random weights)",
    )
)
register(
    Suite(
        "llama_prefill",
        "model",
        ("prefill",),
        _model_builder("llama", "prefill"),
        "HuggingFace Llama forward over a prompt (random weights): RMSNorm, SwiGLU, GQA",
    )
)
register(
    Suite(
        "gpt2_decode",
        "model",
        ("decode",),
        _model_builder("gpt2", "decode"),
        "greedy generate: new tokens per second, prompt prefill included",
    )
)
