"""Which calibration choices make TaCQ circuits task-specific, over calibration seeds.

    .venv/bin/python analyses/task_specificity.py --root runs/specificity --variants default loss-all --seeds 0 1 2

For each seed, then each variant, runs ``circuitq run --bits 3 --baselines grad --seed S`` plus
the variant's flags in ``ROOT/VARIANT`` (finished steps are reused, so rerunning resumes), keeps
``results-seed{S}.csv`` and ``run-seed{S}.json``, and writes
``analyses/results/task_specificity.csv`` and ``analyses/TASK_SPECIFICITY.md``:

* per variant × task × method: KL (answer positions; MMLU also every token) mean ± sd over seeds,
  and the share of GPTQ's KL gap closed, ``1 - KL_method / KL_gptq``, mean ± sd;
* the transfer matrix's diagonal dominance: per seed from the run report (item bootstrap), and
  across seeds (own circuit's mean KL below every other circuit's by more than the sum of their
  seed standard deviations).

``--aggregate-only`` rebuilds the tables from the files already in ``ROOT``. Every sentence in
the summary is computed from the numbers.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "default": [],
    "loss-all": ["--loss", "all"],
    "fewshot": ["--shots", "-1", "--template", "raw"],
    "fewshot-loss-all": ["--shots", "-1", "--template", "raw", "--loss", "all"],
}
METHODS = ("gptq", "tacq", "grad", "tacq[union]")


def run_one(root: Path, variant: str, seed: int, extra: list[str]) -> None:
    out = root / variant
    if (out / f"results-seed{seed}.csv").exists():
        print(f"{variant} seed {seed}: already done", flush=True)
        return
    cmd = [sys.executable, "-m", "circuitq", "run", "--bits", "3", "--baselines", "grad", "--seed", str(seed),
           "--out", str(out), *VARIANTS[variant], *extra]
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    shutil.copyfile(out / "results.csv", out / f"results-seed{seed}.csv")
    shutil.copyfile(out / "run.json", out / f"run-seed{seed}.json")
    print(f"{variant} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)


def _f(x):
    return float(x) if x not in ("", None) else None


def _ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(root: Path, variant: str) -> tuple[list[dict], list[dict]]:
    """Rows per task × method and per evaluated task × circuit (dominance) of one variant."""
    files = sorted((root / variant).glob("results-seed*.csv"))
    per_seed = {f.stem.split("seed")[-1]: list(csv.DictReader(f.open())) for f in files}
    tasks = sorted({r["task"] for rows in per_seed.values() for r in rows})
    out, dom = [], []
    for task in tasks:
        others = [t for t in tasks if t != task]
        for m in (*METHODS, *(f"tacq[{o}]" for o in others)):
            kl, kla, gap = [], [], []
            for rows in per_seed.values():
                get = {r["method"]: r for r in rows if r["task"] == task}
                if m not in get:
                    continue
                kl.append(_f(get[m]["kl"]))
                kla.append(_f(get[m].get("kl_all")))
                g = _f(get["gptq"]["kl"]) if "gptq" in get else None
                gap.append(1 - kl[-1] / g if g and kl[-1] is not None else None)
            if not kl:
                continue
            (km, ks), (am, as_), (gm, gs) = _ms(kl), _ms(kla), _ms(gap)
            out.append({"variant": variant, "task": task, "method": m, "seeds": len(kl), "kl_mean": km, "kl_std": ks,
                        "kl_all_mean": am, "kl_all_std": as_, "gap_closed_mean": gm, "gap_closed_std": gs})
        own = next((r for r in out if r["task"] == task and r["method"] == "tacq"), None)
        for o in others:
            oth = next((r for r in out if r["task"] == task and r["method"] == f"tacq[{o}]"), None)
            if own and oth:
                margin = oth["kl_mean"] - own["kl_mean"]
                spread = own["kl_std"] + oth["kl_std"]
                per_seed_dom = []
                for s in sorted(per_seed):
                    rj = root / variant / f"run-seed{s}.json"
                    if rj.exists():
                        d = (json.loads(rj.read_text()).get("diagonal_dominance") or {}).get("3") or {}
                        p = next((p for p in d.get("pairs", []) if p["task"] == task and p["other"] == o), None)
                        if p:
                            per_seed_dom.append(p["beyond_noise"])
                dom.append({"variant": variant, "evaluated_on": task, "other_circuit": o, "own_kl": own["kl_mean"],
                            "other_kl": oth["kl_mean"], "margin": margin, "seed_spread": spread,
                            "beyond_seed_spread": margin > spread,
                            "seeds_beyond_item_noise": f"{sum(per_seed_dom)}/{len(per_seed_dom)}"})
    return out, dom


def summary(rows, dom, cmd, seconds) -> str:
    L = ["# Task specificity of TaCQ circuits: calibration choices over seeds", "",
         f"Command: `{cmd}`  ",
         f"Machine: {platform.platform()}, {platform.processor() or 'cpu'}; this invocation {seconds / 60:.1f} min.", "",
         "Default model SmolLM2-135M-Instruct, **weights dequantized from a 4-bit (Q4_1) GGUF file**; 3-bit, group 64, "
         "0.35% of weights in 16-bit, shared Hessians, 32 calibration items per task (one per sequence), the same 48 "
         "evaluation items of each task's evaluation half for every seed. KL = KL(original ‖ quantized) per scored "
         "token (answer positions; MMLU `kl_all`: every token). Gap closed = 1 − KL/KL_gptq. Mean ± sd over seeds.", ""]
    for v in dict.fromkeys(r["variant"] for r in rows):
        L += [f"## {v}: `circuitq run {' '.join(VARIANTS[v])}`", "",
              "| task | method | seeds | KL | KL every token | gap closed |", "| --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in rows if r["variant"] == v):
            fa = f"{r['kl_all_mean']:.4f} ± {r['kl_all_std']:.4f}" if r["kl_all_mean"] is not None else "—"
            fg = f"{r['gap_closed_mean']:.3f} ± {r['gap_closed_std']:.3f}" if r["gap_closed_mean"] is not None else "—"
            L.append(f"| {r['task']} | {r['method']} | {r['seeds']} | {r['kl_mean']:.4f} ± {r['kl_std']:.4f} | {fa} | {fg} |")
        L.append("")
        ds = [d for d in dom if d["variant"] == v]
        one = all(r["seeds"] < 2 for r in rows if r["variant"] == v)
        if one:
            L += ["*One seed only: there is no seed spread, so nothing below can be called beyond it; the "
                  "item-bootstrap verdict of the run report is the only noise estimate.*", ""]
        for d in ds:
            L.append(f"- On {d['evaluated_on']}: own circuit KL {d['own_kl']:.4f} vs {d['other_circuit']}'s "
                     f"{d['other_kl']:.4f} (margin {d['margin']:+.4f}, seed spread {d['seed_spread']:.4f}): "
                     f"{'seed spread unknown' if one else ('beyond' if d['beyond_seed_spread'] else 'not beyond') + ' the seed spread'}; beyond the item "
                     f"bootstrap in {d['seeds_beyond_item_noise']} seeds.")
        if ds:
            ok = all(d["beyond_seed_spread"] for d in ds) and not one
            L += ["", f"**Diagonal-dominant beyond the seed spread: {'yes' if ok else 'no'}"
                  f"{' (one seed: not decidable)' if one else ''}.**", ""]
        by = {(r["task"], r["method"]): r for r in rows if r["variant"] == v}
        for t in sorted({r["task"] for r in rows if r["variant"] == v}):
            a, g = by.get((t, "tacq")), by.get((t, "grad"))
            if a and g:
                d, s = g["kl_mean"] - a["kl_mean"], a["kl_std"] + g["kl_std"]
                L.append(f"- {t}: tacq KL {a['kl_mean']:.4f} vs grad {g['kl_mean']:.4f}: "
                         f"{'tacq' if d > 0 else 'grad'} lower by {abs(d):.4f} "
                         + ("(one seed)." if one else f"({'beyond' if abs(d) > s else 'within'} the seed spread {s:.4f})."))
        L.append("")
    return "\n".join(L) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/specificity")
    p.add_argument("--variants", nargs="+", default=["default", "loss-all"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument("--out-csv", default=str(HERE / "results" / "task_specificity.csv"))
    p.add_argument("--out-md", default=str(HERE / "TASK_SPECIFICITY.md"))
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `circuitq run` arguments")
    a = p.parse_args()
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    root, t0 = Path(a.root), time.perf_counter()
    if not a.aggregate_only:
        for s in a.seeds:
            for v in a.variants:
                run_one(root, v, s, extra)
    rows, dom = [], []
    for v in a.variants:
        r, d = aggregate(root, v)
        rows += r
        dom += d
    if not rows:
        p.error(f"no results under {root} for {a.variants}")
    Path(a.out_csv).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cmd = "python analyses/task_specificity.py " + shlex.join(sys.argv[1:])
    Path(a.out_md).write_text(summary(rows, dom, cmd, time.perf_counter() - t0))
    print(f"wrote {a.out_csv} and {a.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
