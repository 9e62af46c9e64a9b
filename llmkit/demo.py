"""``llmkit demo``: swap llmkit into a model, check it against the original, time both.

Default (``--model gpt2``): a GPT-2-small-shaped model with random weights. When
transformers is installed, a HuggingFace ``GPT2LMHeadModel`` is built from a config
(no download) and three models with the same weights are compared:

* ``HF`` (the model as transformers runs it, eager with its default attention),
* ``HF + llmkit.swap`` (the same object after ``llmkit.swap``),
* ``llmkit GPT`` (:class:`llmkit.models.GPT` loaded with ``GPT.from_hf``, KV-cache
  decoding through :func:`llmkit.ops.decode_attention`).

Checks: logits of each against the HF model, llmkit GPT on the backends dispatch
picks here against the ``reference`` backend, and greedy tokens. Timings: a prefill
forward (``--batch`` x ``--seq-len`` tokens) and greedy decoding of ``--new-tokens``
tokens, medians over ``--repeats`` rounds that interleave the models (so load on the
machine hits all of them alike), on whatever device this is. ``--model bert`` does the
same for a BERT-base-shaped encoder (forward only).

Without transformers only the llmkit model is checked (against the reference backend)
and timed. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["add_arguments", "run", "main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options (used by ``llmkit demo`` and ``python -m llmkit.demo``)."""
    p.add_argument("--model", choices=("gpt2", "bert"), default="gpt2", help="which model (default gpt2)")
    p.add_argument(
        "--size", default=None, help="gpt2: small (default) / medium / large / xl; bert: base (default) / large"
    )
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--seq-len", type=int, default=32, help="prompt / input length in tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=8, help="gpt2: greedy tokens to decode (default 8)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3, after one warm-up)")
    p.add_argument("--no-hf", action="store_true", help="do not use transformers even if installed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")


@dataclasses.dataclass
class _Check:
    name: str
    value: str
    limit: str
    ok: bool


_STARTED = [time.perf_counter()]


def _progress(msg: str) -> None:
    """One line of progress on stderr (the report itself goes to stdout)."""
    print(f"  [{time.perf_counter() - _STARTED[0]:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_rounds(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, what: str = "timing"
) -> dict[str, float]:
    """Median seconds of each fn over ``repeats`` interleaved rounds, after one warm-up."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(repeats + 1):
        _progress(f"{what}: {'warm-up' if round_ == 0 else f'round {round_} of {repeats}'} ({', '.join(fns)})")
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _logit_check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> _Check:
    rel = 1e-4 if dtype == torch.float32 else 3e-2
    err = (got.double() - want.double()).abs().max().item()
    limit = rel * max(want.double().abs().max().item(), 1.0)
    return _Check(name, f"{err:.2e}", f"<= {limit:.1e}", err <= limit)


def _hf_available(args: argparse.Namespace) -> bool:
    if args.no_hf:
        return False
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("llmkit demo: --device cuda but no CUDA GPU is available")
    from .errors import UsageError
    from .models import GPTConfig

    sizes = list(GPTConfig.GPT2_SIZES) if args.model == "gpt2" else list(_BERT_SHAPES)
    if args.size is not None and args.size not in sizes:
        raise UsageError(f"--size for {args.model} is one of {', '.join(sizes)}, got {args.size!r}")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    for name in ("batch", "seq_len", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"llmkit demo: --{name.replace('_', '-')} must be >= 1")
    if args.new_tokens < 1:
        raise SystemExit("llmkit demo: --new-tokens must be >= 1")
    torch.manual_seed(args.seed)
    return device, dtype


def _randomize_(model: torch.nn.Module, std: float = 0.02) -> None:
    """GPT-2/BERT-style random init, fast (HF's own init of a 124M model is slow on a CPU)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def _hf_without_init(cls: Any, config: Any) -> Any:
    """A transformers model whose weights ``_randomize_`` will draw (skips HF's slower init).

    Built on the CPU with transformers' ``no_init_weights`` where it exists, so that
    buffers made in ``__init__`` (position ids, ...) are real.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # other transformers versions: a normal (slower) construction
        return cls(config)
    with no_init_weights():
        return cls(config)


# -- GPT-2 --------------------------------------------------------------------------------


def _gpt2(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[_Check], list[str]]:
    import llmkit
    from llmkit.models import GPT, GPTConfig

    size = args.size or "small"
    cfg = GPTConfig.gpt2(size, **({"n_layer": args.layers} if args.layers else {}))
    if args.seq_len + args.new_tokens > cfg.n_positions:
        raise SystemExit(f"llmkit demo: --seq-len + --new-tokens must be <= {cfg.n_positions}")
    use_hf = _hf_available(args)
    hf: Any = None  # a transformers GPT2LMHeadModel (transformers is imported only here)
    if use_hf:
        import transformers

        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.n_positions,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        _progress(f"building a GPT-2 {size}-shaped HF GPT2LMHeadModel with random weights")
        hf = _hf_without_init(transformers.GPT2LMHeadModel, hf_cfg)
        hf.tie_weights()
        _randomize_(hf)
        hf = hf.to(device=device, dtype=dtype).eval()
        _progress("loading its weights into llmkit GPT (GPT.from_hf)")
        ours = GPT.from_hf(hf).eval()
    else:
        _progress(f"building a GPT-2 {size}-shaped llmkit GPT with random weights")
        ours = GPT(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    n = args.new_tokens
    checks: list[_Check] = []
    with torch.inference_mode():
        _progress("checking llmkit GPT against the reference backend, then greedy decoding")
        logits_ours = ours(ids)
        with llmkit.use_backend("reference"):
            logits_ref = ours(ids)
        checks.append(_logit_check("llmkit GPT: dispatched backends vs reference", logits_ours, logits_ref, dtype))
        tokens_ours = ours.generate(ids, n)
        if hf is not None:
            _progress("running HF (logits, greedy tokens)")
            logits_hf = hf(ids).logits
            tokens_hf = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
            checks.append(_logit_check("llmkit GPT vs HF (logits)", logits_ours, logits_hf, dtype))
            _progress("swapping llmkit into a copy of the HF model and checking it")
            swapped = _swapped_copy_of(hf)
            checks.append(_logit_check("HF + llmkit.swap vs HF (logits)", swapped(ids).logits, logits_hf, dtype))
            tokens_swapped = swapped.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
            checks.append(_token_check("greedy tokens: HF + llmkit.swap vs HF", tokens_swapped, tokens_hf, dtype))
            checks.append(_token_check("greedy tokens: llmkit GPT vs HF", tokens_ours, tokens_hf, dtype))

        prefill: dict[str, Callable[[], Any]] = {}
        decode: dict[str, Callable[[], Any]] = {}
        if hf is not None:
            prefill["HF"] = lambda: hf(ids)
            prefill["HF + llmkit.swap"] = lambda: swapped(ids)
            decode["HF"] = lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            decode["HF + llmkit.swap"] = lambda: swapped.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        prefill["llmkit GPT"] = lambda: ours(ids)
        decode["llmkit GPT"] = lambda: ours.generate(ids, n)
        t_prefill = _timed_rounds(prefill, args.repeats, device, "timing prefill")
        t_decode = _timed_rounds(decode, args.repeats, device, f"timing generate ({n} tokens)")
    base = "HF" if hf is not None else "llmkit GPT"
    rows = [("model", "prefill ms", f"vs {base}", "generate ms", "tokens/s", f"vs {base}")]
    # tokens/s of generate, prefill included (like the gpt2_decode bench suite): no
    # difference of two noisy medians, which can be near zero or negative on a busy machine
    for name in t_prefill:
        rows.append(
            (
                name,
                f"{t_prefill[name] * 1e3:.1f}",
                f"{t_prefill[base] / t_prefill[name]:.2f}x",
                f"{t_decode[name] * 1e3:.1f}",
                f"{args.batch * n / t_decode[name]:.1f}",
                f"{t_decode[base] / t_decode[name]:.2f}x",
            )
        )
    head = (
        f"GPT-2 {size} shape: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, "
        f"vocab {cfg.vocab_size}, random weights"
        f"{' (HF GPT2LMHeadModel and llmkit GPT share them)' if hf is not None else ''}\n"
        f"batch {args.batch}, prompt {args.seq_len} tokens, {n} greedy new tokens; "
        "tokens/s = batch x new tokens / generate time (its prompt prefill included)"
    )
    return checks, [head, "", _table(rows)]


def _token_check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> _Check:
    same = bool(torch.equal(got, want))
    if same:
        return _Check(name, "identical", "identical", True)
    agree = (got == want).float().mean().item()
    # in half precision near-ties may flip a token; float32 must agree exactly
    return _Check(
        name, f"{agree:.0%} equal", "identical" if dtype == torch.float32 else "informative", dtype != torch.float32
    )


def _swapped_copy_of(model: Any) -> Any:
    import copy

    import llmkit

    swapped = copy.deepcopy(model)
    llmkit.swap(swapped)
    return swapped


# -- BERT ---------------------------------------------------------------------------------


_BERT_SHAPES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def _bert(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[_Check], list[str]]:
    import llmkit
    from llmkit.models import BERT, BERTConfig

    size = args.size or "base"
    shape = dict(_BERT_SHAPES[size], **({"num_hidden_layers": args.layers} if args.layers else {}))
    if args.seq_len > 512:
        raise SystemExit("llmkit demo: --seq-len must be <= 512 for BERT")
    cfg = BERTConfig(**shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    mask = torch.ones_like(ids)
    mask[: args.batch // 2, args.seq_len * 3 // 4 :] = 0  # pad a quarter of half the batch
    hf = None
    if _hf_available(args):
        import transformers

        _progress(f"building a BERT-{size}-shaped HF BertModel with random weights")
        hf = _hf_without_init(
            transformers.BertModel,
            transformers.BertConfig(**shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        )
        _randomize_(hf)
        hf = hf.to(device=device, dtype=dtype).eval()
        _progress("loading its weights into llmkit BERT (BERT.from_hf)")
        ours = BERT.from_hf(hf).eval()
    else:
        _progress(f"building a BERT-{size}-shaped llmkit BERT with random weights")
        ours = BERT(cfg).to(device=device, dtype=dtype).eval()
    checks: list[_Check] = []
    fns: dict[str, Callable[[], Any]] = {}
    with torch.inference_mode():
        _progress("checking llmkit BERT against the reference backend and HF")
        out_ours = ours(ids, attention_mask=mask).last_hidden_state
        with llmkit.use_backend("reference"):
            out_ref = ours(ids, attention_mask=mask).last_hidden_state
        checks.append(_logit_check("llmkit BERT: dispatched backends vs reference", out_ours, out_ref, dtype))
        if hf is not None:
            want = hf(ids, attention_mask=mask).last_hidden_state
            swapped = _swapped_copy_of(hf)
            checks.append(
                _logit_check(
                    "HF + llmkit.swap vs HF (hidden states)",
                    swapped(ids, attention_mask=mask).last_hidden_state,
                    want,
                    dtype,
                )
            )
            checks.append(_logit_check("llmkit BERT vs HF (hidden states)", out_ours, want, dtype))
            fns["HF"] = lambda: hf(ids, attention_mask=mask)
            fns["HF + llmkit.swap"] = lambda: swapped(ids, attention_mask=mask)
        fns["llmkit BERT"] = lambda: ours(ids, attention_mask=mask)
        times = _timed_rounds(fns, args.repeats, device, "timing forward")
    base = next(iter(times))
    rows = [("model", "forward ms", f"vs {base}", "tokens/s")]
    for name, t in times.items():
        rows.append((name, f"{t * 1e3:.1f}", f"{times[base] / t:.2f}x", f"{args.batch * args.seq_len / t:.0f}"))
    head = (
        f"BERT-{size} shape: {shape['num_hidden_layers']} layers, width {shape['hidden_size']}, "
        f"{shape['num_attention_heads']} heads, random weights\n"
        f"batch {args.batch} x {args.seq_len} tokens, half the batch padded by a quarter"
    )
    return checks, [head, "", _table(rows)]


# -- output -------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        cells = (c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args``; print the report; 0 if every check passed."""
    import llmkit

    device, dtype = _setup(args)
    started = _STARTED[0] = time.perf_counter()
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"llmkit {llmkit.__version__} demo on {device.type} ({name}{threads}), {str(dtype).replace('torch.', '')}, "
        f"torch {torch.__version__}",
        flush=True,
    )
    checks, body = (_gpt2 if args.model == "gpt2" else _bert)(args, device, dtype)
    print("\n".join(body))
    print()
    rows = [("check", "max |diff|", "limit", "result")]
    rows += [(c.name, c.value, c.limit, "PASS" if c.ok else "FAIL") for c in checks]
    print(_table(rows))
    if not _hf_available(args):
        print("\n(transformers is not installed or --no-hf was given: only the llmkit model ran)")
    print(
        f"\ndone in {time.perf_counter() - started:.1f}s; timings are medians of {args.repeats} interleaved rounds "
        f"measured in this run"
    )
    return 0 if all(c.ok for c in checks) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llmkit.demo [options]``."""
    parser = argparse.ArgumentParser(prog="llmkit demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    from .errors import UsageError

    try:
        return run(parser.parse_args(argv))
    except UsageError as exc:
        print(f"llmkit demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
