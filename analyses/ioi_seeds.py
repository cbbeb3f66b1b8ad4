"""The IOI circuit over calibration seeds: faithfulness and quantized accuracy (issue 12's targets).

    .venv/bin/python analyses/ioi_seeds.py --root runs/ioi-seeds --seeds 0 1 2

Per seed S (everything through the CLI, so the numbers are what a user gets):

1. ``circuitq run --tasks ioi --bits 3 --baselines grad --no-transfer --faithfulness heads --seed S
   --eval-samples 200``: accuracy and KL of GPTQ, TaCQ and grad at 3 bits (about 3.3-3.4 average
   bits), and the faithfulness of the 3-bit circuit per query head (3-bit round-to-nearest
   ablation: Spearman of the summed TaCQ score and of the first-order ΣG·ΔW with the measured
   loss change over 10 top + 10 random heads; only/all-but the circuit vs a random set).
2. ``circuitq faithfulness --scores <that circuit> --units heads --bits 2 --top 2 --random 1 --seed S``:
   the same circuit, quantized alone at 2 bits (round-to-nearest, entry by entry), vs a random set of
   its size (3 units only: the 2-bit Spearman over them is not reported).

Writes ``ROOT/seedS/`` per seed (the small result files of the 3 seeds are kept in ``analyses/results/ioi_seeds/``), ``analyses/results/ioi_seeds.csv`` and ``analyses/IOI_SEEDS.md``
(mean ± sd over seeds; every sentence computed from the numbers). ``--aggregate-only`` rebuilds
the summary from ``ROOT``. The default model's weights are dequantized from a 4-bit GGUF file.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def one_seed(root: Path, seed: int, eval_samples: int) -> None:
    out = root / f"seed{seed}"
    cq = [sys.executable, "-m", "circuitq"]
    if not (out / "run.json").exists():
        _run(cq + ["run", "--tasks", "ioi", "--bits", "3", "--baselines", "grad", "--no-transfer", "--faithfulness",
                   "heads", "--seed", str(seed), "--eval-samples", str(eval_samples), "--out", str(out)])
    two = out / "faithfulness-2bit.json"
    if not two.exists():
        doc = json.loads((out / "run.json").read_text())
        scores = out / doc["score_dirs"]["ioi@3"]
        # the 2-bit check is about the circuit-vs-random contrasts; 3 units (the minimum) keep it short
        _run(cq + ["faithfulness", "--scores", str(scores), "--units", "heads", "--bits", "2", "--seed", str(seed),
                   "--top", "2", "--random", "1", "--eval-samples", str(eval_samples), "--out", str(two)])


def compare_greater_than(root: Path, seed: int) -> dict | None:
    """Score greater-than with the run's settings and compare its circuit with IOI's (seed ``seed``)."""
    out = root / f"seed{seed}"
    gt = out / "greater-than-scores"
    cq = [sys.executable, "-m", "circuitq"]
    if not (gt / "score.json").exists():
        _run(cq + ["score", "--task", "greater-than", "--samples", "32", "--bits", "3", "--group-size", "64",
                   "--seed", str(seed), "--out", str(gt)])
    rep = out / "compare-ioi-greater-than.html"
    if not rep.with_suffix(".json").exists():
        doc = json.loads((out / "run.json").read_text())
        _run(cq + ["compare", str(out / doc["score_dirs"]["ioi@3"]), str(gt), "--out", str(rep)])
    return json.loads(rep.with_suffix(".json").read_text())


def seed_row(root: Path, seed: int) -> dict | None:
    out = root / f"seed{seed}"
    if not (out / "run.json").exists() or not (out / "faithfulness-2bit.json").exists():
        return None
    rows = list(csv.DictReader((out / "results.csv").open()))
    get = {r["method"]: r for r in rows}
    f3 = json.loads((out / "faithfulness-ioi-heads.json").read_text())
    f2 = json.loads((out / "faithfulness-2bit.json").read_text())
    ref = float(get["reference (16-bit)"]["accuracy"])
    row = {"seed": seed, "reference_accuracy": ref,
           "reference_logit_diff": _f(get["reference (16-bit)"].get("task_metric_value"))}
    for m in ("gptq", "tacq", "grad"):
        r = get[m]
        row.update({f"{m}_accuracy": float(r["accuracy"]), f"{m}_kept": float(r["accuracy"]) / ref if ref else None,
                    f"{m}_kl": float(r["kl"]), f"{m}_bits": float(r["average_bits"])})
    for k, v in f3["spearman"].items():
        row[f"spearman3_{k}"] = v
    for label, rep in (("3bit", f3), ("2bit", f2)):
        c = rep["contrasts"]
        row.update({f"only_circuit_{label}": c["only circuit"]["loss_change"],
                    f"only_random_{label}": c["only random"]["loss_change"],
                    f"all_but_circuit_{label}": c["all but circuit"]["loss_change"],
                    f"all_but_random_{label}": c["all but random"]["loss_change"]})
    for k, v in f2["spearman"].items():
        row[f"spearman2_{k}"] = v
    return row


def _f(x):
    return float(x) if x not in ("", None) else None


def _ms(vals):
    v = [x for x in vals if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summary(rows: list[dict], cmd: str, seconds: float, cmp: dict | None = None) -> str:
    n = len(rows)
    m = lambda k: _ms([r.get(k) for r in rows])  # noqa: E731
    fmt = lambda k, p=3: (lambda a: f"{a[0]:.{p}f} ± {a[1]:.{p}f}" if a[0] is not None else "—")(m(k))  # noqa: E731
    L = ["# The IOI circuit over calibration seeds", "", f"Command: `{cmd}`  ",
         f"Machine: {platform.platform()}, {os.cpu_count()} cores; last invocation {seconds / 60:.1f} min. "
         f"Seeds: {', '.join(str(r['seed']) for r in rows)} ({n}).", "",
         "SmolLM2-135M-Instruct, **weights dequantized from a 4-bit (Q4_1) GGUF file**. IOI items generated by "
         "code; calibration (32 items per seed) and evaluation (200 items, the same for every seed) use disjoint "
         "names. Circuit: TaCQ's top 0.35% at 3 bits, group 64. Mean ± sd over seeds.", "",
         "## Quantized accuracy at 3 bits", "",
         "| method | IOI accuracy | share of unquantized accuracy kept | KL | average bits |",
         "| --- | --- | --- | --- | --- |",
         f"| unquantized | {fmt('reference_accuracy')} | 1 | 0 | 16 |"]
    for meth in ("gptq", "tacq", "grad"):
        L.append(f"| {meth} | {fmt(meth + '_accuracy')} | {fmt(meth + '_kept')} | {fmt(meth + '_kl')} | "
                 f"{fmt(meth + '_bits')} |")
    L += ["", "## Faithfulness per query head (10 top + 10 random heads)", "",
          "| ablation | Spearman(TaCQ score, measured) | Spearman(ΣG·ΔW, measured) |", "| --- | --- | --- |",
          f"| 3-bit round-to-nearest | {fmt('spearman3_score')} | {fmt('spearman3_first-order')} |",
          "",
          "## The circuit vs a random set of its size (IOI loss change, nats per completion token)", "",
          "| ablation | only circuit | only random | all but circuit | all but random |",
          "| --- | --- | --- | --- | --- |"]
    for lab in ("3bit", "2bit"):
        L.append(f"| {lab[0]}-bit round-to-nearest | {fmt('only_circuit_' + lab)} | {fmt('only_random_' + lab)} | "
                 f"{fmt('all_but_circuit_' + lab)} | {fmt('all_but_random_' + lab)} |")
    L += ["", "## Targets (computed)", ""]
    ref = m("reference_accuracy")[0]
    L.append(f"- Unquantized IOI accuracy ≥ 0.9: {ref:.3f} → **{'met' if ref >= 0.9 else 'not met'}**.")
    best = max(("score", "first-order"), key=lambda k: m(f"spearman3_{k}")[0])
    rmin = min(r[f"spearman3_{best}"] for r in rows)
    L.append(f"- Spearman(predicted, measured) per head ≥ 0.7 for the best estimator: the best is **{best}** "
             f"({fmt('spearman3_' + best, 2)}, lowest seed {rmin:.2f}); the TaCQ score itself gives "
             f"{fmt('spearman3_score', 2)} → **{'met' if m(f'spearman3_{best}')[0] >= 0.7 else 'not met'}** (by the mean).")
    ratios = [r["only_circuit_2bit"] / r["only_random_2bit"] if r["only_random_2bit"] > 0 else None for r in rows]
    pos = all(r["only_random_2bit"] <= 0 or r["only_circuit_2bit"] >= 3 * r["only_random_2bit"] for r in rows) and \
        all(r["only_circuit_2bit"] > 0 for r in rows)
    L.append(f"- Quantizing only the circuit at 2 bits hurts IOI ≥ 3× more than a random set of the same size: "
             f"only circuit {fmt('only_circuit_2bit')} vs only random {fmt('only_random_2bit')} nats "
             f"(per-seed ratios: {', '.join('random set did not hurt' if x is None else f'{x:.1f}×' for x in ratios)}) "
             f"→ **{'met on every seed' if pos else 'not met on every seed'}**.")
    kept = m("tacq_kept")[0]
    bits = m("tacq_bits")[0]
    L.append(f"- At about 3.1–3.4 average bits TaCQ keeps ≥ 95% of the unquantized IOI accuracy: {bits:.2f} bits, "
             f"{fmt('tacq_kept')} kept → **{'met' if kept >= 0.95 else 'not met'}** (by the mean); plain GPTQ at "
             f"{m('gptq_bits')[0]:.2f} bits keeps {fmt('gptq_kept')}, grad {fmt('grad_kept')}.")
    if cmp:
        g = cmp["masks"]["global"]
        c = cmp["circuits"]
        L += ["", f"## IOI vs greater-than circuits (seed {rows[0]['seed']}, 3-bit TaCQ, top 0.35%)", "",
              f"IoU {g['iou']:.3f} (intersection / smaller {g['iom']:.3f}; {g['intersection']:,} shared of "
              f"{g['a']:,} and {g['b']:,}); Spearman of per-head scores {c['head_spearman']:.3f}, of per-neuron "
              f"scores {c['neuron_spearman']:.3f}. The explorer's Compare page shows the same pair (pick both "
              "score directories of the seed's run).",]
    return "\n".join(L) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/ioi-seeds")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument("--out-csv", default=str(HERE / "results" / "ioi_seeds.csv"))
    p.add_argument("--out-md", default=str(HERE / "IOI_SEEDS.md"))
    a = p.parse_args()
    root = Path(a.root)
    t0 = time.perf_counter()
    if not a.aggregate_only:
        for s in a.seeds:
            one_seed(root, s, a.eval_samples)
        compare_greater_than(root, a.seeds[0])
    rows = [r for r in (seed_row(root, s) for s in a.seeds) if r]
    if not rows:
        print(f"no finished seeds under {root}", file=sys.stderr)
        return 1
    Path(a.out_csv).parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "seed", k))
    with open(a.out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(rows)
    cmd = "python analyses/ioi_seeds.py " + shlex.join(sys.argv[1:])
    cj = root / f"seed{a.seeds[0]}" / "compare-ioi-greater-than.json"
    cmp = json.loads(cj.read_text()) if cj.exists() else None
    Path(a.out_md).write_text(summary(rows, cmd, time.perf_counter() - t0, cmp))
    print(f"wrote {a.out_csv} and {a.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
