"""Selection quality over calibration seeds: at 3 bits and the same budget (0.35% of the linear
weights kept in 16-bit), how close to the original do masks chosen by the attribution estimators
(``atp-abs`` = Σ_s|G_s|·|Q(W) − W|, signed ``atp`` = ΣG·(Q(W) − W)) keep the model, against
``tacq`` and ``grad``, and against no mask (``gptq``)? Issue 23, item 5.

    .venv/bin/python analyses/selection_quality.py --tasks mmlu gsm8k ioi --seeds 0 1 2 \
        --root runs/selection --out analyses/results/selection_quality

Per task T and seed S, through the CLI (what a user gets), from a git worktree of ``--rev``:
``circuitq run --tasks T --bits 3 --seed S --baselines grad atp atp-abs --no-transfer --head-maps off
--out ROOT/T-sS``. The calibration items change with the seed; the 48 held-out evaluation items
do not (``--split-seed`` stays 0), so differences between methods are paired per seed.

Writes ``OUT/results-T-sS.csv`` (each run's own table, with the commit it ran at in ``rev``),
``OUT/SUMMARY.md``: per task and method the mean ± sd over seeds of KL to the original (the
answer position; every token for mmlu/gsm8k), top-1 agreement, task NLL, the share of gptq's KL the
mask removes (``1 − KL/KL_gptq``), and in how many seeds the method's KL is below tacq's and
grad's. ``--import-json FILE=REV``: rows measured earlier (the JSON the 0.7.1 one-seed study wrote,
``analyses/results/selection_atp_seed0/results.json``) stand for their seed instead of a new run.
The default model's weights are dequantized from a 4-bit GGUF file.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

from common import REPO, machine, run_circuitq, worktree

METHODS = ("gptq", "tacq", "grad", "atp-abs", "atp")




def imported(spec: str, out: Path) -> list[str]:
    """Write ``FILE=REV``'s rows as ``OUT/results-T-sS.csv`` files (seed from its ``what``);
    the ``(task, seed)`` pairs they stand for."""
    path, rev = spec.split("=", 1)
    rep = json.loads(Path(path).read_text())
    seed = int(rep["what"].split("seed (")[1].split(")")[0]) if "seed (" in rep["what"] else 0
    done = []
    for task in sorted({r["task"] for r in rep["rows"]}):
        rows = [dict(r, rev=rev) for r in rep["rows"] if r["task"] == task]
        dest = out / f"results-{task}-s{seed}.csv"
        with dest.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
        done.append(f"{task}-s{seed}")
    return done


def measure(task: str, seed: int, a, env: dict, rev: str) -> Path:
    """One run's results table, copied to ``OUT/results-T-sS.csv`` with ``rev`` on every row."""
    dest = a.out / f"results-{task}-s{seed}.csv"
    run_dir = a.root / f"{task}-s{seed}"
    if not (run_dir / "results.csv").exists():
        secs = run_circuitq(["run", "--tasks", task, "--bits", "3", "--seed", str(seed), "--baselines", "grad", "atp", "atp-abs",
                    "--no-transfer", "--head-maps", "off", "--eval-samples", str(a.eval_samples),
                    "--out", str(run_dir)], env, a.root / f"{task}-s{seed}.log")
        (run_dir / "wall_seconds.txt").write_text(f"{secs:.1f}\n")
    with (run_dir / "results.csv").open() as fh:
        rows = [dict(r, rev=rev) for r in csv.DictReader(fh)]
    with dest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dest


def num(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def ms(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def summary(out: Path, rev: str, seconds: float | None) -> str:
    per: dict[tuple[str, int], dict[str, dict]] = {}
    revs: dict[tuple[str, int], str] = {}
    for f in sorted(out.glob("results-*-s*.csv")):
        task, seed = f.stem[len("results-"):].rsplit("-s", 1)
        with f.open() as fh:
            rows = [r for r in csv.DictReader(fh) if str(r.get("bits")) == "3"]
        per[(task, int(seed))] = {r["method"]: r for r in rows}
        revs[(task, int(seed))] = rows[0].get("rev", "?") if rows else "?"
    m = machine()
    lines = ["# Selection quality over calibration seeds: attribution masks vs tacq and grad (3 bits, 0.35%)", "",
             "Default model SmolLM2-135M-Instruct, **weights dequantized from a 4-bit GGUF file** (at chance on MMLU, so "
             "KL to the original, top-1 agreement and NLL lead). 48 held-out items per task (the same for every "
             "seed), 128 calibration items per seed. `gap closed` = 1 − KL/KL(gptq): the share of the unmasked "
             "3-bit model's KL that the mask removes. `wins` = seeds in which the method's KL is below tacq's / grad's.",
             "", f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}. Measured at: "
             + ", ".join(sorted({f"`{v[:7]}` ({t} s{s})" for (t, s), v in revs.items()})) + ".", ""]
    for task in sorted({t for t, _ in per}):
        seeds = sorted(s for t, s in per if t == task)
        lines += [f"## {task} (seeds {', '.join(map(str, seeds))})", "",
                  "| method | KL (answer) | gap closed | top-1 | NLL | KL (every token) | wins vs tacq | wins vs grad |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for meth in METHODS:
            got = [per[(task, s)][meth] for s in seeds if meth in per[(task, s)]]
            if not got:
                continue
            kl = [num(r["kl"]) for r in got]
            closed = [1 - num(per[(task, s)][meth]["kl"]) / num(per[(task, s)]["gptq"]["kl"])
                      for s in seeds if meth in per[(task, s)] and "gptq" in per[(task, s)]]
            wins = []
            for ref in ("tacq", "grad"):
                pairs = [(num(per[(task, s)][meth]["kl"]), num(per[(task, s)][ref]["kl"])) for s in seeds
                         if meth in per[(task, s)] and ref in per[(task, s)]]
                wins.append("—" if meth == ref else f"{sum(x < y for x, y in pairs)}/{len(pairs)}")
            kl_all = [v for v in (num(r.get("kl_all")) for r in got) if v is not None]
            lines.append(f"| `{meth}` | {ms(kl)} | {ms(closed)} | {ms([num(r['top1_agreement']) for r in got])} | "
                         f"{ms([num(r['nll_per_token']) for r in got])} | {ms(kl_all)} | {wins[0]} | {wins[1]} |")
        ref = [num(per[(task, s)]["reference (16-bit)"]["nll_per_token"]) for s in seeds
               if "reference (16-bit)" in per[(task, s)]]
        metric = [(r.get("task_metric"), num(r.get("task_metric_value"))) for s in seeds
                  for r in [per[(task, s)].get("reference (16-bit)", {})] if r.get("task_metric")]
        lines += ["", f"16-bit NLL {ms(ref)}." + (f" 16-bit {metric[0][0]} {metric[0][1]:.3f}." if metric else ""), ""]
        if metric:
            lines += ["| method | " + metric[0][0] + " |", "| --- | --- |"]
            for meth in METHODS:
                vals = [num(per[(task, s)][meth].get("task_metric_value")) for s in seeds if meth in per[(task, s)]]
                if vals and None not in vals:
                    lines.append(f"| `{meth}` | {ms(vals)} |")
            lines.append("")
    lines += ["## Command", "", f"    .venv/bin/python analyses/selection_quality.py --rev {rev[:7]} ..."
              + (f"  # {seconds / 60:.0f} min" if seconds else ""), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["mmlu", "gsm8k", "ioi"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--eval-samples", type=int, default=48)
    ap.add_argument("--root", type=Path, default=Path("runs/selection"))
    ap.add_argument("--out", type=Path, default=REPO / "analyses" / "results" / "selection_quality")
    ap.add_argument("--rev", default="HEAD", help="the commit measured (a worktree of it is used)")
    ap.add_argument("--import-json", action="append", default=[], metavar="FILE=REV",
                    help="earlier rows that stand for their (task, seed) instead of a new run")
    ap.add_argument("--aggregate-only", action="store_true")
    a = ap.parse_args()
    a.root = a.root.resolve()
    a.root.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    done = {d for spec in a.import_json for d in imported(spec, a.out)}
    if a.aggregate_only:
        rev = "HEAD"
    else:
        src, rev = worktree(a.rev)
        env = {**os.environ, "PYTHONPATH": str(src)}
        env.setdefault("CIRCUITQ_DATA_DIR", str(REPO.parent / "shared" / "data"))
        for seed in a.seeds:
            for task in a.tasks:
                if f"{task}-s{seed}" not in done:
                    measure(task, seed, a, env, rev)
                    (a.out / "SUMMARY.md").write_text(summary(a.out, rev, None))
    (a.out / "SUMMARY.md").write_text(summary(a.out, rev, None if a.aggregate_only else time.perf_counter() - t0))
    print((a.out / "SUMMARY.md").read_text())


if __name__ == "__main__":
    main()
