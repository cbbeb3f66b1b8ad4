"""Which quadrature, with how many gradient passes, would make integrated gradients complete on a measured
path: Gauss–Legendre with K nodes and composite rules (P panels × m Gauss nodes) applied to the loss along the
path that `analyses/ig_path.py --items-only` measured on a fine grid (issue 23; reads only, no pass).

    .venv/bin/python analyses/ig_rules.py --items analyses/results/ig_path/greater-than-3bit-s0-items.json \
        --check analyses/results/ig_path/greater-than-3bit-s0.json --out analyses/results/ig_path/rules-greater-than-3bit

The slope at any α is the derivative of the cubic through the 4 nearest grid losses (a grid of 1/128: the turn of
greater-than's path is resolved to that width). The check: each K the real runs used is recomputed here and set
beside the rule the gradient passes gave (`--check`'s `rules`), so the interpolated slope is seen to stand in for
the passes' own. A rule's gap is |rule − (L(1) − L(0))| / |L(1) − L(0)|, IG's completeness gap for that rule.
Writes OUT.md and OUT.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def slope_fn(losses: np.ndarray):
    """dL/dα of the cubic through the 4 grid points nearest α, on the uniform grid of ``losses`` over [0, 1]."""
    n = len(losses) - 1
    grid = np.linspace(0.0, 1.0, n + 1)

    def s(x: float) -> float:
        i = min(max(int(np.floor(x * n)) - 1, 0), n - 3)
        c = np.polyfit(grid[i:i + 4], losses[i:i + 4], 3)
        return float(np.polyval(np.polyder(c), x))
    return s


def composite(s, panels: int, m: int) -> float:
    """``panels`` equal panels of [0, 1], ``m`` Gauss–Legendre nodes in each (``panels = 1``: plain GL-m)."""
    x, w = np.polynomial.legendre.leggauss(m)
    edges = np.linspace(0.0, 1.0, panels + 1)
    total = 0.0
    for lo, hi in zip(edges, edges[1:]):
        total += sum(wi / 2 * (hi - lo) * s(lo + (xi + 1) / 2 * (hi - lo)) for xi, wi in zip(x, w))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=Path, required=True, help="an ig_path.py --items-only JSON (summed_loss on a grid)")
    ap.add_argument("--check", type=Path, help="the ig_path.py JSON of the same path (its K-node rules)")
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    src = json.loads(args.items.read_text())
    losses = np.array(src["item_bends"]["summed_loss"], dtype=float)
    net = float(losses[-1] - losses[0])
    s = slope_fn(losses)
    rows = []
    for k in args.steps:
        row = {"K": k, "gauss": composite(s, 1, k)}
        for m in (4, 2, 1):
            if k % m == 0 and k // m > 1:
                row[f"m{m}"] = composite(s, k // m, m)
        row["gaps"] = {r: abs(v - net) / abs(net) for r, v in row.items() if r != "K"}
        rows.append(row)
    check = []
    if args.check:
        real = json.loads(args.check.read_text()).get("rules", {})
        for k, r in sorted(real.items(), key=lambda kv: int(kv[0])):
            got = r.get("rule") if isinstance(r, dict) else r
            check.append({"K": int(k), "passes": got, "here": composite(s, 1, int(k))})
    out = {"items": str(args.items), "task": src["task"], "bits": src["bits"], "seed": src["seed"],
           "grid": len(losses) - 1, "net": net, "rows": rows, "check": check, "machine": machine()}
    lines = [f"# Quadrature rules on the measured path: {src['task']}, {src['bits']} bits, seed {src['seed']}", "",
             f"Written by `analyses/ig_rules.py` from `{args.items}` (the summed loss of {src['calib_items']} calibration "
             f"items at {len(losses)} points of the path; **weights dequantized from a 4-bit GGUF file**). Net change "
             f"L(1) − L(0) = {net:+.3f}. Each cell: |rule − net| / |net|, the completeness gap IG would have with "
             "that rule (P×m: P equal panels of m Gauss–Legendre nodes; K gradient passes each).", ""]
    if check:
        lines += ["Check (the rule the real gradient passes gave, and the same rule here): " + "; ".join(
            f"K = {c['K']}: {c['passes']:+.3f} vs {c['here']:+.3f}" for c in check if c["passes"] is not None), ""]
        bad = [c for c in check if c["passes"] is not None and abs(c["passes"] - c["here"]) > 0.1 * abs(net)]
        out["check_fails"] = bool(bad)
        if bad:
            lines += ["**The check fails** (off by more than 10% of the net change at K = "
                      f"{', '.join(str(c['K']) for c in bad)}): this grid does not resolve the path, and the table "
                      "below is not what those rules would give.", ""]
    cols = ["gauss", "m4", "m2", "m1"]
    names = {"gauss": "Gauss–Legendre, K nodes", "m4": "K/4 panels × 4", "m2": "K/2 panels × 2",
             "m1": "K panels × 1 (midpoints)"}
    lines += ["| K | " + " | ".join(names[c] for c in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for row in rows:
        lines.append(f"| {row['K']} | " + " | ".join(
            f"{row['gaps'][c]:.1%}" if c in row["gaps"] else "" for c in cols) + " |")
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
