"""Bits versus quality over calibration seeds.

    .venv/bin/python analyses/reproduce_seeds.py --run-dir runs/main --seeds 0 1 2 [-- EXTRA circuitq run ARGS]

Runs ``circuitq run --seed S`` for each seed in one run directory (steps whose settings do not
depend on the seed, such as the unquantized model's evaluation, are shared; a seed already run
there is reused, not recomputed), keeps each seed's ``results.csv`` as ``results-seed{S}.csv``,
and writes the mean and standard deviation per bits × task × method to
``analyses/results/seeds.csv`` and a short summary to ``analyses/SEEDS.md``. The summary's
sentences are computed from the numbers; nothing in it is typed by hand.
"""
from __future__ import annotations

import argparse
import csv
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("average_bits", "kl", "top1_agreement", "nll_per_token", "accuracy")


def run_seed(run_dir: Path, seed: int, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "circuitq", "run", "--seed", str(seed), "--out", str(run_dir), *extra]
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    dst = run_dir / f"results-seed{seed}.csv"
    shutil.copyfile(run_dir / "results.csv", dst)
    print(f"seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    return dst


def aggregate(files: dict[int, Path]) -> list[dict]:
    """Mean and (sample) standard deviation of each metric over seeds, per bits × task × method."""
    groups: dict[tuple, list[dict]] = {}
    for seed, f in files.items():
        for r in csv.DictReader(f.open()):
            groups.setdefault((int(r["bits"]), r["task"], r["method"]), []).append(r)
    out = []
    for (bits, task, method), rows in sorted(groups.items()):
        rec = {"bits": bits, "task": task, "method": method, "seeds": len(rows)}
        for m in METRICS:
            vals = [float(r[m]) for r in rows if r.get(m) not in ("", None)]
            rec[f"{m}_mean"] = statistics.fmean(vals) if vals else ""
            rec[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else "")
        out.append(rec)
    return out


def _fmt(r: dict, m: str) -> str:
    if r[f"{m}_mean"] == "":
        return "—"
    return f"{r[f'{m}_mean']:.4f} ± {r[f'{m}_std']:.4f}"


def summary(rows: list[dict], cmd: str, seeds: list[int], seconds: float) -> str:
    lines = ["# Bits versus quality over calibration seeds", "",
             f"Command: `{cmd}`  ", f"Seeds: {', '.join(map(str, seeds))}; machine: {platform.platform()}, "
             f"{platform.processor() or 'cpu'}; wall time of this script: {seconds / 60:.1f} min.", "",
             "Default model: SmolLM2-135M-Instruct, **weights dequantized from a 4-bit (Q4_1) GGUF file**; its MMLU "
             "accuracy is at chance, so KL to the original, top-1 agreement and task NLL lead. Mean ± standard "
             "deviation over seeds (calibration sampling; the evaluation items are the same for every seed).", ""]
    for bits in sorted({r["bits"] for r in rows}):
        for task in sorted({r["task"] for r in rows}):
            sel = [r for r in rows if r["bits"] == bits and r["task"] == task and r["method"] != "reference (16-bit)"]
            if not sel:
                continue
            sel.sort(key=lambda r: r["kl_mean"] if r["kl_mean"] != "" else float("inf"))
            lines += [f"## {task}, {bits}-bit", "", "| method | avg bits | KL | top-1 | NLL | accuracy |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['method']} | {r['average_bits_mean']:.3f} | {_fmt(r, 'kl')} | {_fmt(r, 'top1_agreement')} | "
                      f"{_fmt(r, 'nll_per_token')} | {_fmt(r, 'accuracy')} |" for r in sel]
            ref = next((r for r in rows if r["bits"] == bits and r["task"] == task and r["method"] == "reference (16-bit)"), None)
            if ref and ref["nll_per_token_mean"] != "":
                lines.append(f"\nUnquantized: NLL {ref['nll_per_token_mean']:.4f}"
                             + (f", accuracy {ref['accuracy_mean']:.4f}" if ref["accuracy_mean"] != "" else "") + ".")
            lines += ["", _finding(sel, bits, task), ""]
    return "\n".join(lines) + "\n"


def _finding(sel: list[dict], bits: int, task: str) -> str:
    """One computed sentence: where TaCQ ranks by mean KL and whether its lead is beyond noise."""
    by = {r["method"]: r for r in sel}
    if "tacq" not in by or by["tacq"]["kl_mean"] == "":
        return ""
    rank = [r["method"] for r in sel].index("tacq") + 1
    t = by["tacq"]
    others = [r for r in sel if r["method"] not in ("tacq",) and not r["method"].startswith("tacq[") and r["kl_mean"] != ""]
    best = min(others, key=lambda r: r["kl_mean"]) if others else None
    s = f"TaCQ ranks {rank} of {len(sel)} by mean KL at {bits} bits on {task}"
    if best is not None:
        gap = best["kl_mean"] - t["kl_mean"]
        noise = (t["kl_std"] or 0) + (best["kl_std"] or 0)
        verdict = "beyond" if abs(gap) > noise else "within"
        s += (f"; the best non-TaCQ method is {best['method']} (KL {best['kl_mean']:.4f}), a gap of {gap:+.4f} "
              f"({verdict} the sum of the two standard deviations, {noise:.4f})")
    return s + "."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/main")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out-csv", default=str(HERE / "results" / "seeds.csv"))
    p.add_argument("--out-md", default=str(HERE / "SEEDS.md"))
    p.add_argument("--aggregate-only", action="store_true",
                   help="do not run; aggregate the results-seed*.csv already in --run-dir for --seeds")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `circuitq run` arguments")
    a = p.parse_args()
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    run_dir = Path(a.run_dir)
    t0 = time.perf_counter()
    if a.aggregate_only:
        files = {s: run_dir / f"results-seed{s}.csv" for s in a.seeds if (run_dir / f"results-seed{s}.csv").exists()}
        if not files:
            p.error(f"no results-seed*.csv for seeds {a.seeds} in {run_dir}")
        a.seeds = sorted(files)
    else:
        files = {s: run_seed(run_dir, s, extra) for s in a.seeds}
    rows = aggregate(files)
    Path(a.out_csv).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cmd = "python analyses/reproduce_seeds.py " + shlex.join(sys.argv[1:])
    Path(a.out_md).write_text(summary(rows, cmd, a.seeds, time.perf_counter() - t0))
    print(f"wrote {a.out_csv} and {a.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
