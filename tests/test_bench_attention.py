"""The attention bench suites beyond SDPA's options (sliding window, Gemma 2 softcap, chunked
prefill, ALiBi, paged decode) run at their quick shapes, each implementation checked against
the eager baseline by the harness; their work formulas count the visible pairs."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmkit import cli
from llmkit.bench import formulas
from llmkit.bench.schema import validate
from llmkit.bench.suites_attention_llm import _bias, alibi_slopes


def test_llm_attention_suites_run_and_every_implementation_matches_eager(tmp_path, capsys):
    out = tmp_path / "res"
    ops = "attention_llm,attention_window,decode_paged"
    code = cli.main(
        ["bench", "--quick", "--op", ops, "--backend", "reference", "--no-plots", "--no-compile", "--seconds", "0.002"]
        + ["--out", str(out)]
    )
    printed = capsys.readouterr().out
    doc = json.loads((out / "quick.json").read_text())
    assert validate(doc) == [], validate(doc)[:5]
    assert code == 0, printed
    rows = doc["results"]
    assert {r["suite"] for r in rows} == set(ops.split(","))
    bad = [(r["suite"], r["impl"], r["status"], r["reason"]) for r in rows if r["status"] != "ok"]
    assert not bad, bad
    names = {(r["suite"], r["impl"]) for r in rows}
    assert {
        ("attention_llm", "llmkit[reference]"),
        ("attention_llm", "sdpa+mask"),
        ("attention_window", "llmkit[reference]+mask"),
        ("decode_paged", "llmkit[reference]+contiguous"),
        ("decode_paged", "llmkit[reference]+append"),
    } <= names
    # softcap cannot be a mask: no sdpa+mask row for the Gemma 2 point
    gemma = [r for r in rows if r["suite"] == "attention_llm" and "softcap" in r["shape"]]
    assert gemma and all(r["impl"] != "sdpa+mask" for r in gemma)


@pytest.mark.parametrize(
    "sq,sk,left,right", [(7, 7, -1, 0), (5, 19, -1, 0), (19, 5, 3, 0), (8, 8, 2, 1), (4, 9, 0, -1)]
)
def test_window_pairs_count_the_visible_pairs(sq, sk, left, right):
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        ok &= j <= i + right
    if left >= 0:
        ok &= j >= i - left
    assert formulas.window_keys(sq, sk, left, right) == int(ok.sum())
    w = formulas.attention_pairs(2, 3, sq, sk, 16, 2, int(ok.sum()), backward=False)
    assert w.flops == 4.0 * 2 * 3 * 16 * int(ok.sum())


@given(sq=st.integers(0, 40), sk=st.integers(0, 40), left=st.integers(-1, 45), right=st.integers(-1, 45))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_window_keys_closed_form_equals_the_row_by_row_count(sq, sk, left, right):
    total = 0
    for i in range(sq):
        lo = 0 if left < 0 else max(0, i + sk - sq - left)
        hi = sk - 1 if right < 0 else min(sk - 1, i + sk - sq + right)
        total += max(0, hi - lo + 1)
    assert formulas.window_keys(sq, sk, left, right) == total


def test_alibi_bias_of_the_suite_is_the_slopes_times_the_distance():
    slopes = alibi_slopes(4)
    assert torch.allclose(slopes, torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    bias = _bias(3, 5, 1, slopes, torch.device("cpu"))
    # query 0 sits at key 2 (bottom-right), sees keys 1..2; query 2 sees keys 3..4
    assert torch.isinf(bias[:, 0, [0, 3, 4]]).all() and torch.isinf(bias[:, 2, :3]).all()
    assert torch.equal(bias[:, 0, 1], -slopes) and torch.equal(bias[:, 2, 4], torch.zeros(4))
