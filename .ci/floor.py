"""Print pip constraints that pin every dependency llmkit declares to its lower bound.

CI installs the floor stack with them (``pip install -c <this output> ...``), so each
declared ``>=`` is a tested version. A dependency declared without a lower bound is an
error: it would be a range nobody tests.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(?:,\s*<[^;]*)?(;.*)?$")


def floors(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """``{name: lowest version}`` of every runtime, extra and build requirement."""
    data = tomllib.loads(pyproject.read_text())
    reqs = list(data["project"]["dependencies"])
    for extra in data["project"].get("optional-dependencies", {}).values():
        reqs += extra
    reqs += data["build-system"]["requires"]
    out: dict[str, str] = {}
    for req in reqs:
        m = PIN.match(req)
        if m is None:
            raise SystemExit(f"pyproject.toml: {req!r} has no lower bound (name>=version)")
        name, version = m.group(1).lower(), m.group(2)
        if out.setdefault(name, version) != version:
            raise SystemExit(f"pyproject.toml: {name} has two lower bounds ({out[name]} and {version})")
    return out


if __name__ == "__main__":
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in sorted(floors().items())))
