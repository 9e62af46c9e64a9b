"""The C++/CUDA extension never breaks llmkit, and ``llmkit build-ext`` does not redo a build.

A build in the cache that is truncated, corrupted, foreign or unverifiable is skipped and
reported (never loaded: mapping a damaged library kills the process with SIGBUS / SIGSEGV);
an unwritable cache under ``LLMKIT_EXT_AUTOBUILD=1`` is a reason too. On the default path
the next backend runs (and the result is right); a request for ``cuda_ext`` by name raises
BackendError with the reason; ``llmkit info`` shows it. Each scenario runs in a subprocess,
so a crash fails its test instead of killing pytest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from llmkit import _ext, _ext_build, cli

# Runs in a fresh interpreter with LLMKIT_EXT_CACHE_DIR pointing at a damaged cache.
_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, llmkit
    from llmkit import _ext, reference64
    from llmkit.errors import BackendError
    from llmkit.info import format_info

    torch.manual_seed(0)
    x = torch.randn(4, 64)
    out = llmkit.ops.rms_norm(x, [64])  # default order: rms_norm prefers the C++ kernels
    err = (out.double() - reference64.rms_norm(x, [64], None, torch.finfo(x.dtype).eps)).abs().max().item()
    try:
        with llmkit.use_backend("cuda_ext"):
            llmkit.ops.rms_norm(x, [64])
        named = "no error"
    except BackendError as exc:
        named = str(exc)
    info = format_info()
    print(json.dumps({"err": err, "reason": _ext.unavailable_reason("cpu"), "named": named,
                      "info": info[info.index("cuda_ext"):]}))
    """
)


def _run(env_updates: dict[str, str]) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != _ext.AUTOBUILD_ENV}
    env.update(env_updates)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode} (a negative value is a signal)\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def good_build(ext) -> Path:
    """The directory of the build this session loaded (verified: size and SHA-256 recorded)."""
    directory = Path(ext.details()["path"])
    info = json.loads((directory / "build_info.json").read_text())
    assert ext.verify_build(directory, info) is None
    return directory


def _copy(good_build: Path, tmp_path: Path, objects: bool = False) -> Path:
    """A cache root holding a copy of the good build (library, build_info.json; objects too)."""
    dest = tmp_path / "cache" / good_build.name
    keep = None if objects else shutil.ignore_patterns("*.o", ".ninja*", "build.ninja")
    shutil.copytree(good_build, dest, ignore=keep)
    return dest


def _foreign_library() -> Path:
    lib = Path(torch.__file__).parent / "lib" / "libtorch_global_deps.so"
    if not lib.is_file():
        pytest.skip(f"no harmless foreign library to plant ({lib} is missing)")
    return lib


def _truncate(d: Path, info: dict) -> None:
    lib = d / info["library"]
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 2])


def _random_bytes(d: Path, info: dict) -> None:
    lib = d / info["library"]
    lib.write_bytes(os.urandom(lib.stat().st_size))  # same size: only the checksum tells


def _no_checksum(d: Path, info: dict) -> None:
    for k in ("library_bytes", "library_sha256"):
        info.pop(k)
    (d / "build_info.json").write_text(json.dumps(info))


def _foreign_name(d: Path, info: dict) -> None:
    lib = d / "libforeign.so"
    shutil.copyfile(_foreign_library(), lib)
    info.update(library=lib.name, library_bytes=lib.stat().st_size, library_sha256=_sha256(lib))
    (d / "build_info.json").write_text(json.dumps(info))


def _foreign_under_our_name(d: Path, info: dict) -> None:
    lib = d / info["library"]
    shutil.copyfile(_foreign_library(), lib)
    info.update(library_bytes=lib.stat().st_size, library_sha256=_sha256(lib))  # a consistent record
    (d / "build_info.json").write_text(json.dumps(info))


@pytest.mark.parametrize(
    "damage, words",
    [
        (_truncate, "truncated or replaced"),
        (_random_bytes, "does not match the SHA-256"),
        (_no_checksum, "records no size and checksum"),
        (_foreign_name, "names the library 'libforeign.so'"),
        (_foreign_under_our_name, "registers no CPU kernel"),
    ],
)
def test_a_bad_build_is_skipped_reported_and_never_breaks_the_default_path(good_build, tmp_path, damage, words):
    d = _copy(good_build, tmp_path)
    damage(d, json.loads((d / "build_info.json").read_text()))
    res, stderr = _run({_ext.CACHE_ENV: str(d.parent)})
    assert res["err"] < 1e-5  # the reference ran, and ran right
    assert words in res["reason"] and "llmkit build-ext" in res["reason"]
    assert words in res["named"] and "cuda_ext" in res["named"]  # asked for by name: raises
    assert "skipped build 1" in res["info"] and words in res["info"]
    assert stderr.count("is not used") == 1, stderr  # logged once


def test_a_good_copy_is_loaded(good_build, tmp_path):
    """The control: the same copy undamaged is verified and used."""
    d = _copy(good_build, tmp_path)
    res, _ = _run({_ext.CACHE_ENV: str(d.parent)})
    assert res["reason"] is None and res["named"] == "no error" and res["err"] < 1e-5
    assert str(d) in res["info"]


def test_autobuild_into_an_unwritable_cache_falls_back(tmp_path):
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    res, stderr = _run({_ext.CACHE_ENV: str(not_a_dir / "ext"), _ext.AUTOBUILD_ENV: "1"})
    assert res["err"] < 1e-5
    assert "could not run" in res["reason"] and "LLMKIT_EXT_AUTOBUILD=1" in res["reason"]
    assert "could not run" in res["named"]
    assert "not available" in stderr


def test_a_probe_that_raises_is_a_reason_not_an_error(monkeypatch):
    """Whatever the extension module raises, the default order goes on; by name it is the reason."""
    import llmkit
    from llmkit import dispatch
    from llmkit.errors import BackendError

    def broken(device_type):
        raise AttributeError("llmkit_ext has no norm_fwd")

    monkeypatch.setattr(_ext, "unavailable_reason", broken)
    x = torch.randn(3, 8)
    assert torch.equal(llmkit.ops.rms_norm(x, [8]), llmkit.ops.rms_norm(x, [8]))
    assert "llmkit_ext has no norm_fwd" in dispatch.BACKENDS["cuda_ext"].unavailable_reason("cpu")
    with llmkit.use_backend("cuda_ext"), pytest.raises(BackendError, match="no norm_fwd"):
        llmkit.ops.rms_norm(x, [8])


# --------------------------------------------------------------------------------------
# `llmkit build-ext`: an identical build is up to date, --force rebuilds
# --------------------------------------------------------------------------------------


class _Compiler:
    """Stands in for the compiler subprocess: records that a build started, then fails it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return types.SimpleNamespace(stdout=io.StringIO("no compiler in this test\n"), wait=lambda: 1)


def _build_ext(monkeypatch, root: Path, *flags: str) -> tuple[int, _Compiler]:
    compiler = _Compiler()
    monkeypatch.setattr(_ext_build.subprocess, "Popen", compiler)
    monkeypatch.setenv(_ext.CACHE_ENV, str(root))  # restored afterwards (build-ext sets it)
    rc = cli.main(["build-ext", "--cpu-only", "--cache-dir", str(root), *flags])
    return rc, compiler


def test_build_ext_finds_an_identical_build_up_to_date(good_build, tmp_path, monkeypatch, capsys):
    d = _copy(good_build, tmp_path, objects=True)
    lib = d / json.loads((d / "build_info.json").read_text())["library"]
    before = (lib.stat().st_mtime_ns, _sha256(lib))
    rc, compiler = _build_ext(monkeypatch, d.parent)
    err = capsys.readouterr().err
    assert rc == 0 and compiler.calls == 0, err
    assert "is up to date" in err and "--force" in err
    assert (lib.stat().st_mtime_ns, _sha256(lib)) == before


def test_build_ext_force_rebuilds_from_scratch(good_build, tmp_path, monkeypatch):
    d = _copy(good_build, tmp_path, objects=True)
    rc, compiler = _build_ext(monkeypatch, d.parent, "--force")
    assert compiler.calls == 1 and rc == 1  # the stand-in compiler fails the build it was asked for
    assert not list(d.glob("*.o")) and not list(d.glob("*.so"))  # nothing of the old build reused


@pytest.mark.parametrize("change", ["flags", "library"])
def test_a_different_or_damaged_build_is_not_up_to_date(good_build, tmp_path, monkeypatch, change):
    d = _copy(good_build, tmp_path, objects=True)
    info = json.loads((d / "build_info.json").read_text())
    if change == "flags":
        monkeypatch.setattr(_ext_build, "_cpu_flags", lambda isa: ["-O2"])
    else:
        _truncate(d, info)
    rc, compiler = _build_ext(monkeypatch, d.parent)
    assert compiler.calls == 1
    # the stale library is gone before the compiler runs (ninja would keep a newer damaged one)
    assert not (d / info["library"]).exists()
