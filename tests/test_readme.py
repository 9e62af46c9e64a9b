"""The README stays true: its Python examples run, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def _setup_commands() -> list[str]:
    first_bash = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_bash is not None, "the README must start with a bash block of set-up commands"
    return [line for line in first_bash.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_the_two_setup_commands():
    assert README.index("```bash") < README.index("```python")
    main, tests = _setup_commands()
    assert "pip install" in main and main.rstrip().endswith("llmkit demo")
    assert "pip install" in tests and tests.rstrip().endswith("pytest")


def test_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    tests_cmd = _setup_commands()[1].split("&&", 2)[2].strip()  # after venv creation and activation
    assert tests_cmd in ci.splitlines(), (tests_cmd, ci)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs_and_gives_what_it_says(index, capsys):
    pytest.importorskip("transformers")
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), scope)
    if "y" in scope and "x" in scope:  # the ops example: each result is checked, not only run
        import torch.nn.functional as F

        x, w, b = scope["x"], scope["w"], scope["b"]
        torch.testing.assert_close(scope["y"], F.layer_norm(x, [768], w, b))
        h, residual = scope["h"], scope["residual"]
        torch.testing.assert_close(residual, x + scope["y"])
        torch.testing.assert_close(h, F.layer_norm(x + scope["y"], [768], w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scope["g"], F.gelu(h, approximate="tanh"), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(scope["r"], F.rms_norm(x, [768], w + 1.0))
        torch.testing.assert_close(scope["stream"], x + scope["y"])
        torch.testing.assert_close(scope["r2"], F.rms_norm(x + scope["y"], [768], w), atol=1e-5, rtol=1e-5)
        gate, up = scope["gate"], scope["up"]
        torch.testing.assert_close(scope["a"], F.silu(gate) * up)
        q = scope["q"]
        torch.testing.assert_close(
            scope["o"], F.scaled_dot_product_attention(q, q, q, is_causal=True), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(scope["o_ref"], scope["o"], atol=1e-5, rtol=1e-5)
    if "gpt" in scope:  # the models example
        printed = capsys.readouterr().out
        assert "swapped" in printed and "left in float" in printed and "lm_head" in printed
        assert scope["tokens"].shape == (1, 22) and scope["tokens"][0, :2].tolist() == [464, 2068]
        assert scope["bert"].config._attn_implementation == "llmkit"
