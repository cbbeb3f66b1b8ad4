"""Which estimator predicts what quantizing a head does? Spearman over all query heads, IG
completeness and faithfulness curves, over calibration seeds (issue 23's measurements).

    .venv/bin/python analyses/faithful_maps.py --tasks ioi greater-than --bits 3 2 --seeds 0 1 2 \
        --root runs/faithful-maps --out analyses/results/faithful_maps

Per task T, bit width B and seed S, through the CLI (what a user gets), from a git worktree of the
commit given by ``--rev`` (so editing the tree meanwhile changes nothing):

1. ``circuitq score --task T --method tacq --bits B --samples 128 --seed S``: the TaCQ selection
   scores (the circuit a run keeps in 16-bit).
2. ``circuitq faithfulness --scores <1> --units heads --all-units --estimators score atp ig
   --ig-steps K --curve --bits B --seed S``: every query head replaced alone by its B-bit
   round-to-nearest value (entry by entry), the task loss measured on 192 held-out evaluation items,
   against each estimator's unit sum (gradients from the seed's 128 calibration items, disjoint from
   the evaluation items); IG's completeness; faithfulness curves of the heads ordered by each
   estimator and at random.

Writes ``OUT/rows.csv`` (one row per task × bits × seed), ``OUT/SUMMARY.md`` (mean ± sd over seeds,
the lowest seed, the machine) and copies each faithfulness JSON into ``OUT/``. ``--aggregate-only``
rebuilds the summary from ``ROOT``. The default model's weights are dequantized from a 4-bit GGUF
file.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
from pathlib import Path

from common import REPO, machine, run_circuitq, worktree


def measure(task: str, bits: int, seed: int, a, env: dict, root: Path, reuse: Path | None = None) -> Path:
    """Scores and the faithfulness JSON of one task × bits × seed; ``reuse``: an earlier seed's
    JSON whose per-head measurements are taken (``--measured``: the measured changes do not depend
    on the calibration seed; only the estimators do)."""
    scores = root / f"scores-{task}-{bits}bit-s{seed}"
    faith = root / f"faith-{task}-{bits}bit-s{seed}.json"
    if not scores.exists():
        run_circuitq(["score", "--task", task, "--method", "tacq", "--bits", str(bits), "--samples", str(a.calib_samples),
             "--seed", str(seed), "--out", str(scores)], env, root / f"{scores.name}.log")
    if not faith.exists():
        secs = run_circuitq(["faithfulness", "--scores", str(scores), "--units", "heads", "--all-units",
                    "--estimators", *a.estimators, "--ig-steps", str(a.ig_steps), "--curve", "--bits", str(bits),
                    "--seed", str(seed), "--calib-samples", str(a.calib_samples),
                    "--eval-samples", str(a.eval_samples), "--objective", a.objective,
                    *(["--measured", str(reuse)] if reuse else []),
                    "--out", str(faith)], env, root / f"{faith.stem}.log")
        rep = json.loads(faith.read_text())
        rep["wall_seconds"] = secs
        faith.write_text(json.dumps(rep, indent=2) + "\n")
    return faith


def row_of(path: Path) -> dict:
    rep = json.loads(path.read_text())
    task, bits, seed = path.stem.removeprefix("faith-").rsplit("-", 2)
    r = {"task": task, "bits": int(bits.removesuffix("bit")), "seed": int(seed.removeprefix("s")),
         "heads": len(rep["units"]), "items": rep["items"], "metric": rep.get("metric"),
         "base_metric": rep["base"]["metric"], "base_loss": rep["base"]["loss"],
         "wall_seconds": rep.get("wall_seconds"), "estimators": " ".join(rep["estimators"]),
         "measured_from": rep.get("measured_from")}
    ig = (rep.get("completeness") or {}).get("ig")
    r.update(ig_gap=ig["gap"] if ig else float("nan"), ig_attributed=ig["attributed"] if ig else float("nan"),
             ig_measured=ig["measured"] if ig else float("nan"))
    for k, v in rep["spearman"].items():
        r[f"spearman_{k}"] = v
    rho_m = rep.get("spearman_metric")
    if rho_m is None and all(u.get("measured_metric") is not None for u in rep["units"]):   # files of circuitq < 0.8
        from circuitq.circuits.faithfulness import spearman

        rho_m = {k: spearman([u["predicted"][k] for u in rep["units"]], [-u["measured_metric"] for u in rep["units"]])
                 for k in rep["spearman"]}
    for k, v in (rho_m or {}).items():
        r[f"spearman_metric_{k}"] = v
    r["objective"] = rep.get("objective", "nll")
    nc = rep.get("noise_ceiling") or {}
    r["noise_ceiling"] = nc.get("ceiling", float("nan"))
    r["split_half"] = nc.get("split_half_spearman", float("nan"))
    curves = rep["curves"]
    r["metric_all_heads_replaced"] = curves["none"]["metric"]
    for o, modes in curves["orderings"].items():
        for mode, c in modes.items():
            r[f"area_{o}_{mode}"] = c["area"]
        pts = modes["keep-top"]["points"]
        at10 = [p for p in pts if p["fraction"] <= 0.1 + 1e-9]
        r[f"recovery10_{o}"] = at10[-1]["recovery"] if at10 else float("nan")
        span = curves["none"]["loss"] - curves["full"]["loss"]   # the same recovery of the task loss
        r[f"loss_recovery10_{o}"] = (curves["none"]["loss"] - at10[-1]["loss"]) / span if at10 and span else float("nan")
    return r


def mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "—"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def summary(rows: list[dict], a, rev: str) -> str:
    ests = [e for e in a.estimators if all(f"spearman_{e}" in r for r in rows)]
    orders = list(ests) + ["random"]
    out = ["# Faithful head maps: estimators against measured head quantization (issue 23)", "",
           f"Measured with `analyses/faithful_maps.py` at circuitq commit `{rev[:10]}` on "
           f"{machine()['platform']}, {machine()['cpus']} CPUs, torch {machine()['torch']}. Model: SmolLM2-135M-Instruct, "
           "**weights dequantized from a 4-bit GGUF file**. Per seed: the TaCQ selection scores from "
           f"{a.calib_samples} calibration items (the estimators' gradients are of `--objective {a.objective}`: "
           + ("the answer's NLL" if a.objective == "nll" else "minus the task's metric at the first completion position")
           + "), and every query head (30 layers × 9 = 270) replaced alone by its "
           f"round-to-nearest value at the given bits, the loss measured on {a.eval_samples} held-out items. "
           f"Estimators: `score` = the TaCQ selection score summed over the head, `atp` = ΣG·ΔW, `atp-local` = "
           "ΣG·ΔW with the head's attention block recomputed exactly, `atp-denoise` = ΣG·ΔW with the gradient taken "
           "where every head is replaced (what restoring one head saves), `ig` = integrated "
           f"gradients with {a.ig_steps} Gauss–Legendre nodes. The measured changes do not depend on the seed: the "
           "first seed measures them, the others reuse them (`--measured`). Mean ± sd over seeds; the lowest seed in brackets. "
           "Noise ceiling: the Spearman a perfect predictor would reach with measurements this noisy (√ of the "
           "Spearman–Brown reliability of the changes measured on the even vs the odd items).", "",
           "## Spearman(predicted, measured loss change) over all query heads", "",
           "| task | bits | seeds | " + " | ".join(ests) + " | noise ceiling | IG completeness gap |",
           "| --- | --- | --- | " + " | ".join("---" for _ in ests) + " | --- | --- |"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["bits"]), []).append(r)
    for (task, bits), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        cells = []
        for e in ests:
            xs = [r[f"spearman_{e}"] for r in rs]
            cells.append(f"{mean_sd(xs)} [{min(xs):.3f}]")
        out.append(f"| {task} | {bits} | {len(rs)} | " + " | ".join(cells)
                   + f" | {mean_sd([r.get('noise_ceiling', float('nan')) for r in rs])} | {mean_sd([r['ig_gap'] for r in rs])} |")
    if all(f"spearman_metric_{e}" in r for r in rows for e in ests):
        out += ["", "## Spearman(predicted, measured change of the task metric, sign flipped) over all query heads", "",
                "| task | bits | seeds | " + " | ".join(ests) + " |", "| --- | --- | --- | " + " | ".join("---" for _ in ests) + " |"]
        for (task, bits), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            cells = []
            for e in ests:
                xs = [r[f"spearman_metric_{e}"] for r in rs]
                cells.append(f"{mean_sd(xs)} [{min(xs):.3f}]")
            out.append(f"| {task} | {bits} | {len(rs)} | " + " | ".join(cells) + " |")
    out += ["", "## Faithfulness curves (heads ordered by each estimator)", "",
            "`keep-top`: the top k heads stay 16-bit, every other head is replaced (area = mean recovery of the "
            "task metric over the grid; 1 = the 16-bit model, 0 = every head replaced). `replace-top`: only the "
            "top k heads are replaced (area = mean share of the whole effect). `rec@10%`: recovery with 10% of "
            "the heads kept.", "",
            "| task | bits | " + " | ".join(f"{o} keep-top area" for o in orders) + " | "
            + " | ".join(f"{o} rec@10%" for o in orders) + " | " + " | ".join(f"{o} loss rec@10%" for o in orders) + " |",
            "| --- | --- | " + " | ".join("---" for _ in orders * 3) + " |"]
    for (task, bits), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        out.append(f"| {task} | {bits} | " + " | ".join(mean_sd([r[f'area_{o}_keep-top'] for r in rs]) for o in orders)
                   + " | " + " | ".join(mean_sd([r[f'recovery10_{o}'] for r in rs]) for o in orders)
                   + " | " + " | ".join(mean_sd([r.get(f'loss_recovery10_{o}', float('nan')) for r in rs]) for o in orders)
                   + " |")
    out += ["", "## Per seed", "", "| task | bits | seed | base metric | every head replaced | "
            + " | ".join(f"ρ {e}" for e in ests) + " | IG gap | minutes |",
            "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in ests) + " | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["task"], -r["bits"], r["seed"])):
        out.append(f"| {r['task']} | {r['bits']} | {r['seed']} | {r['base_metric']:.3f} | "
                   f"{r['metric_all_heads_replaced']:.3f} | " + " | ".join(f"{r[f'spearman_{e}']:.3f}" for e in ests)
                   + f" | {r['ig_gap']:.1%} | {(r['wall_seconds'] or 0) / 60:.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["ioi", "greater-than"])
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 2])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ig-steps", type=int, default=4)
    ap.add_argument("--estimators", nargs="+", default=["score", "atp", "atp-local"],
                    help="add ig for integrated gradients (K gradient passes per seed)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=192)
    ap.add_argument("--root", type=Path, default=Path("runs/faithful-maps"))
    ap.add_argument("--out", type=Path, default=REPO / "analyses" / "results" / "faithful_maps")
    ap.add_argument("--rev", default="HEAD", help="the commit measured (a worktree of it is used)")
    ap.add_argument("--objective", default="nll", choices=("nll", "metric"),
                    help="what the estimators' gradients are of: the answer's NLL, or minus the task's metric")
    ap.add_argument("--measured", type=Path, default=None,
                    help="an earlier faithfulness JSON of the same task, bits and items whose per-head measurements "
                         "every seed reuses (the first seed too): new estimators against an old measurement")
    ap.add_argument("--aggregate-only", action="store_true")
    a = ap.parse_args()
    a.root.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    src, rev = worktree(a.rev)
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.setdefault("CIRCUITQ_DATA_DIR", str(REPO.parent / "shared" / "data"))
    if not a.aggregate_only:
        for task in a.tasks:
            for bits in a.bits:
                first = a.measured.resolve() if a.measured else None
                for seed in a.seeds:
                    f = measure(task, bits, seed, a, env, a.root.resolve(), reuse=first)
                    first = first or f
                    shutil.copy(f, a.out / f.name)
                    rows = [row_of(p) for p in sorted(a.out.glob("faith-*.json"))]
                    with (a.out / "rows.csv").open("w", newline="") as fh:
                        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
                        w.writeheader()
                        w.writerows(rows)
                    (a.out / "SUMMARY.md").write_text(summary(rows, a, rev))
    rows = [row_of(p) for p in sorted(a.out.glob("faith-*.json"))]
    (a.out / "SUMMARY.md").write_text(summary(rows, a, rev))
    print((a.out / "SUMMARY.md").read_text())


if __name__ == "__main__":
    main()
