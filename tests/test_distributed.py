"""llmkit under torch.distributed: 2 CPU processes, gloo over loopback.

The processes are spawned once for this module (starting them costs seconds); each runs
every check of ``_dist_ops`` and ``_dist_models`` in the same order, then each pytest test
below reports one check. Every check compares DTensor results with the same op or model
on whole tensors in one process (and, for ops, both with the float64 reference).

Bounded: the whole run has a deadline (a hung collective fails the checks that did not
finish); the rendezvous is a TCPStore this process serves on a port the OS picks.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap
import time
import traceback
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import _dist_models
import _dist_ops

WORLD = 2
DEADLINE_S = 240.0
"""The whole run (spawn, every check, shutdown); a hang fails what did not finish."""

CHECKS = {**_dist_ops.CHECKS, **_dist_models.CHECKS}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _worker(rank: int, port: int, seed: int, out_dir: str, names: list[str]) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)  # two processes on a shared 2-core machine
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    with open(Path(out_dir) / f"rank{rank}.jsonl", "a") as log:
        for name in names:
            check = CHECKS[name]
            torch.manual_seed(seed + zlib.crc32(name.encode()))  # the same data on every rank
            start = time.perf_counter()
            try:
                check(mesh)
                error = ""
            except Exception:  # noqa: BLE001 - reported by the test of this check
                error = traceback.format_exc()
            log.write(json.dumps({"name": name, "error": error, "s": time.perf_counter() - start}) + "\n")
            log.flush()
            dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict[str, list[dict]]:
    import torch.multiprocessing as mp

    import conftest

    # only the checks whose tests were selected (-k), in their order
    names = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module and item.originalname == "test_distributed"
    ]

    out_dir = tmp_path_factory.mktemp("dist")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.start_processes(
        _worker,
        args=(store.port, conftest.SESSION_SEED, str(out_dir), names),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    crashed = ""
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                crashed = f"the run passed its {DEADLINE_S:.0f} s deadline"
                break
    except Exception as exc:  # a worker died (the checks themselves never raise out of it)
        crashed = f"a worker process failed: {exc}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join(5)
    got: dict[str, list[dict]] = {}
    for rank in range(WORLD):
        path = out_dir / f"rank{rank}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            row = json.loads(line)
            got.setdefault(row["name"], []).append(row)
    got["__crashed__"] = [{"error": crashed}]
    return got


@pytest.mark.parametrize("name", list(CHECKS))
def test_distributed(name: str, results: dict[str, list[dict]]) -> None:
    rows = results.get(name, [])
    if len(rows) < WORLD:
        pytest.fail(
            f"{name} did not finish on every rank ({len(rows)} of {WORLD}); "
            f"{results['__crashed__'][0]['error'] or 'no worker reported it'}"
        )
    errors = [r["error"] for r in rows if r["error"]]
    assert not errors, errors[0]


# -- in this process --------------------------------------------------------------------


def test_every_llmkit_op_has_a_sharding_rule():
    """A new ``llmkit::*`` op (forward or backward) needs its DTensor rule in
    llmkit/distributed/_strategies.py: without one DTensor refuses it."""
    import llmkit  # noqa: F401
    from llmkit.distributed._strategies import rules

    ops = {n for n in dir(torch.ops.llmkit) if hasattr(getattr(torch.ops.llmkit, n), "overloads")}
    assert len(ops) >= 16, ops
    assert ops == set(rules()), (
        f"ops without a rule: {sorted(ops - set(rules()))}; rules without an op: {sorted(set(rules()) - ops)}"
    )


def test_register_says_why_when_torch_cannot_take_strategies(monkeypatch):
    import llmkit.distributed as D

    monkeypatch.setattr(D, "_registered", False)
    monkeypatch.setattr(D._compat, "dtensor_strategy_api", lambda: "no registry in this torch")
    with pytest.raises(RuntimeError, match="cannot register DTensor sharding strategies: no registry"):
        D.register()


def _python(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), GLOO_SOCKET_IFNAME="lo")
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


@pytest.mark.parametrize("llmkit_first", [True, False])
def test_strategies_register_whichever_is_imported_first(llmkit_first):
    first, second = ("llmkit", "torch.distributed.tensor")[:: 1 if llmkit_first else -1]
    out = _python(f"""
        import sys
        import {first}
        if {llmkit_first!r}:
            import llmkit.distributed
            assert "torch.distributed.tensor" not in sys.modules, "import llmkit must not import DTensor"
            assert not llmkit.distributed.is_registered()
        import {second}
        import llmkit, torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        x = distribute_tensor(torch.randn(4, 8), init_device_mesh("cpu", (1,)), [Shard(0)])
        print(llmkit.distributed.is_registered(), llmkit.ops.layer_norm(x, [8]).placements)
        dist.destroy_process_group()
    """)
    assert out == "True (Shard(dim=0),)", out
