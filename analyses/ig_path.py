"""The loss and its slope along integrated gradients' path, densely: why IG's completeness gap is what it is.

IG (``saliency.attribution.integrated_gradients``) integrates the slope ``dL/dα`` of the summed calibration loss along
``W + α(Q(W) − W)`` with ``K`` Gauss–Legendre nodes. Its completeness gap is that rule's error against the measured
``L(Q(W)) − L(W)``. This script walks the same path (the same model, task, calibration items, round-to-nearest
``Q(W)`` as ``circuitq faithfulness --estimators ig``) at a uniform grid of ``α`` *and* at the Gauss–Legendre nodes of
each ``--ig-steps``, one gradient pass per point (``attribution.walk_path``), and writes:

* every point's loss and slope (JSON, and a CSV);
* the rule of each ``K`` from its own nodes (it reproduces ``faithfulness``'s Σ attributions for the same seed: a check),
  the composite Simpson integral of the slope over the uniform grid, and the measured change;
* ``path_diagnosis`` of the uniform grid: variation ``∫|dL/dα|``, the cancellation ratio and the least resolved segment;
* whether the slope is a smooth function of ``α``: each Gauss–Legendre node's slope against the value a smooth
  (Chebyshev least-squares) curve through the uniform grid predicts there (a rough slope shows as a residual much larger than the spline's own error).

With ``--item-grid N`` also every item's loss at ``N + 1`` uniform points (forward passes only, ``attribution.
path_item_losses``): where the summed loss bends and whether a few items' sharp turns make the bends (``item_bends``).

Cost: ``grid + 1 + Σ K`` gradient passes over the calibration items (about 13 s each for 128 greater-than items on 2
cores). Usage (from the repository root):

    .venv/bin/python analyses/ig_path.py --task greater-than --bits 3 --seed 0 --grid 16 --ig-steps 4 8 16 \\
        --out analyses/results/ig_path/greater-than-3bit-s0.json
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import REPO, machine

sys.path.insert(0, str(REPO))

from circuitq.artifacts import write_json  # noqa: E402
from circuitq.config import FaithfulnessJob  # noqa: E402
from circuitq.data.tasks import Task  # noqa: E402
from circuitq.model.loading import load_model  # noqa: E402
from circuitq.pipeline.stages import quantized_weights  # noqa: E402
from circuitq.saliency.attribution import (  # noqa: E402
    gauss_legendre,
    path_diagnosis,
    path_item_losses,
    summed_loss,
    walk_path,
)


def simpson(x: np.ndarray, y: np.ndarray) -> float:
    """Composite Simpson over an even number of equal intervals."""
    n = len(x) - 1
    if n % 2:
        raise ValueError("Simpson needs an even number of intervals: use an even --grid")
    h = (x[-1] - x[0]) / n
    return float(h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


def analyse(loss_w: float, loss_q: float, grid: list, nodes_by_k: dict) -> dict:
    """Pure: the summary of one path from its points (``grid``: ``PathPoint`` at the uniform grid;
    ``nodes_by_k``: ``{K: [PathPoint] at K's Gauss–Legendre nodes}``)."""
    measured = loss_q - loss_w
    x = np.array([p.alpha for p in grid])
    d = np.array([p.slope for p in grid])
    Cheb = np.polynomial.Chebyshev
    spline = Cheb.fit(x, d, min(12, 2 * (len(x) // 3)))   # a smooth curve through the grid (least squares, degree ≤ 12)
    # its own error, from a curve through every other grid point predicting the skipped ones
    coarse = Cheb.fit(x[::2], d[::2], min(12, 2 * (len(x[::2]) // 3)))
    loo = np.abs(coarse(x[1::2]) - d[1::2])
    rules = {}
    for k, pts in nodes_by_k.items():
        _, w = gauss_legendre(k)
        rule = sum(wi * p.slope for wi, p in zip(w, pts))
        resid = [abs(p.slope - float(spline(p.alpha))) for p in pts]
        smooth_rule = sum(wi * float(spline(p.alpha)) for wi, p in zip(w, pts))
        rules[k] = {"rule": rule, "gap": abs(rule - measured) / abs(measured),
                    "rule_on_spline": smooth_rule, "gap_on_spline": abs(smooth_rule - measured) / abs(measured),
                    "max_node_residual": max(resid),
                    "diagnosis": {kk: v for kk, v in path_diagnosis(loss_w, loss_q, pts, w).items() if kk != "segments"}}
    diag = path_diagnosis(loss_w, loss_q, grid)
    return {"measured": measured, "loss_w": loss_w, "loss_q": loss_q,
            "simpson": simpson(x, d), "simpson_gap": abs(simpson(x, d) - measured) / abs(measured),
            "grid_loss_check": max(abs(grid[0].loss - loss_w), abs(grid[-1].loss - loss_q)),
            "variation": diag["variation"], "cancellation": diag["cancellation"], "worst_grid_segment": diag["worst"],
            "spline_error_median": float(np.median(loo)), "spline_error_max": float(loo.max()),
            "rules": rules}


def item_bends(alphas, losses, top: int = 5) -> dict:
    """Pure: where the summed loss bends and which items bend it. ``losses``: ``[points, items]`` on a uniform grid
    ``alphas``. An item's bend is ``Σ_α |Δ²L_i(α)| / h`` (its slope's total variation along the path, from second
    differences); the summed loss's bend is the same of ``Σ_i L_i``, at most the items' total. Returns the summed
    curve's bend, the items' total, the share of the ``top`` items in it and the ``α`` of the sharpest turn of the
    summed curve (largest ``|Δ²|``), with the items that turn most there."""
    x = np.asarray(alphas, dtype=float)
    lo = np.asarray(losses, dtype=float)
    ok = np.isfinite(lo).all(0)
    lo = lo[:, ok]
    h = x[1] - x[0]
    d2 = np.diff(lo, 2, axis=0) / h            # [points − 2, items]: change of slope between neighbours
    per_item = np.abs(d2).sum(0)
    total_d2 = d2.sum(1)
    order = np.argsort(-per_item)
    at = int(np.argmax(np.abs(total_d2)))
    there = np.argsort(-np.abs(d2[at]))[:top]
    idx = np.flatnonzero(ok)
    return {"items": int(ok.sum()), "summed_bend": float(np.abs(total_d2).sum()), "items_bend": float(per_item.sum()),
            "top_share": float(per_item[order[:top]].sum() / max(per_item.sum(), 1e-30)), "top": top,
            "top_items": [int(idx[i]) for i in order[:top]],
            "sharpest_alpha": float(x[at + 1]), "sharpest_change_of_slope": float(total_d2[at]),
            "sharpest_items": [{"item": int(idx[i]), "change_of_slope": float(d2[at, i])} for i in there],
            "summed_loss": lo.sum(1).tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--grid", type=int, default=16, help="uniform intervals on [0, 1] (even)")
    ap.add_argument("--ig-steps", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--item-grid", type=int, default=0, help="also every item's loss at this many uniform intervals")
    ap.add_argument("--items-only", action="store_true", help="only the per-item losses of --item-grid (no gradient pass)")
    ap.add_argument("--reanalyse", action="store_true",
                    help="recompute the summary of an existing --out from its stored points (no model) and rewrite it")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.reanalyse:
        return reanalyse(Path(a.out))
    if not a.task:
        print("--task is needed (e.g. --task greater-than)", file=sys.stderr)
        return 2
    if a.items_only and not a.item_grid:
        print("--items-only needs --item-grid N", file=sys.stderr)
        return 2
    if a.grid < 2 or a.grid % 2:
        print(f"--grid must be an even number ≥ 2, got {a.grid}", file=sys.stderr)
        return 2
    out = Path(a.out)
    if out.exists():
        print(f"{out} exists; pick another --out", file=sys.stderr)
        return 2
    job = FaithfulnessJob()
    calib = replace(job.calib, samples=a.calib_samples, seed=a.seed)
    qcfg = replace(job.quantize, bits=a.bits, method="rtn")   # faithfulness's Q(W): round-to-nearest, entry by entry
    lm = load_model(device="cpu")
    model, tok = lm.model, lm.tokenizer
    items = Task(a.task, job.data, tok).calib_for(calib)
    qw = quantized_weights(model, qcfg, progress=False).weights
    if a.items_only:
        fine = [i / a.item_grid for i in range(a.item_grid + 1)]
        t1 = time.perf_counter()
        b = item_bends(fine, path_item_losses(model, tok, items, qw, calib, fine))
        write_json(out, {"task": a.task, "bits": a.bits, "seed": a.seed, "calib_items": len(items), "model": lm.name,
                         "model_note": lm.note, "quantizer": "round-to-nearest", "group_size": qcfg.group_size,
                         "item_bends": {"grid": a.item_grid, **b, "seconds": time.perf_counter() - t1},
                         "machine": machine()})
        print_bends({"grid": a.item_grid, **b})
        return 0
    t0 = time.perf_counter()
    loss_w = summed_loss(model, tok, items, calib)
    grid_alphas = [i / a.grid for i in range(a.grid + 1)]
    alphas = list(grid_alphas)
    for k in a.ig_steps:
        alphas += gauss_legendre(k)[0]
    print(f"[ig_path] {a.task}, {a.bits} bits, seed {a.seed}: {len(alphas)} gradient passes over {len(items)} items",
          flush=True)
    pts = walk_path(model, tok, items, qw, calib, alphas, model_path=lm.source, progress=True)
    seconds = time.perf_counter() - t0
    grid = pts[:len(grid_alphas)]
    nodes_by_k, i = {}, len(grid_alphas)
    for k in a.ig_steps:
        nodes_by_k[k] = pts[i:i + k]
        i += k
    loss_q = grid[-1].loss
    res = analyse(loss_w, loss_q, grid, nodes_by_k)
    if a.item_grid:
        fine = [i / a.item_grid for i in range(a.item_grid + 1)]
        t1 = time.perf_counter()
        res["item_bends"] = {"grid": a.item_grid, **item_bends(fine, path_item_losses(model, tok, items, qw, calib, fine)),
                             "seconds": time.perf_counter() - t1}
    doc = {"task": a.task, "bits": a.bits, "seed": a.seed, "calib_items": len(items), "grid": a.grid,
           "ig_steps": a.ig_steps, "model": lm.name, "model_note": lm.note, "quantizer": "round-to-nearest",
           "group_size": qcfg.group_size, "objective": calib.objective, "loss_scope": calib.loss,
           "points": [p._asdict() for p in pts], **res, "seconds": seconds,
           "seconds_per_pass": seconds / len(alphas), "machine": machine()}
    write_json(out, doc)
    tmp = out.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["alpha", "loss", "slope", "set"])
        for j, p in enumerate(pts):
            wr.writerow([f"{p.alpha:.6f}", f"{p.loss:.6f}", f"{p.slope:.6f}",
                         "grid" if j < len(grid_alphas) else "gauss-legendre"])
    tmp.replace(out.with_suffix(".csv"))
    print(f"[ig_path] measured L(Q)−L(W) {res['measured']:+.4f}; Simpson over the grid {res['simpson']:+.4f} "
          f"(gap {res['simpson_gap']:.1%}); variation {res['variation']:.2f} ({res['cancellation']:.1f}x)")
    for k, r in res["rules"].items():
        print(f"[ig_path] K={k}: rule {r['rule']:+.4f} (gap {r['gap']:.1%}); on the grid's spline {r['rule_on_spline']:+.4f} "
              f"(gap {r['gap_on_spline']:.1%}); largest node residual from the spline {r['max_node_residual']:.3f} "
              f"(spline error median {res['spline_error_median']:.3f}, max {res['spline_error_max']:.3f})")
    if a.item_grid:
        print_bends(res["item_bends"])
    print(f"[ig_path] wrote {out} in {seconds:.0f} s")
    return 0


def reanalyse(path: Path) -> int:
    """The summary of a stored run again from its points (when ``analyse`` changes); everything else is kept."""
    from circuitq.saliency.attribution import PathPoint

    doc = __import__("json").loads(path.read_text())
    pts = [PathPoint(**p) for p in doc["points"]]
    n = doc["grid"] + 1
    nodes, i = {}, n
    for k in doc["ig_steps"]:
        nodes[k] = pts[i:i + k]
        i += k
    doc.update(analyse(doc["loss_w"], doc["loss_q"], pts[:n], {int(k): v for k, v in nodes.items()}))
    write_json(path, doc, overwrite=True)
    print(f"[ig_path] rewrote the summary of {path}")
    return 0


def print_bends(b: dict) -> None:
    print(f"[ig_path] per item over {b['grid']} intervals: the summed loss's slope varies by {b['summed_bend']:.1f}, "
          f"the items' by {b['items_bend']:.1f} in all, {b['top_share']:.0%} of it from the top {b['top']} items "
          f"{b['top_items']}; sharpest turn of the sum at α {b['sharpest_alpha']:.3f} "
          f"({b['sharpest_change_of_slope']:+.1f}), items there {[x['item'] for x in b['sharpest_items']]}")


if __name__ == "__main__":
    raise SystemExit(main())
