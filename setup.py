"""Install-time steps that pyproject.toml cannot express.

A non-editable build copies ``bench/shapes.json`` into the package
(``llmkit/bench/shapes.json``), so ``llmkit bench`` works from a wheel.

The C++/CUDA extension is built at install time when opted into with LLMKIT_BUILD_EXT=1:

    LLMKIT_BUILD_EXT=1 pip install --no-build-isolation .

compiles csrc/ against the torch of the target environment (hence no build
isolation) into ``llmkit/_ext_prebuilt/`` inside the installed package, where
:mod:`llmkit._ext` finds it before its cache; an editable install builds into the
user cache instead. The wheel is then platform-specific. Without the variable this
file builds nothing: all metadata lives in pyproject.toml, and the extension is
built later with ``llmkit build-ext``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ENV = "LLMKIT_BUILD_EXT"


def _wanted() -> bool:
    return os.environ.get(ENV, "0").lower() in ("1", "true", "yes", "on")


def _ext_builder():
    """llmkit/_ext_build.py loaded by path (importing the package would need its dependencies)."""
    spec = importlib.util.spec_from_file_location("llmkit_ext_builder", ROOT / "llmkit" / "_ext_build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithExtension(build_py):
    """build_py, then (with LLMKIT_BUILD_EXT=1) the extension into the built package."""

    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):  # the benchmark shapes travel with a wheel
            dest = Path(self.build_lib) / "llmkit" / "bench" / "shapes.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / "bench" / "shapes.json", dest)
        if not _wanted():
            return
        try:
            import torch  # noqa: F401
        except ImportError:
            raise SystemExit(
                f"{ENV}=1: torch is not importable while building; install torch first and run "
                "pip with --no-build-isolation"
            ) from None
        ext = _ext_builder()
        editable = bool(getattr(self, "editable_mode", False))
        root = None if editable else Path(self.build_lib) / "llmkit" / "_ext_prebuilt"
        res = ext.build(verbose=True, root=root, sources=ROOT / "csrc")
        if not res.ok:
            raise SystemExit(f"{ENV}=1: {res.summary()}")
        if root is not None:  # ship the library and its build_info.json, not the objects
            keep = {"build_info.json", ext.json.loads((res.directory / "build_info.json").read_text())["library"]}
            for p in res.directory.iterdir():
                if p.name not in keep:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()


class ExtensionDistribution(Distribution):
    """A platform wheel when the extension is built into it."""

    def has_ext_modules(self) -> bool:
        return _wanted()


setup(cmdclass={"build_py": BuildPyWithExtension}, distclass=ExtensionDistribution)
