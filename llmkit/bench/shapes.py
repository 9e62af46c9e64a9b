"""The versioned shapes file (``bench/shapes.json``): loading, checking, choosing a set.

Layout::

    {"version": 1,
     "models": {"bert-base": {"family": "bert", "layers": 12, "hidden": 768, ...}, ...},
     "suites": {"layer_norm": {"x": "N", "sets": {"gpu": [{"M": 4096, "N": 1024}, ...],
                                                  "cpu": [...], "quick": [...]}}, ...}}

A *point* is one shape: a dict of named sizes (and flags such as ``causal``). ``x`` names
the size that plots put on their horizontal axis; points that agree on every other key
form one line of a plot.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

Point = dict[str, Any]

_CHECKOUT_SHAPES = Path(__file__).resolve().parents[2] / "bench" / "shapes.json"
_PACKAGED_SHAPES = Path(__file__).resolve().parent / "shapes.json"  # copied there by setup.py in a wheel
DEFAULT_SHAPES_FILE = _CHECKOUT_SHAPES if _CHECKOUT_SHAPES.is_file() else _PACKAGED_SHAPES
"""``bench/shapes.json`` of the source checkout (editable install), else the copy a wheel carries."""


class ShapesError(ValueError):
    """The shapes file is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Shapes:
    """A loaded shapes file."""

    path: str
    version: int
    suites: dict[str, dict[str, Any]]
    models: dict[str, dict[str, Any]]

    def x_axis(self, suite: str) -> str:
        """The key plotted on the horizontal axis for ``suite``."""
        return self.suites[suite]["x"]

    def set_names(self, suite: str) -> list[str]:
        """The shape-set names ``suite`` defines."""
        return sorted(self.suites.get(suite, {}).get("sets", {}))

    def points(self, suite: str, set_name: str) -> list[Point]:
        """The points of ``set_name`` for ``suite``; KeyError (with the choices) if absent."""
        sets = self.suites.get(suite, {}).get("sets", {})
        if set_name not in sets:
            raise KeyError(
                f"suite {suite} has no shape set {set_name!r} in {self.path} "
                f"(its sets: {', '.join(sorted(sets)) or 'none'})"
            )
        return [dict(p) for p in sets[set_name]]

    def model(self, name: str) -> dict[str, Any]:
        """The configuration of model shape ``name``."""
        if name not in self.models:
            raise KeyError(f"unknown model shape {name!r} (known: {', '.join(sorted(self.models))})")
        return dict(self.models[name])


def load_shapes(path: str | Path | None = None) -> Shapes:
    """Read and check a shapes file (default: ``bench/shapes.json`` of this checkout)."""
    p = Path(path) if path is not None else DEFAULT_SHAPES_FILE
    if not p.is_file():
        hint = "" if path is not None else " (this llmkit was installed without its shapes file: pass --shapes-file)"
        raise ShapesError(f"shapes file {p} does not exist{hint}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ShapesError(f"shapes file {p} is not valid JSON: {exc}") from exc
    problems = check_shapes(raw)
    if problems:
        raise ShapesError(f"shapes file {p} is malformed:\n  " + "\n  ".join(problems))
    return Shapes(str(p), int(raw["version"]), raw["suites"], raw.get("models", {}))


MODEL_KEYS = ("layers", "hidden", "heads", "ffn", "vocab", "positions")
"""The sizes every model shape defines (positive integers), besides its ``family``."""
MODEL_FAMILIES = ("bert", "gpt2", "llama")
OPTIONAL_MODEL_KEYS = ("kv_heads",)
"""Sizes a model shape may define (positive integers): ``kv_heads`` (grouped-query attention,
the ``llama`` family; the query heads by default)."""


def sequence_length(point: Point) -> tuple[int, str] | None:
    """Tokens a model point puts through the model at once, and how: ``S``, or
    ``prompt + new`` for generation (the prompt and every new token take a position)."""
    if isinstance(point.get("S"), int):
        return point["S"], "S"
    if isinstance(point.get("prompt"), int) and isinstance(point.get("new"), int):
        return point["prompt"] + point["new"], "prompt + new"
    return None


def _check_model(name: str, cfg: Any) -> list[str]:
    if not isinstance(cfg, dict):
        return [f"model {name}: must be an object"]
    out = []
    if cfg.get("family") not in MODEL_FAMILIES:
        out.append(f"model {name}: family must be one of {', '.join(MODEL_FAMILIES)}, got {cfg.get('family')!r}")
    for k in MODEL_KEYS + tuple(k for k in OPTIONAL_MODEL_KEYS if k in cfg):
        v = cfg.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            out.append(f"model {name}: {k} must be a positive integer, got {v!r}")
    return out


def _check_model_point(where: str, pt: Point, cfg: dict[str, Any]) -> list[str]:
    """A model point against its model's configuration: its sequence fits the positions.

    Past them, HuggingFace's position embedding raises IndexError on the CPU and a
    device-side assert on CUDA (which poisons the process: every later case fails)."""
    limit = cfg.get("positions")
    seq = sequence_length(pt)
    if seq is None or not isinstance(limit, int):
        return []
    tokens, how = seq
    if tokens > limit:
        return [f"{where}: {how} = {tokens} tokens exceed the {limit} positions of model {pt['model']}"]
    return []


def check_shapes(raw: Any) -> list[str]:
    """Everything wrong with a parsed shapes file (empty when it is well formed): its
    layout, every model's configuration, and every model point against its model (a
    sequence longer than the model's positions is refused before anything runs)."""
    out: list[str] = []
    if not isinstance(raw, dict):
        return ["the top level must be an object"]
    if not isinstance(raw.get("version"), int):
        out.append("'version' must be an integer")
    models = raw.get("models", {})
    if not isinstance(models, dict):
        out.append("'models' must be an object")
        models = {}
    for mname, cfg in models.items():
        out.extend(_check_model(mname, cfg))
    suites = raw.get("suites")
    if not isinstance(suites, dict) or not suites:
        return out + ["'suites' must be a non-empty object"]
    for name, suite in suites.items():
        if not isinstance(suite, dict) or not isinstance(suite.get("x"), str):
            out.append(f"suite {name}: needs 'x' (the plotted size) and 'sets'")
            continue
        sets = suite.get("sets")
        if not isinstance(sets, dict) or not sets:
            out.append(f"suite {name}: 'sets' must be a non-empty object")
            continue
        for set_name, points in sets.items():
            if not isinstance(points, list) or not points:
                out.append(f"suite {name}, set {set_name}: must be a non-empty list of points")
                continue
            for i, pt in enumerate(points):
                where = f"suite {name}, set {set_name}, point {i}"
                if not isinstance(pt, dict):
                    out.append(f"{where}: must be an object")
                    continue
                if suite["x"] not in pt:
                    out.append(f"{where}: lacks the x key {suite['x']!r}")
                for k, v in pt.items():
                    if k == "model":
                        if v not in models:
                            out.append(f"{where}: unknown model {v!r}")
                    elif isinstance(v, bool):
                        continue
                    elif not isinstance(v, int) or v < 0:
                        out.append(f"{where}: {k} must be a non-negative integer, got {v!r}")
                if isinstance(models.get(pt.get("model")), dict):
                    out.extend(_check_model_point(where, pt, models[pt["model"]]))
    return out


def point_label(point: Point) -> str:
    """A short, stable text for a point: ``M=4096 N=1024``, flags by name (``causal``)."""
    parts = []
    for k, v in point.items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def group_key(point: Point, x: str) -> str:
    """The label of ``point`` without its x key: points sharing it form one plotted line."""
    return point_label({k: v for k, v in point.items() if k != x}) or "all"
