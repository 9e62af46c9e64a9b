"""llmkit._import_hook.after_import: a callback right after a module's import, never before."""

from __future__ import annotations

import logging
import sys

import pytest

from llmkit import _import_hook as H


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith("llmkit_hook_probe")]:
        del sys.modules[name]


def test_callback_runs_after_the_module_executed_once(module_dir):
    (module_dir / "llmkit_hook_probe_a.py").write_text("VALUE = 41\n")
    seen = []
    H.after_import("llmkit_hook_probe_a", lambda: seen.append(sys.modules["llmkit_hook_probe_a"].VALUE + 1))
    assert seen == [] and H._finder in sys.meta_path
    import llmkit_hook_probe_a  # noqa: F401

    assert seen == [42]
    assert "llmkit_hook_probe_a" not in H._pending
    assert H._finder is None or H._pending  # the finder leaves once nothing is pending
    assert llmkit_hook_probe_a.__loader__.__class__.__name__ != "_LoaderWithCallback"


def test_callback_runs_at_once_for_an_imported_module():
    seen = []
    H.after_import("logging", lambda: seen.append(1))
    assert seen == [1]


def test_a_failing_callback_is_logged_and_the_import_still_works(module_dir, caplog):
    (module_dir / "llmkit_hook_probe_b.py").write_text("VALUE = 1\n")

    def boom() -> None:
        raise RuntimeError("incompatible")

    H.after_import("llmkit_hook_probe_b", boom)
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        import llmkit_hook_probe_b
    assert llmkit_hook_probe_b.VALUE == 1
    assert "llmkit_hook_probe_b" in caplog.text and "incompatible" in caplog.text
