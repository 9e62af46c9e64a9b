"""What the GPU round (bench/gpu_round.py) relies on in ``llmkit bench`` and ``llmkit check``:
shape sets validated against the model configurations before anything runs, the reduced
set ``round``, ``check --device``, and interrupted runs that still report (and write)
what they measured.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from llmkit import check as C
from llmkit import check_run, cli
from llmkit.bench import runner, suites_models
from llmkit.bench.shapes import ShapesError, check_shapes, load_shapes

RAW = json.loads(Path(load_shapes().path).read_text())


def _with_point(suite: str, set_name: str, point: dict) -> dict:
    raw = copy.deepcopy(RAW)
    raw["suites"][suite]["sets"][set_name] = [point]
    return raw


@pytest.mark.parametrize(
    "suite, point, problem",
    [
        (
            "gpt2_decode",
            {"model": "gpt2-small", "B": 8, "prompt": 1024, "new": 128},
            "suite gpt2_decode, set s, point 0: prompt + new = 1152 tokens exceed the 1024 positions "
            "of model gpt2-small",
        ),
        (
            "gpt2_prefill",
            {"model": "gpt2-tiny", "B": 1, "S": 257},
            "suite gpt2_prefill, set s, point 0: S = 257 tokens exceed the 256 positions of model gpt2-tiny",
        ),
        (
            "bert",
            {"model": "bert-base", "B": 1, "S": 513},
            "suite bert, set s, point 0: S = 513 tokens exceed the 512 positions of model bert-base",
        ),
    ],
)
def test_a_model_point_longer_than_the_models_positions_is_named(suite, point, problem):
    assert check_shapes(_with_point(suite, "s", point)) == [problem]
    # exactly the positions is fine (generation feeds the prompt and all but the last new token)
    fits = dict(point, **({"new": point["new"] - 128} if "new" in point else {"S": point["S"] - 1}))
    assert check_shapes(_with_point(suite, "s", fits)) == []


def test_model_configurations_are_checked():
    raw = copy.deepcopy(RAW)
    raw["models"]["gpt2-tiny"] = dict(raw["models"]["gpt2-tiny"], positions=None, family="t5", kv_heads=0)
    problems = check_shapes(raw)
    assert "model gpt2-tiny: positions must be a positive integer, got None" in problems
    assert "model gpt2-tiny: family must be one of bert, gpt2, llama, got 't5'" in problems
    assert "model gpt2-tiny: kv_heads must be a positive integer, got 0" in problems


def test_a_set_that_exceeds_is_refused_before_any_model_runs(tmp_path, monkeypatch, capsys):
    """HuggingFace's GPT-2 raises IndexError past its positions on the CPU and hits a
    device-side assert on CUDA (which poisons the process): the file is refused first."""
    bad = tmp_path / "shapes.json"
    bad.write_text(
        json.dumps(_with_point("gpt2_decode", "quick", {"model": "gpt2-tiny", "B": 1, "prompt": 250, "new": 8}))
    )

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(suites_models, "hf_model", no_model)
    code = cli.main(
        [
            "bench",
            "--quick",
            "--op",
            "gpt2_decode",
            "--shapes-file",
            str(bad),
            "--device",
            "cpu",
            "--no-plots",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == runner.EXIT_NOTHING
    assert "suite gpt2_decode, set quick, point 0: prompt + new = 258 tokens exceed the 256 positions" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ShapesError, match="exceed the 256 positions of model gpt2-tiny"):
        load_shapes(bad)


def test_the_round_set_covers_the_reduced_benchmark():
    shapes = load_shapes()
    for suite in (
        "layer_norm",
        "rms_norm",
        "add_layer_norm",
        "gelu",
        "bias_gelu",
        "quantize_int8",
        "attention",
        "decode_attention",
        "int8_w8a8",
        "int8_w8a16",
        "gpt2_prefill",
        "gpt2_decode",
        "bert",
    ):
        assert shapes.points(suite, "round"), suite
    assert {p["causal"] for p in shapes.points("attention", "round")} == {False, True}
    assert {p["M"] for p in shapes.points("int8_w8a16", "round")} >= {1}
    # every shipped set fits its models (the 'gpu' decode points once asked 1024 + 128 of 1024)
    assert check_shapes(RAW) == []


def _interrupt_call(monkeypatch, module, name: str, nth: int) -> None:
    """The nth call of module.name raises KeyboardInterrupt (Ctrl-C, a time limit's SIGINT)."""
    real, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


def test_an_interrupted_bench_run_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    _interrupt_call(monkeypatch, runner, "run_case", 2)
    code = cli.main(
        [
            "bench",
            "--quick",
            "--op",
            "gelu",
            "--backend",
            "reference",
            "--seconds",
            "0.002",
            "--no-plots",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--name",
            "cut",
        ]
    )
    doc = json.loads((tmp_path / "cut.json").read_text())
    assert code == runner.EXIT_SKIPPED == doc["exit_code"]
    assert {r["status"] for r in doc["results"]} == {"ok"} and len({r["pass"] for r in doc["results"]}) == 1
    assert [s["what"] for s in doc["skipped"]] == ["run"]
    assert doc["skipped"][0]["reason"].startswith("interrupted: 1 of ")


def test_an_interrupted_check_keeps_its_rows(monkeypatch, tmp_path, capsys):
    _interrupt_call(monkeypatch, check_run, "run_case", 3)
    out = tmp_path / "c.json"
    code = cli.main(
        [
            "check",
            "--quick",
            "--op",
            "gelu",
            "--backend",
            "reference",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--json",
            str(out),
        ]
    )
    doc = json.loads(out.read_text())
    assert code == C.EXIT_SKIPPED == doc["exit_code"]
    assert doc["rows"] and {r["status"] for r in doc["rows"]} == {"PASS"}
    assert any(n.startswith("interrupted after 2 of ") for n in doc["notes"])


def test_check_runs_on_the_device_asked_for(capsys):
    plan = C.plan_check(["gelu"], ["reference"], quick=True, dtypes=["float32"], device="cpu")
    assert plan.work and {dev.type for _, _, dev in plan.work} == {"cpu"}
    if torch.cuda.is_available():
        return
    assert C.plan_check(["gelu"], ["reference"], quick=True, device="cuda").work == []
    code = cli.main(["check", "--quick", "--op", "gelu", "--backend", "reference", "--device", "cuda"])
    out = capsys.readouterr().out
    assert code == C.EXIT_NOTHING
    assert "skipped: --device cuda: no CUDA GPU is available" in out
