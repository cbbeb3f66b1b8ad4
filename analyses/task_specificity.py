"""Which calibration choices make TaCQ circuits task-specific, over calibration seeds.

    .venv/bin/python analyses/task_specificity.py --root runs/specificity --variants samples-32 samples-128 loss-all loss-text fewshot --seeds 0 1 2

For each seed, then each variant, runs ``circuitq run --bits 3 --baselines grad --seed S`` plus
the variant's flags in ``ROOT/VARIANT`` (finished steps are reused, so rerunning resumes), keeps
its ``results.csv`` and ``run.json`` as ``analyses/results/task_specificity/VARIANT-results-seedS.csv``
and ``VARIANT-run-seedS.json`` (committed: the tables are rebuilt from them, so seeds run in
different sessions or on different machines merge), and writes
``analyses/results/task_specificity.csv`` and ``analyses/TASK_SPECIFICITY.md``:

* per variant × task × method: KL (answer positions; MMLU also every token) mean ± sd over seeds,
  and the share of GPTQ's KL gap closed, ``1 - KL_method / KL_gptq``, mean ± sd;
* the transfer matrix's diagonal dominance: per seed from the run report (item bootstrap), and
  across seeds, two ways: unpaired (own circuit's mean KL below every other circuit's by more than
  the sum of their seed standard deviations) and paired (the per-seed margin, other − own, has a
  mean above its own standard deviation and is positive on every seed);
* the issue-11 targets per variant (gap closed ≥ 0.70 on GSM8k, ≥ 0.60 on MMLU) and the wall
  time of each run, to choose ``circuitq run``'s defaults within its budget.

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
VARIANTS = {   # each pins its calibration size, so a later change of `circuitq run`'s defaults keeps them
    "samples-32": ["--calib-samples", "32"],   # 0.4's `circuitq run` default (before: "default")
    "loss-all": ["--calib-samples", "32", "--loss", "all"],
    # every token but the chat template's (its system prompt carries 43% of MMLU's all-token gradient mass)
    "loss-text": ["--calib-samples", "32", "--loss", "text"],
    # few-shot prompts run to ~900 tokens (GSM8k 8-shot CoT; MMLU 5-shot median 604): 1024 keeps the shots of
    # nearly every item (512 would cut every GSM8k prompt's first exemplars; the official code uses 2048)
    "fewshot": ["--calib-samples", "32", "--calib-seq-len", "1024", "--shots", "-1", "--template", "raw"],
    "fewshot-loss-all": ["--calib-samples", "32", "--calib-seq-len", "1024", "--shots", "-1", "--template", "raw",
                         "--loss", "all"],
    "samples-128": ["--calib-samples", "128"],
    "samples-128-loss-all": ["--calib-samples", "128", "--loss", "all"],
}
KEEP = HERE / "results" / "task_specificity"
TARGETS = {"gsm8k": 0.70, "mmlu": 0.60}
METHODS = ("gptq", "tacq", "grad", "tacq[union]")


def run_one(root: Path, variant: str, seed: int, extra: list[str]) -> None:
    out = root / variant
    if (KEEP / f"{variant}-results-seed{seed}.csv").exists():
        print(f"{variant} seed {seed}: already done", flush=True)
        return
    cmd = [sys.executable, "-m", "circuitq", "run", "--bits", "3", "--baselines", "grad", "--seed", str(seed),
           "--out", str(out), *VARIANTS[variant], *extra]
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    KEEP.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "results.csv", KEEP / f"{variant}-results-seed{seed}.csv")
    shutil.copyfile(out / "run.json", KEEP / f"{variant}-run-seed{seed}.json")
    print(f"{variant} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)


def _f(x):
    return float(x) if x not in ("", None) else None


def _ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(variant: str) -> tuple[list[dict], list[dict]]:
    """Rows per task × method and per evaluated task × circuit (dominance) of one variant."""
    files = sorted(KEEP.glob(f"{variant}-results-seed*.csv"))
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
                        "kl_all_mean": am, "kl_all_std": as_, "gap_closed_mean": gm, "gap_closed_std": gs,
                        "minutes_per_run": _minutes(variant)})
        own = next((r for r in out if r["task"] == task and r["method"] == "tacq"), None)
        for o in others:
            oth = next((r for r in out if r["task"] == task and r["method"] == f"tacq[{o}]"), None)
            if own and oth:
                margin = oth["kl_mean"] - own["kl_mean"]
                spread = own["kl_std"] + oth["kl_std"]
                paired = []
                for rows in per_seed.values():
                    get = {r["method"]: r for r in rows if r["task"] == task}
                    if "tacq" in get and f"tacq[{o}]" in get:
                        paired.append(_f(get[f"tacq[{o}]"]["kl"]) - _f(get["tacq"]["kl"]))
                pm, ps = _ms(paired)
                per_seed_dom = []
                for s in sorted(per_seed):
                    rj = KEEP / f"{variant}-run-seed{s}.json"
                    if rj.exists():
                        d = (json.loads(rj.read_text()).get("diagonal_dominance") or {}).get("3") or {}
                        p = next((p for p in d.get("pairs", []) if p["task"] == task and p["other"] == o), None)
                        if p:
                            per_seed_dom.append(p["beyond_noise"])
                dom.append({"variant": variant, "evaluated_on": task, "other_circuit": o, "own_kl": own["kl_mean"],
                            "other_kl": oth["kl_mean"], "margin": margin, "seed_spread": spread,
                            "beyond_seed_spread": margin > spread, "paired_margin_mean": pm,
                            "paired_margin_std": ps, "paired_seeds": len(paired),
                            "beyond_paired_spread": (len(paired) > 1 and pm > ps and min(paired) > 0),
                            "seeds_beyond_item_noise": f"{sum(per_seed_dom)}/{len(per_seed_dom)}"})
    return out, dom


def _minutes(variant: str) -> str | None:
    """Wall minutes of each ``circuitq run`` of this variant (from its run.json), by seed."""
    by = {f.stem.split("seed")[-1]: json.loads(f.read_text()).get("seconds")
          for f in sorted(KEEP.glob(f"{variant}-run-seed*.json"))}
    return ", ".join(f"seed {k}: {v / 60:.1f}" for k, v in by.items() if v) or None


def summary(rows, dom, cmd, seconds) -> str:
    L = ["# Task specificity of TaCQ circuits: calibration choices over seeds", "",
         f"Command: `{cmd}`  ",
         f"Machine: {platform.platform()}, {platform.processor() or 'cpu'}; this invocation {seconds / 60:.1f} min.", "",
         "Default model SmolLM2-135M-Instruct, **weights dequantized from a 4-bit (Q4_1) GGUF file**; 3-bit, group 64, "
         "0.35% of weights in 16-bit, shared Hessians, 32 calibration items per task (one per sequence) unless the "
         "variant says otherwise, the same 48 "
         "evaluation items of each task's evaluation half for every seed (a variant's prompts, e.g. few-shot, apply "
         "to its evaluation too, so KLs compare within a variant). KL = KL(original ‖ quantized) per scored "
         "token (answer positions; MMLU `kl_all`: every token). Gap closed = 1 − KL/KL_gptq. Mean ± sd over seeds. "
         "Run minutes are wall times of whole `circuitq run` invocations; seeds run while other jobs shared the "
         "2-core CPU inflate them.", ""]
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
            pair = ("" if one else f"; paired over {d['paired_seeds']} seeds {d['paired_margin_mean']:+.4f} ± "
                    f"{d['paired_margin_std']:.4f} ({'beyond' if d['beyond_paired_spread'] else 'not beyond'} its sd)")
            L.append(f"- On {d['evaluated_on']}: own circuit KL {d['own_kl']:.4f} vs {d['other_circuit']}'s "
                     f"{d['other_kl']:.4f} (margin {d['margin']:+.4f}, seed spread {d['seed_spread']:.4f}): "
                     f"{'seed spread unknown' if one else ('beyond' if d['beyond_seed_spread'] else 'not beyond') + ' the seed spread'}"
                     f"{pair}; beyond the item bootstrap in {d['seeds_beyond_item_noise']} seeds.")
        if ds:
            ok = all(d["beyond_seed_spread"] for d in ds) and not one
            okp = all(d["beyond_paired_spread"] for d in ds) and not one
            L += ["", f"**Diagonal-dominant beyond the seed spread: {'yes' if ok else 'no'}"
                  f"{' (one seed: not decidable)' if one else ''}; beyond the paired spread: {'yes' if okp else 'no'}.**", ""]
        for r in (r for r in rows if r["variant"] == v and r["method"] in ("tacq", "grad") and r["task"] in TARGETS):
            if r["gap_closed_mean"] is not None:
                t = TARGETS[r["task"]]
                L.append(f"- Target, {r['task']} {r['method']}: gap closed {r['gap_closed_mean']:.3f} ± "
                         f"{r['gap_closed_std']:.3f} vs ≥ {t:.2f}: {'met' if r['gap_closed_mean'] >= t else 'not met'}"
                         f"{' by the mean' if r['gap_closed_mean'] >= t and r['gap_closed_mean'] - r['gap_closed_std'] < t else ''}"
                         f"{' (one seed)' if one else ''}.")
        mins = next((r["minutes_per_run"] for r in rows if r["variant"] == v), None)
        if mins:
            L.append(f"- Wall minutes of one `circuitq run --bits 3 --baselines grad` of this variant: {mins} "
                     "(seeds run beside other jobs were slower).")
        L.append("")
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
    p.add_argument("--variants", nargs="+", default=["samples-32", "loss-all"], choices=list(VARIANTS))
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
        r, d = aggregate(v)
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
