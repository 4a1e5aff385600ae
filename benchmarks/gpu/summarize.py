"""Turn a GPU check folder (benchmarks/gpu/run.sh) into one Markdown summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> int:
    out = Path(folder)
    lines = ["# GPU check", "", "```", (out / "machine.txt").read_text().strip(), "```", ""]
    steps = out / "steps.txt"
    if steps.exists():
        lines += ["Steps (rc 0 = passed):", "", "```", steps.read_text().strip(), "```", ""]
    bench = out / "benchmarks.json"
    if bench.exists() and bench.stat().st_size:
        data = json.loads(bench.read_text())
        lines += ["| benchmark | median µs | extra |", "| --- | ---: | --- |"]
        for b in data.get("benchmarks", []):
            extra = ", ".join(f"{k}={v}" for k, v in sorted(b.get("extra_info", {}).items()))
            lines.append(f"| {b['fullname']} | {b['stats']['median'] * 1e6:.1f} | {extra} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
