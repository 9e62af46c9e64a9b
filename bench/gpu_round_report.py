"""The result files of bench/gpu_round.py: the steps' JUnit XML, ``llmkit check`` and
``llmkit bench`` JSON read back, summarized per op (ran on the GPU, tests passed /
failed, check PASS / FAIL, speed against PyTorch eager) and written, with every step's
status, into one flat folder. Standard library only.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

RESULT_FILES = ("summary.md", "summary.json", "round.log", "junit.xml", "check.json", "bench.json", "logs.tar.gz")
"""Everything a round writes into its output folder (flat).

The functions below take the round (``gpu_round.Round``) as ``rnd``: its ``steps`` (each
with ``name``, ``kind``, ``output``, ``note``, ``record()``), ``dry_run``, ``info``,
``console``, ``out`` and ``logs``."""

# Ops in the order of the summary table: llmkit check's ops, then bench-only suites.
OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "gelu", "bias_gelu", "geglu", "swiglu",
       "attention", "decode_attention", "varlen_attention", "quantize_int8", "int8_matmul", "int8_linear",
       "int8_w8a8", "int8_w8a16", "gpt2_prefill", "gpt2_decode", "bert", "llama_prefill")
OTHER = "(other tests)"


def op_of_test(nodeid: str) -> str:
    """The op a test is about: the longest op name in its function name, else in its
    parameters, else in its file name (``tests/test_layer_norm.py::test_rms_norm_grad[x]``
    -> ``rms_norm``; ``tests/test_reference.py::test_rule[gelu]`` -> ``gelu``)."""
    path, _, name = nodeid.partition("::")
    func, _, params = name.partition("[")
    for text in (func, params, Path(path).name):
        for op in sorted(OPS, key=len, reverse=True):
            if op in text:
                return op
    return OTHER


def read_junit(path: Path) -> list[dict[str, str]]:
    """Every test case of a JUnit XML file: nodeid, outcome (passed, failed, error, skipped), message."""
    root = ET.parse(path).getroot()
    out = []
    for tc in root.iter("testcase"):
        # pytest writes classname "tests.test_x" (or "tests.test_x.TestClass") and name "test_y[param]"
        parts = tc.get("classname", "").split(".")
        cls = [parts.pop()] if len(parts) > 1 and parts[-1][:1].isupper() else []
        nodeid = "/".join(parts) + ".py::" + "::".join(cls + [tc.get("name", "")])
        outcome, message = "passed", ""
        for tag, word in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            el = tc.find(tag)
            if el is not None:
                outcome = word
                text = (el.get("message") or el.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        out.append({"nodeid": nodeid, "outcome": outcome, "message": message})
    return out


def _load_json(path: str | None) -> dict[str, Any] | None:
    if not path or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(rnd: Any) -> dict[str, Any]:
    """Tests, check rows and bench results of every step that wrote them."""
    tests: list[dict[str, str]] = []
    junit: list[tuple[str, Path]] = []
    checks: dict[str, Any] = {}
    benches: dict[str, Any] = {}
    for s in rnd.steps:
        if s.output is None or not Path(s.output).is_file():
            continue
        if s.kind == "pytest":
            try:
                cases = read_junit(Path(s.output))
            except ET.ParseError as exc:
                s.note = (s.note + "; " if s.note else "") + f"unreadable JUnit XML: {exc}"
                continue
            for c in cases:
                c["step"] = s.name
            tests += cases
            junit.append((s.name, Path(s.output)))
        elif s.kind == "check":
            doc = _load_json(s.output)
            if doc is not None:
                checks[s.name] = doc
        elif s.kind == "bench":
            doc = _load_json(s.output)
            if doc is not None:
                benches[s.name] = doc
    return {"tests": tests, "junit": junit, "checks": checks, "benches": benches}


def _is_llmkit_impl(name: str) -> bool:
    return name.startswith(("llmkit", "Int8Linear", "hf+"))


def _short_impl(name: str) -> str:
    m = re.fullmatch(r"llmkit\[(\w+)\]", name)
    return m.group(1) if m else name


def speed_summary(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per suite: per pass and llmkit implementation, the geometric mean over shapes of the
    speed-up against eager, the best fraction of the roofline, and the errors."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        s = out.setdefault(r["suite"], {"passes": {}, "errors": [], "devices": set()})
        if r.get("status") == "error":
            s["errors"].append(f"{r.get('pass')} {r.get('shape_label')} {r.get('impl')}: {str(r.get('reason'))[:200]}")
            continue
        if r.get("status") != "ok":
            continue
        s["devices"].add(r.get("device"))
        if not _is_llmkit_impl(r.get("impl", "")) or not r.get("vs_eager"):
            continue
        p = s["passes"].setdefault(r.get("pass"), {}).setdefault(r["impl"], {"ratios": [], "roof": []})
        p["ratios"].append(float(r["vs_eager"]))
        if r.get("fraction_of_roofline") is not None:
            p["roof"].append(float(r["fraction_of_roofline"]))
    for s in out.values():
        s["devices"] = sorted(d for d in s["devices"] if d)
        for impls in s["passes"].values():
            for v in impls.values():
                v["geomean_vs_eager"] = math.exp(sum(math.log(x) for x in v["ratios"]) / len(v["ratios"]))
                v["best_roofline"] = max(v["roof"]) if v["roof"] else None
    return out


def _speed_cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "-"
    parts = []
    for pass_, impls in s["passes"].items():
        best = sorted(impls.items(), key=lambda kv: -kv[1]["geomean_vs_eager"])
        txt = ", ".join(f"{_short_impl(n)} {v['geomean_vs_eager']:.2f}x"
                        + (f" ({100 * v['best_roofline']:.0f}% roof)" if v["best_roofline"] is not None else "")
                        for n, v in best)
        parts.append(f"{pass_}: {txt}")
    if s["errors"]:
        parts.append(f"ERROR x{len(s['errors'])}")
    return "; ".join(parts) or "no llmkit timing"


def op_table(rnd: Any, got: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per op: ran on the GPU, tests, check, speed."""
    tests_by_op: dict[str, dict[str, int]] = {}
    for t in got["tests"]:
        c = tests_by_op.setdefault(op_of_test(t["nodeid"]), {"passed": 0, "failed": 0, "error": 0, "skipped": 0})
        c[t["outcome"]] += 1
    checks: dict[str, dict[str, Any]] = {}
    for doc in got["checks"].values():
        for r in doc.get("rows", []):
            c = checks.setdefault(r["op"], {"PASS": 0, "FAIL": 0, "SKIP": 0, "devices": set()})
            c[r["status"]] = c.get(r["status"], 0) + 1
            if r["status"] in ("PASS", "FAIL"):
                c["devices"].add(r["device"])
    bench_results = [r for doc in got["benches"].values() for r in doc.get("results", [])]
    speeds = speed_summary(bench_results)
    rows = []
    for op in OPS + (OTHER,):
        t = tests_by_op.get(op)
        c = checks.get(op)
        s = speeds.get(op)
        evidence = []
        if c and "cuda" in c["devices"]:
            evidence.append("check")
        if s and "cuda" in s["devices"]:
            evidence.append("bench")
        if t and not rnd.dry_run and (t["passed"] + t["failed"] + t["error"]) > 0:
            evidence.append("tests")
        rows.append({
            "op": op,
            "ran_on_gpu": bool(evidence) and not rnd.dry_run,
            "evidence": evidence,
            "tests": t,
            "check": None if c is None else {k: v for k, v in c.items() if k != "devices"} | {
                "devices": sorted(c["devices"])},
            "speed": None if s is None else {"passes": {p: {n: {"geomean_vs_eager": round(v["geomean_vs_eager"], 3),
                                                               "best_fraction_of_roofline": v["best_roofline"]}
                                                           for n, v in impls.items()}
                                                       for p, impls in s["passes"].items()},
                                             "errors": s["errors"], "devices": s["devices"]},
            "speed_text": _speed_cell(s),
        })
    return [r for r in rows if r["op"] != OTHER or r["tests"]]


def _tests_cell(t: dict[str, int] | None) -> str:
    if not t:
        return "-"
    bad = t["failed"] + t["error"]
    return f"{t['passed']} passed / {bad} failed" + (f" ({t['skipped']} skipped)" if t["skipped"] else "")


def _check_cell(c: dict[str, Any] | None) -> str:
    if not c or c["PASS"] + c["FAIL"] == 0:
        return "-"
    where = "/".join(c["devices"])
    if c["FAIL"]:
        return f"FAIL {c['FAIL']} of {c['PASS'] + c['FAIL']} ({where})"
    return f"PASS {c['PASS']} ({where})"


def summary_doc(rnd: Any) -> dict[str, Any]:
    got = collect(rnd)
    ops = op_table(rnd, got)
    tests = got["tests"]
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    rnd.info["tests_failed"] = counts["failed"] + counts["error"]
    check_fail = [f"{r['op']} {r['backend']} {r['device']} {r['dtype']} {r['shape']} {r['output']}: {r.get('note', '')}"
                  for doc in got["checks"].values() for r in doc.get("rows", []) if r["status"] == "FAIL"]
    return {
        "schema": "llmkit-gpu-round/1",
        "dry_run": rnd.dry_run,
        "gpu_steps_ran": not rnd.dry_run,
        "info": rnd.info,
        "steps": [s.record() for s in rnd.steps],
        "ops": ops,
        "tests": {"counts": counts,
                  "failures": [t for t in tests if t["outcome"] in ("failed", "error")][:200]},
        "check": {"runs": {k: {"counts": v.get("counts"), "exit_code": v.get("exit_code"), "notes": v.get("notes"),
                               "skipped": v.get("skipped")} for k, v in got["checks"].items()},
                  "failures": check_fail[:200]},
        "bench": {"runs": {k: {"exit_code": v.get("exit_code"), "elapsed_s": v.get("elapsed_s"),
                               "skipped": v.get("skipped"), "roofline": v.get("roofline")}
                           for k, v in got["benches"].items()}},
        "_got": got,
    }


def format_summary(doc: dict[str, Any]) -> str:
    info, v = doc["info"], doc["info"].get("versions", {})
    gpu = v.get("gpu") or {}
    lines = ["# llmkit GPU round", ""]
    if doc["dry_run"]:
        lines += [f"**DRY RUN ({info.get('dry_run_reason', '?')}): the GPU steps did not run.** Nothing was "
                  "installed or built; CPU smoke versions of the steps ran instead (test collection, a small "
                  "test file, a quick CPU check and bench).", ""]
    lines.append(f"- GPU: {gpu.get('name', 'none')}" + (f", sm_{gpu['capability'].replace('.', '')}, {gpu['sms']} SMs, "
                                                        f"{gpu['memory_gib']} GiB" if gpu else ""))
    lines.append(f"- python {v.get('python')}, torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), triton "
                 f"{v.get('triton')}, transformers {v.get('transformers')}, numpy {v.get('numpy')}")
    lines.append(f"- date {info.get('date')}, {info.get('elapsed_s', '?')} s of a {info.get('budget_s')} s budget, "
                 f"LLMKIT_TEST_SEED={info.get('seed')}, CUDA_HOME={info.get('cuda_home', '-')}, "
                 f"extension built: {info.get('extension_built', '-')}")
    lines.append(f"- command: `{info.get('command')}`")
    c = doc["tests"]["counts"]
    lines += ["", f"Tests: {c['passed']} passed, {c['failed'] + c['error']} failed, {c['skipped']} skipped.", ""]
    lines += ["| op | ran on GPU | tests passed / failed | check | speed vs PyTorch eager (geomean over shapes) |",
              "|---|---|---|---|---|"]
    for r in doc["ops"]:
        ran = ("yes (" + ", ".join(r["evidence"]) + ")") if r["ran_on_gpu"] else "no"
        lines.append(
            f"| {r['op']} | {ran} | {_tests_cell(r['tests'])} | {_check_cell(r['check'])} | {r['speed_text']} |"
        )
    lines += ["", "| step | status | seconds | timeout | note |", "|---|---|---|---|---|"]
    for s in doc["steps"]:
        rc = "" if s["rc"] in (None, 0) else f" (rc {s['rc']})"
        lines.append(f"| {s['name']} | {s['status']}{rc} | {s['seconds']:.0f} | {s['timeout_s']:.0f} | {s['note']} |")
    fails = doc["tests"]["failures"]
    if fails:
        lines += ["", f"## Failed tests ({c['failed'] + c['error']}; the first {min(len(fails), 60)})", ""]
        lines += [f"- `{t['nodeid']}` ({t['step']}): {t['message']}" for t in fails[:60]]
    if doc["check"]["failures"]:
        lines += ["", f"## llmkit check failures (the first {min(len(doc['check']['failures']), 60)})", ""]
        lines += [f"- {f}" for f in doc["check"]["failures"][:60]]
    errs = [e for r in doc["ops"] if r["speed"] for e in r["speed"]["errors"]]
    if errs:
        lines += ["", "## Benchmark errors", ""] + [f"- {e}" for e in errs[:60]]
    lines += ["", "Files: " + ", ".join(RESULT_FILES) + " (logs.tar.gz: every step's output)."]
    return "\n".join(lines) + "\n"


def _merged_junit(got: dict[str, Any]) -> bytes:
    top = ET.Element("testsuites")
    for step, path in got["junit"]:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            continue
        for suite in ([root] if root.tag == "testsuite" else list(root)):
            suite.set("name", step)
            top.append(suite)
    return ET.tostring(top, encoding="utf-8", xml_declaration=True)


def write_results(rnd: Any) -> None:
    """The result files in the output folder (flat, at most len(RESULT_FILES) of them)."""
    doc = summary_doc(rnd)
    got = doc.pop("_got")
    out = rnd.out
    (out / "summary.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "summary.md").write_text(format_summary(doc))
    (out / "round.log").write_text("\n".join(rnd.console) + "\n")
    (out / "junit.xml").write_bytes(_merged_junit(got))
    (out / "check.json").write_text(json.dumps({"runs": got["checks"]}, indent=1))
    (out / "bench.json").write_text(json.dumps({"runs": got["benches"]}, indent=1))
    (rnd.logs / "round.log").write_text("\n".join(rnd.console) + "\n")
    tmp = rnd.work / "logs.tar.gz.tmp"  # outside the output folder: never an extra file there
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(rnd.logs, arcname="logs")
    shutil.move(tmp, out / "logs.tar.gz")


