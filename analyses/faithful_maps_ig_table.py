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
    return {"file": str(path), "task": d["task"], "bits": d["measurement"]["bits"], "K": d["completeness"]["ig_steps"],
            "units": len(d["units"]), "items": d["items"], "calib_items": d["calib_items"],
            "ig": d["spearman"]["ig"], "atp": d["spearman"].get("atp"),
            "ceiling": (d.get("noise_ceiling") or {}).get("ceiling"),
            "attributed": c["attributed"], "measured": c["measured"], "gap": c["gap"],
            "seconds": cost.get("seconds"), "seconds_per_step": cost.get("seconds_per_step"),
            "tokens_per_second": cost.get("tokens_per_second"), "calibration_tokens": cost.get("calibration_tokens"),
            "version": d.get("circuitq_version")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="+", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="output stem")
    a = ap.parse_args()
    rows = sorted((row(p) for p in a.files if p.suffix == ".json"),
                  key=lambda r: (r["task"], -int(r["bits"]), r["K"]))
    f = lambda v, s="{:.3f}": "" if v is None else s.format(v)
    lines = ["# Integrated gradients by steps: Spearman over all query heads, completeness, cost", "",
             "Default model (**weights dequantized from a 4-bit GGUF file**), calibration seed 0, loss objective; each "
             "task's stored measurement of every head replaced alone (held-out items). `ig`: K Gauss–Legendre nodes; "
             "`atp`: one gradient pass. Gap: |Σ attributions − measured L(Q(W)) − L(W)| / |measured|, over the "
             "calibration items with every targeted weight replaced at once.", "",
             "| task | bits | K | ρ `ig` | ρ `atp` | ceiling | Σ attributions | measured | gap | s per step | tokens/s | calib. / held-out items |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['bits']} | {r['K']} | {f(r['ig'])} | {f(r['atp'])} | {f(r['ceiling'])} | "
                     f"{r['attributed']:+.3f} | {r['measured']:+.3f} | {r['gap']:.1%} | {f(r['seconds_per_step'], '{:.1f}')} | "
                     f"{f(r['tokens_per_second'], '{:.0f}')} | {r['calib_items']} / {r['items']} |")
    lines += ["", f"Machine: {machine()}. Files: " + ", ".join(Path(r['file']).name for r in rows)]
    a.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "machine": machine()}, indent=1))
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
