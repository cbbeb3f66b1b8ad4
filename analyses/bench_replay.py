"""The faithfulness measurement's layer replay, before (every layer's outputs held) vs after (a
window of ⌈√L⌉ layers, 0.8.6), side by side in one run: the measurement stage's added memory, its
wall time, the process peak, and that every unit's measured change and every curve point are the
same numbers.

    .venv/bin/python analyses/bench_replay.py --before 4640ce1 --scores runs/s20/scores-ioi-3bit-s0 \
        --out analyses/results/bench_replay

Runs ``circuitq faithfulness`` on the default model (IOI, 3 bits, ``--eval-samples`` held-out items,
``--top``/``--random`` heads plus a short curve) ``--reps`` times per side, alternating sides, and
reports medians and the after/before ratios. Writes OUT/bench_replay.json and OUT/bench_replay.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, measure_child, worktree  # noqa: E402

STAGE = "measurement (units, contrasts)"


def one(side: str, src: Path, args, rep: int) -> dict:
    out = args.out / f"{side}-r{rep}.json"
    if out.exists():
        out.unlink()
    argv = ["-m", "circuitq", "faithfulness", "--scores", str(args.scores), "--task", args.task, "--units", "heads",
            "--top", str(args.top), "--random", str(args.random), "--estimators", "atp", "--bits", "3",
            "--calib-samples", str(args.calib_samples), "--eval-samples", str(args.eval_samples), "--curve",
            "--curve-grid", "0", "0.1", "0.5", "1", "--seed", "0", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(src))
    got = measure_child(argv, env, REPO, args.out / f"{side}-r{rep}.log")
    if got["rc"] != 0:
        raise SystemExit(f"{side} failed (rc {got['rc']}): see {got['log']}")
    rep_json = json.loads(out.read_text())
    mem = rep_json.get("memory") or {}
    got.update(stage_added_bytes=mem.get("measured_peak_bytes", {}).get(STAGE, 0) - mem.get("start_bytes", {}).get(STAGE, 0),
               stage_peak_bytes=mem.get("measured_peak_bytes", {}).get(STAGE),
               curves_added_bytes=mem.get("measured_peak_bytes", {}).get("curves", 0) - mem.get("start_bytes", {}).get("curves", 0),
               units=[(u["label"], u["measured_loss"]) for u in rep_json["units"]],
               curve=[p["loss"] for o in rep_json["curves"]["orderings"].values() for m in o.values() for p in m["points"]])
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="commit with the old replay (every layer held)")
    ap.add_argument("--scores", type=Path, required=True)
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--eval-samples", type=int, default=384)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--random", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    old_src, old_sha = worktree(args.before)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for rep in range(args.reps):
        for side, src in (("before", old_src), ("after", REPO)):
            print(f"[bench_replay] {side}, repetition {rep + 1} of {args.reps}", flush=True)
            runs[side].append(one(side, src, args, rep))
    same_units = all(r["units"] == runs["before"][0]["units"] for side in runs for r in runs[side])
    diff = max(abs(a[1] - b[1]) for a, b in zip(runs["before"][0]["units"], runs["after"][0]["units"]))
    curve_diff = max(abs(a - b) for a, b in zip(runs["before"][0]["curve"], runs["after"][0]["curve"]))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in
                  ("seconds", "peak_rss_bytes", "stage_added_bytes", "stage_peak_bytes", "curves_added_bytes")}
           for side, rs in runs.items()}
    ratio = {k: med["after"][k] / med["before"][k] if med["before"][k] else None for k in med["after"]}
    res = {"before": old_sha, "after": "working tree", "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
           "median": med, "after_over_before": ratio, "identical_units": same_units, "max_unit_difference": diff,
           "max_curve_difference": curve_diff,
           "runs": {s: [{k: v for k, v in r.items() if k not in ("units", "curve")} for r in rs] for s, rs in runs.items()}}
    (args.out / "bench_replay.json").write_text(json.dumps(res, indent=1))
    gb = lambda b: f"{b / 1e9:.3f} GB"
    rows = [("measurement stage, added", "stage_added_bytes", gb), ("measurement stage, peak", "stage_peak_bytes", gb),
            ("curves stage, added", "curves_added_bytes", gb), ("process peak RSS", "peak_rss_bytes", gb),
            ("wall time (whole command)", "seconds", lambda s: f"{s:.1f} s")]
    lines = [f"# Layer replay: every layer held (`{old_sha[:7]}`) vs a window of ⌈√L⌉ layers (0.8.6)", "",
             f"`circuitq faithfulness` on the default model (**weights dequantized from a 4-bit GGUF file**), task "
             f"{args.task}, 3 bits, {args.eval_samples} held-out items, {args.top} top + {args.random} random heads, "
             f"curves at 4 points; medians of {args.reps} runs per side, alternating.", "",
             "| | before | after | after / before |", "| --- | --- | --- | --- |"]
    for label, k, fmt in rows:
        r = ratio[k]
        lines.append(f"| {label} | {fmt(med['before'][k])} | {fmt(med['after'][k])} | {'' if r is None else f'{r:.2f}'} |")
    lines += ["", f"Every unit's measured loss change the same on both sides: largest difference {diff:.2e} nats; "
              f"curve points: {curve_diff:.2e}.", "", f"Machine: {res['machine']}"]
    (args.out / "bench_replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
