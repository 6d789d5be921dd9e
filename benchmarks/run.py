"""`make bench`: run every benchmarks/bench_*.py, then write benchmarks/RESULTS.md.

Each benchmark runs in its own process (so peak memory figures are its own) and writes
results/NAME.json; this script turns all of them into one table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def render(results: list[dict]) -> str:
    out = ["# Benchmark results", "",
           "Written by `make bench` (benchmarks/run.py). Each figure is measured side by side "
           "with its baseline in one run; a ratio above 1 means fastsd is better.", ""]
    for r in results:
        out += [f"## {r['title']}", "", f"`{r['command']}` — {r['when']}, {r['machine']}", "",
                "| metric | fastsd | baseline | ratio | target | met |",
                "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            met = {True: "yes", False: "**no**", None: ""}[row.get("passed")]
            ratio = f"{row['ratio']:.2f}×" if row.get("ratio") else ""
            out.append(f"| {row['metric']} ({row['unit']}) | {fmt(row['ours'])} | "
                       f"{fmt(row.get('baseline'))} | {ratio} | {row.get('target', '')} | {met} |")
        if r.get("notes"):
            out += ["", r["notes"]]
        out.append("")
    return "\n".join(out)


def load(folder: Path) -> list[dict]:
    """Every results/NAME.json in ``folder``, by name."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


def main(argv: list[str]) -> int:
    """Run the named benchmarks (all when none is named); --table only rewrites RESULTS.md."""
    only = {a for a in argv if not a.startswith("--")}
    failed = []
    for bench in [] if "--table" in argv else sorted(HERE.glob("bench_*.py")):
        if only and bench.stem not in only and bench.stem[len("bench_"):] not in only:
            continue
        print(f"== {bench.name}", flush=True)
        if subprocess.run([sys.executable, str(bench)], cwd=HERE.parent).returncode:
            failed.append(bench.name)
    results = load(HERE / "results")
    (HERE / "RESULTS.md").write_text(render(results))
    print(f"Wrote {HERE / 'RESULTS.md'} ({len(results)} benchmarks)")
    if failed:
        print("Failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
