"""Turn the intermediates of one GPU check (benchmarks/gpu/run.sh) into ``summary.md`` (tables)
and ``summary.json`` (the same numbers): steps with status and time, tests passed / failed /
skipped with the names of failures, every kernel row with its time, % of the bytes floor and
its ratios to the padded-gather (vLLM) and per-adapter-loop baselines of the same run, the vLLM
wrapper's decode step, the sensitivity pass's overhead over a plain backward, and the goals.

    python benchmarks/gpu/summarize.py WORK_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PADDED, LOOP = "padded gather (vLLM ref)", "loop (PEFT)"
SERVER_STEP = "server step (prebuilt, out +=)"


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps(work: Path) -> tuple[bool, list[dict]]:
    dry, rows = False, []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split("\t")
        if parts[0] == "dry_run":
            dry = parts[1] == "1"
            continue
        name, rc, secs, limit = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
        status = "ok" if rc == 0 else "timed out" if rc in (124, 137) else f"failed (rc {rc})"
        rows.append({"name": name, "rc": rc, "seconds": secs, "limit": limit, "status": status})
    return dry, rows


def tests(work: Path) -> dict | None:
    path = work / "junit.xml"
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            out["failed" if "failure" in kinds else "errors"] += 1
            out["failures"].append(name)
        elif "skipped" in kinds:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def kernels(work: Path) -> dict | None:
    doc = _json(work / "kernels.json")
    if doc is None:
        return None
    by_case: dict[str, dict[str, float]] = {}
    for r in doc["rows"]:
        by_case.setdefault(r["case"], {})[r["impl"]] = r["ms"]
    rows = []
    for r in doc["rows"]:
        base = by_case[r["case"]]
        rows.append({
            "case": r["case"], "impl": r["impl"], "ms": r["ms"],
            "pct_of_floor": 100 * r["fraction_of_floor"] if "fraction_of_floor" in r else None,
            "vs_padded_gather": base[PADDED] / r["ms"] if PADDED in base else None,
            "vs_loop": base[LOOP] / r["ms"] if LOOP in base else None,
        })  # fmt: skip
    return {key: doc.get(key) for key in ("device", "d", "floor", "peak_GBs")} | {"rows": rows}


def goals(summary: dict) -> list[dict]:
    out = []
    t = summary["tests"]
    if t is not None:
        ok = t["failed"] == 0 and t["errors"] == 0
        out.append({"goal": "every CUDA test passes", "value": f"{t['passed']} passed, "
                    f"{t['failed'] + t['errors']} failed", "met": ok})  # fmt: skip
    k = summary["kernels"]
    step = [r for r in (k or {}).get("rows", []) if "decode" in r["case"]
            and r["impl"].endswith(SERVER_STEP)]  # fmt: skip
    if step:
        r = step[0]
        if r["pct_of_floor"] is not None:
            out.append(
                {
                    "goal": "decode ≥ 80 % of the HBM bytes floor",
                    "value": f"{r['pct_of_floor']:.0f} %",
                    "met": r["pct_of_floor"] >= 80,
                }
            )
        if r["vs_padded_gather"] is not None:
            out.append({"goal": "decode ≥ 2× the padded gather (vLLM-style)",
                        "value": f"{r['vs_padded_gather']:.2f}×",
                        "met": r["vs_padded_gather"] >= 2})  # fmt: skip
    s = summary["sensitivity"]
    if s is not None:
        out.append(
            {
                "goal": "sensitivity pass ≤ 1.05× a plain backward",
                "value": f"{s['overhead']:.3f}×",
                "met": s["overhead"] <= 1.05,
            }
        )
    return out


def _f(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def markdown(s: dict) -> str:
    m = s["machine"]
    lines = ["# GPU check" + (" (dry run on the CPU: tiny shapes)" if s["dry_run"] else ""), "",
             f"Device: {m['device']}; torch {m['torch']}, triton {m['triton']}.", "",
             "| step | status | seconds (limit) |", "| --- | --- | ---: |"]  # fmt: skip
    lines += [
        f"| {r['name']} | {r['status']} | {r['seconds']} ({r['limit']}) |" for r in s["steps"]
    ]
    t = s["tests"]
    lines += ["", "## Tests (`-m cuda`)", ""]
    if t is None:
        lines.append("No test report (the step did not finish).")
    else:
        lines.append(f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped.")  # fmt: skip
        lines += [f"- FAILED {name}" for name in t["failures"]]
    k = s["kernels"]
    lines += ["", "## Kernels", ""]
    if k is None:
        lines.append("No kernel results (the step did not finish).")
    else:
        peak = f" ({k['peak_GBs']:.0f} GB/s)" if k.get("peak_GBs") else ""
        lines += [f"d = {k['d']}, 16 adapters of ranks 8/16/32/64; floor: {k['floor']}{peak}.",
                  "", "| case | implementation | ms | % of floor | × vs padded gather | "
                  "× vs loop |", "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in k["rows"]:
            lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.4f} | "
                         f"{_f(r['pct_of_floor'], '.0f')} | {_f(r['vs_padded_gather'], '.2f')} | "
                         f"{_f(r['vs_loop'], '.2f')} |")  # fmt: skip
    w = s["vllm_wrapper"]
    lines += ["", "## vLLM wrapper decode step", ""]
    if w is None:
        lines.append("No result (the step did not finish).")
    else:
        lines.append(f"{w['tokens']} tokens, {w['dtype']}: true ranks {w['true_rank_us']:.1f} µs "
                     f"({w['pct_of_floor']:.0f} % of the {w['floor_us']:.1f} µs floor at "
                     f"{w['bandwidth_GBs']:.0f} GB/s), padded to 64 {w['padded_us']:.1f} µs "
                     f"({w['padded_over_true']:.2f}×).")  # fmt: skip
    p = s["sensitivity"]
    lines += ["", "## Sensitivity pass", ""]
    if p is None:
        lines.append("No result (the step did not finish).")
    else:
        sec = p["seconds"]
        lines.append(f"{p['model']}, {p['parameters'] / 1e6:.1f} M parameters, {p['dtype']}, "
                     f"{p['tokens_per_pass']} tokens per pass: plain backward "
                     f"{sec['plain backward']['median']:.3f} s, sensitivity pass "
                     f"{sec['sensitivity pass']['median']:.3f} s (medians): "
                     f"**{p['overhead']:.3f}×**.")  # fmt: skip
    lines += ["", "## Goals", "", "| goal | value | met |", "| --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'NO'} |" for g in s["goals"]]
    return "\n".join(lines) + "\n"


def machine(summary: dict) -> dict:
    """Device from the steps' results; versions from the installed packages (no torch import:
    the summary must be written even when torch is broken)."""
    from importlib import metadata

    device = next((d["device"] for d in (summary["kernels"], summary["vllm_wrapper"],
                   summary["sensitivity"]) if d and d.get("device")), "unknown")  # fmt: skip
    versions = {}
    for name in ("torch", "triton"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"device": device, **versions}


def main(work_dir: str, out_dir: str) -> int:
    work, out = Path(work_dir), Path(out_dir)
    dry, step_rows = steps(work)
    summary = {
        "dry_run": dry, "steps": step_rows, "tests": tests(work), "kernels": kernels(work),
        "vllm_wrapper": _json(work / "vllm_wrapper.json"),
        "sensitivity": _json(work / "sensitivity.json"),
    }  # fmt: skip
    summary["machine"] = machine(summary)
    summary["goals"] = goals(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
