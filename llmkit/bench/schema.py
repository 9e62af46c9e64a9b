"""The JSON schema of ``llmkit bench`` result files, and a validator for it.

:data:`SCHEMA` is written in JSON Schema (draft 2020-12 keywords: ``type``,
``properties``, ``required``, ``items``, ``enum``, ``minimum``, ``const``,
``additionalProperties``) so other tools can use it; :func:`validate` checks a document
against that subset without any dependency and returns every violation with its path.
"""

from __future__ import annotations

from typing import Any

NUM_OR_NULL = {"type": ["number", "null"]}
STR_OR_NULL = {"type": ["string", "null"]}

SAMPLE = {
    "type": "object",
    "required": ["median_s", "q25_s", "q75_s", "min_s", "max_s", "times_s", "calls_per_time", "method"],
    "properties": {
        "median_s": {"type": "number", "minimum": 0},
        "q25_s": {"type": "number", "minimum": 0},
        "q75_s": {"type": "number", "minimum": 0},
        "min_s": {"type": "number", "minimum": 0},
        "max_s": {"type": "number", "minimum": 0},
        "times_s": {"type": "array", "items": {"type": "number", "minimum": 0}},
        "calls_per_time": {"type": "integer", "minimum": 1},
        "method": {"type": "string"},
        "page_faults_per_call": {"type": ["number", "null"], "minimum": 0},
    },
}

RESULT = {
    "type": "object",
    "required": [
        "suite",
        "pass",
        "dtype",
        "device",
        "shape",
        "shape_label",
        "group",
        "x",
        "x_name",
        "impl",
        "status",
        "reason",
        "note",
        "check",
        "median_s",
        "sample",
        "flops",
        "bytes",
        "tflops",
        "gbps",
        "tokens_per_s",
        "bound",
        "roofline",
        "fraction_of_roofline",
        "vs_eager",
        "peak_mem_bytes",
    ],
    "properties": {
        "suite": {"type": "string"},
        "pass": {"enum": ["fwd", "bwd", "prefill", "decode"]},
        "dtype": {"type": "string"},
        "device": {"type": "string"},
        "shape": {"type": "object"},
        "shape_label": {"type": "string"},
        "group": {"type": "string"},
        "x": NUM_OR_NULL,
        "x_name": {"type": "string"},
        "impl": {"type": "string"},
        "status": {"enum": ["ok", "skipped", "error", "n/a"]},
        "reason": {"type": "string"},
        "note": {"type": "string"},
        "check": {"type": "string"},
        "median_s": NUM_OR_NULL,
        "sample": {"type": ["object", "null"], **{k: v for k, v in SAMPLE.items() if k != "type"}},
        "flops": NUM_OR_NULL,
        "bytes": NUM_OR_NULL,
        "tflops": NUM_OR_NULL,
        "gbps": NUM_OR_NULL,
        "tokens_per_s": NUM_OR_NULL,
        "bound": {"enum": ["memory", "compute", "int8", "?", None]},
        "roofline": {"enum": ["bandwidth", "bf16", "int8", None]},
        "fraction_of_roofline": NUM_OR_NULL,
        "vs_eager": NUM_OR_NULL,
        "peak_mem_bytes": {"type": ["integer", "null"], "minimum": 0},
    },
}

ENVIRONMENT = {
    "type": "object",
    "required": [
        "device",
        "device_name",
        "driver",
        "cuda",
        "torch",
        "triton",
        "llmkit",
        "git_commit",
        "date",
        "command",
        "python",
        "threads",
    ],
    "properties": {
        "device": {"type": "string"},
        "device_name": {"type": "string"},
        "driver": STR_OR_NULL,
        "cuda": STR_OR_NULL,
        "torch": {"type": "string"},
        "triton": STR_OR_NULL,
        "llmkit": {"type": "string"},
        "git_commit": STR_OR_NULL,
        "date": {"type": "string"},
        "command": {"type": "string"},
        "python": {"type": "string"},
        "threads": {"type": "integer", "minimum": 1},
    },
}

ROOFLINE = {
    "type": ["object", "null"],
    "required": ["copy_gbps", "bf16_tflops", "int8_tops", "copy_bytes", "matmul_size", "samples"],
    "properties": {
        "copy_gbps": NUM_OR_NULL,
        "bf16_tflops": NUM_OR_NULL,
        "int8_tops": NUM_OR_NULL,
        "copy_bytes": {"type": "integer", "minimum": 0},
        "matmul_size": {"type": "integer", "minimum": 0},
        "samples": {"type": "object"},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "llmkit bench result",
    "type": "object",
    "required": [
        "schema",
        "environment",
        "options",
        "shapes_file",
        "shapes_version",
        "shape_set",
        "roofline",
        "notes",
        "results",
        "skipped",
        "exit_code",
        "elapsed_s",
    ],
    "properties": {
        "schema": {"const": "llmkit-bench/1"},
        "environment": ENVIRONMENT,
        "options": {"type": "object"},
        "shapes_file": STR_OR_NULL,
        "shapes_version": {"type": ["integer", "null"]},
        "shape_set": STR_OR_NULL,
        "roofline": ROOFLINE,
        "notes": {"type": "array", "items": {"type": "string"}},
        "results": {"type": "array", "items": RESULT},
        "skipped": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["what", "reason"],
                "properties": {"what": {"type": "string"}, "reason": {"type": "string"}},
            },
        },
        "exit_code": {"enum": [0, 1, 2, 3]},
        "elapsed_s": {"type": "number", "minimum": 0},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(doc: Any, schema: dict[str, Any] | None = None, path: str = "$") -> list[str]:
    """Every violation of ``schema`` (default :data:`SCHEMA`) in ``doc``, as 'path: problem'."""
    schema = SCHEMA if schema is None else schema
    errors: list[str] = []
    if "const" in schema and doc != schema["const"]:
        errors.append(f"{path}: must be {schema['const']!r}, got {doc!r}")
    if "enum" in schema and doc not in schema["enum"]:
        errors.append(f"{path}: must be one of {schema['enum']!r}, got {doc!r}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(doc, t) for t in types):
            return errors + [f"{path}: must be of type {'/'.join(types)}, got {type(doc).__name__}"]
    if "minimum" in schema and _is_type(doc, "number") and doc < schema["minimum"]:
        errors.append(f"{path}: must be >= {schema['minimum']}, got {doc}")
    if isinstance(doc, dict):
        for key in schema.get("required", []):
            if key not in doc:
                errors.append(f"{path}: lacks required key {key!r}")
        props = schema.get("properties", {})
        for key, value in doc.items():
            if key in props:
                errors.extend(validate(value, props[key], f"{path}.{key}"))
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected key {key!r}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            errors.extend(validate(item, schema["items"], f"{path}[{i}]"))
    return errors
