"""`circuitq faithfulness`, an older commit vs the working tree, side by side in one run: every
stage's peak and added memory and wall time (the report's own meter), the process peak, and that
every unit's measured change, every estimator's prediction and every curve point are the same.

    .venv/bin/python analyses/bench_faithfulness.py --before e642eb0 --name gsm8k-local --reps 2 \
        --out analyses/results/bench_faithfulness -- --scores runs/s20/scores-gsm8k-3bit-s0 --task gsm8k \
        --units heads --top 2 --random 2 --estimators atp-local --calib-samples 32 --eval-samples 8

Everything after ``--`` is passed to ``circuitq faithfulness`` (``--out`` is added). Sides alternate
``--reps`` times; medians and after/before ratios go to OUT/NAME.json and OUT/NAME.md.
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


def one(side: str, src: Path, args, rep: int) -> dict:
    out = args.out / f"{args.name}-{side}-r{rep}.json"
    if out.exists():
        out.unlink()
    argv = ["-m", "circuitq", "faithfulness", *args.rest, "--out", str(out)]
    # PYTHONSAFEPATH: `python -m` would otherwise put the current folder (the repository: today's code) ahead of
    # PYTHONPATH, and the "before" side would run the working tree
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONSAFEPATH="1")
    import subprocess

    where = subprocess.run([sys.executable, "-c", "import circuitq; print(circuitq.__file__)"], env=env, cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(Path(src).resolve()):
        raise SystemExit(f"{side}: circuitq imports from {where}, not from {src}")
    got = measure_child(argv, env, REPO, args.out / f"{args.name}-{side}-r{rep}.log")
    got["code"] = str(src)
    if got["rc"] != 0:
        raise SystemExit(f"{side} failed (rc {got['rc']}): see {got['log']}")
    got.update(summary(out))
    return got


def summary(out: Path) -> dict:
    """What one run's faithfulness report says of its memory, time and numbers."""
    got: dict = {}
    r = json.loads(out.read_text())
    mem = r.get("memory") or {}
    peaks, starts = mem.get("measured_peak_bytes", {}), mem.get("start_bytes", {})
    got["stage_peak_bytes"] = peaks
    got["stage_added_bytes"] = {k: peaks[k] - starts.get(k, 0) for k in peaks}
    got["stage_seconds"] = (r.get("timing") or {}).get("seconds", {})
    # the kernel's ru_maxrss restarts with each stage's reset (PeakMeter): the report keeps the process's peak
    got["process_peak_bytes"] = mem.get("process_peak_bytes")
    got["numbers"] = ([u["measured_loss"] for u in r["units"]]
                      + [v for u in r["units"] for _, v in sorted(u["predicted"].items())]
                      + [p["loss"] for o in (r.get("curves") or {}).get("orderings", {}).values()
                         for m in o.values() for p in m["points"]])
    return got


def main() -> None:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the older commit")
    ap.add_argument("--name", required=True, help="file stem of this comparison")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summarize-only", action="store_true", help="rebuild NAME.md/json from an earlier run's files")
    args = ap.parse_args(argv)
    args.rest = rest
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    if args.summarize_only:   # the per-run reports and NAME.json of an earlier run of this script
        prev = json.loads((args.out / f"{args.name}.json").read_text())
        old_sha, rest = prev["before"], prev["command"][2:]
        args.rest, args.reps = rest, len(prev["runs"]["before"])
        for side in runs:
            for rep, r in enumerate(prev["runs"][side]):
                runs[side].append({**r, **summary(args.out / f"{args.name}-{side}-r{rep}.json")})
    else:
        old_src, old_sha = worktree(args.before)
        for rep in range(args.reps):
            for side, src in (("before", old_src), ("after", REPO)):
                print(f"[bench_faithfulness] {args.name}: {side}, repetition {rep + 1} of {args.reps}", flush=True)
                runs[side].append(one(side, src, args, rep))
    a, b = runs["before"][0]["numbers"], runs["after"][0]["numbers"]
    diff = max((abs(x - y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("nan")
    rel = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("nan")
    stages = [k for k in runs["after"][0]["stage_peak_bytes"] if k in runs["before"][0]["stage_peak_bytes"]]
    med = lambda side, f: statistics.median(f(r) for r in runs[side])
    rows = []
    for k in stages:
        rows.append((f"{k}: added", med("before", lambda r: r["stage_added_bytes"][k]), med("after", lambda r: r["stage_added_bytes"][k]), "GB"))
        rows.append((f"{k}: peak", med("before", lambda r: r["stage_peak_bytes"][k]), med("after", lambda r: r["stage_peak_bytes"][k]), "GB"))
        if all(k in r["stage_seconds"] for s in runs for r in runs[s]):
            rows.append((f"{k}: seconds", med("before", lambda r: r["stage_seconds"][k]), med("after", lambda r: r["stage_seconds"][k]), "s"))
    rows.append(("process peak (the report's)", med("before", lambda r: r["process_peak_bytes"]),
                 med("after", lambda r: r["process_peak_bytes"]), "GB"))
    rows.append(("wall time (whole command)", med("before", lambda r: r["seconds"]), med("after", lambda r: r["seconds"]), "s"))
    res = {"before": old_sha, "after": "working tree", "command": ["circuitq", "faithfulness", *rest], "machine": machine(),
           "reps": args.reps, "max_abs_difference": diff, "max_rel_difference": rel,
           "median": [{"what": w, "before": x, "after": y, "unit": u, "ratio": y / x if x else None} for w, x, y, u in rows],
           "runs": {s: [{k: v for k, v in r.items() if k != "numbers"} for r in rs] for s, rs in runs.items()}}
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    fmt = lambda v, u: f"{v / 1e9:.3f} GB" if u == "GB" else f"{v:.1f} s"
    lines = [f"# `circuitq faithfulness`: `{old_sha[:7]}` vs the working tree ({args.name})", "",
             "    circuitq faithfulness " + " ".join(rest), "",
             f"Default model unless the command names another (**weights dequantized from a 4-bit GGUF file**); "
             f"medians of {args.reps} runs per side, alternating. Stage figures are the report's own meter "
             "(added = the stage's peak less the resident memory as it started).", "",
             "| | before | after | after / before |", "| --- | --- | --- | --- |"]
    lines += [f"| {w} | {fmt(x, u)} | {fmt(y, u)} | {'' if not x else f'{y / x:.2f}'} |" for w, x, y, u in rows]
    lines += ["", f"Every measured change, prediction and curve point ({len(b)} numbers): largest difference {diff:.2e} "
              f"(relative {rel:.2e}).", "", f"Machine: {res['machine']}"]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
