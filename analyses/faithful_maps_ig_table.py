"""Integrated gradients by its number of steps, every task and bit width: one table from the
faithfulness JSONs of `circuitq faithfulness --estimators atp ig --ig-steps K` (issue 23, item 5).

    .venv/bin/python analyses/faithful_maps_ig_table.py --files analyses/results/faithful_maps_ig_tasks/*.json \
        analyses/results/faithful_maps_ig_steps/faith-ioi-3bit-ig*-s0.json --out analyses/results/faithful_maps_ig_tasks/table

Per file: Spearman of `ig` and of `atp` over every unit against the measured loss change, the
measurement's ceiling, IG's completeness (Σ attributions vs the measured L(Q(W)) − L(W) over the
calibration items) and, where the report has it (0.8.6), IG's seconds per step and tokens/s.
Writes STEM.json and STEM.md. Reads only; measures nothing.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def row(path: Path) -> dict:
    d = json.loads(path.read_text())
    if "ig" not in d.get("spearman", {}):
        raise SystemExit(f"{path}: no ig estimator in this faithfulness file")
    c = d["completeness"]["ig"]
    cost = d.get("ig_cost") or {}
    seed = d.get("calib_seed", d.get("seed"))
    if seed is None:   # reports before 0.8.7 do not say; this project's file names do (…-s1.json)
        m = re.search(r"-s(\d+)(?:-\w+)?\.json$", path.name)
        seed = int(m.group(1)) if m else None
    return {"file": str(path), "task": d["task"], "seed": seed, "bits": d["measurement"]["bits"], "K": d["completeness"]["ig_steps"],
            "units": len(d["units"]), "items": d["items"], "calib_items": d["calib_items"],
            "ig": d["spearman"]["ig"], "atp": d["spearman"].get("atp"),
            "ceiling": (d.get("noise_ceiling") or {}).get("ceiling"),
            "attributed": c["attributed"], "measured": c["measured"], "gap": c["gap"],
            "seconds": cost.get("seconds"), "seconds_per_step": cost.get("seconds_per_step"),
            "tokens_per_second": cost.get("tokens_per_second"), "calibration_tokens": cost.get("calibration_tokens"),
            "version": d.get("circuitq_version")}


def over_seeds(rows: list[dict]) -> list[dict]:
    """Per (task, bits, K): ρ `ig` and ρ `atp` as mean ± sd [lowest] over the seeds, the gap's mean and largest."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], int(r["bits"]), r["K"]), []).append(r)
    out = []
    for (task, bits, k), rs in sorted(groups.items(), key=lambda g: (g[0][0], -g[0][1], g[0][2])):
        def stat(key):
            v = [r[key] for r in rs if r[key] is not None]
            return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, min(v)) if v else None
        out.append({"task": task, "bits": bits, "K": k, "seeds": sorted(r["seed"] for r in rs), "ig": stat("ig"),
                    "atp": stat("atp"), "gap_mean": statistics.mean(r["gap"] for r in rs),
                    "gap_max": max(r["gap"] for r in rs)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="+", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="output stem")
    a = ap.parse_args()
    rows = sorted((row(p) for p in a.files if p.suffix == ".json"),
                  key=lambda r: (r["task"], -int(r["bits"]), r["K"], r["seed"] if r["seed"] is not None else -1))
    f = lambda v, s="{:.3f}": "" if v is None else s.format(v)
    lines = ["# Integrated gradients by steps: Spearman over all query heads, completeness, cost", "",
             "Default model (**weights dequantized from a 4-bit GGUF file**), calibration seed per row, loss objective; each "
             "task's stored measurement of every head replaced alone (held-out items). `ig`: K Gauss–Legendre nodes; "
             "`atp`: one gradient pass. Gap: |Σ attributions − measured L(Q(W)) − L(W)| / |measured|, over the "
             "calibration items with every targeted weight replaced at once.", "",
             "| task | bits | K | seed | ρ `ig` | ρ `atp` | ceiling | Σ attributions | measured | gap | s per step | tokens/s | calib. / held-out items |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['bits']} | {r['K']} | {r['seed']} | {f(r['ig'])} | {f(r['atp'])} | {f(r['ceiling'])} | "
                     f"{r['attributed']:+.3f} | {r['measured']:+.3f} | {r['gap']:.1%} | {f(r['seconds_per_step'], '{:.1f}')} | "
                     f"{f(r['tokens_per_second'], '{:.0f}')} | {r['calib_items']} / {r['items']} |")
    agg = over_seeds(rows)
    ms = lambda t: "" if t is None else f"{t[0]:.3f} ± {t[1]:.3f} [{t[2]:.3f}]"   # noqa: E731
    lines += ["", "## Over calibration seeds", "",
              "mean ± sd [lowest seed] of the rows above; the gap's mean and largest over the seeds.", "",
              "| task | bits | K | seeds | ρ `ig` | ρ `atp` | gap mean | gap largest |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in agg:
        lines.append(f"| {g['task']} | {g['bits']} | {g['K']} | {', '.join(map(str, g['seeds']))} | {ms(g['ig'])} | "
                     f"{ms(g['atp'])} | {g['gap_mean']:.1%} | {g['gap_max']:.1%} |")
    lines += ["", f"Machine: {machine()}. Files: " + ", ".join(Path(r['file']).name for r in rows)]
    a.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "over_seeds": agg, "machine": machine()}, indent=1))
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
