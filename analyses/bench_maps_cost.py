"""What an attribution map and an IG step cost next to the run's gradient pass, on the default model.

    .venv/bin/python analyses/bench_maps_cost.py --task gsm8k --samples 128 --repeats 2 \
        --out analyses/results/bench_maps_cost.json

Side by side in one process, on the run's default calibration items (128 GSM8k items, 512 tokens
at most, ``--batch-tokens`` default): the per-sample Σ|G_s| pass every run makes (TaCQ's
statistic) and the Σ G pass that the attribution maps add (one matmul per module and batch; an
integrated-gradients node costs the same pass). Median wall time over ``--repeats``, tokens per
second, the ratio, and the machine. Run it with no other job on the machine. The default model's
weights are dequantized from a 4-bit GGUF file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import REPO, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "analyses" / "results" / "bench_maps_cost.json")
    a = ap.parse_args()

    from circuitq.config import CalibConfig
    from circuitq.data.tasks import Task
    from circuitq.model.loading import load_model
    from circuitq.pipeline import stages

    lm = load_model("smollm2-135m-instruct")
    calib = CalibConfig(samples=a.samples)
    items = Task(a.task, tokenizer=lm.tokenizer).calib_for(calib)
    runs: dict[str, list] = {"sum_abs (per-sample, every run)": [], "sum (the maps' pass, one IG node)": []}
    for _ in range(a.repeats):
        for label, stat in (("sum_abs (per-sample, every run)", "sum_abs"), ("sum (the maps' pass, one IG node)", "sum")):
            t0 = time.perf_counter()
            res = stages.collect_gradients(lm.model, lm.tokenizer, items, calib, (stat,), progress=False,
                                           model_path=lm.source)
            runs[label].append({"seconds": time.perf_counter() - t0, "tokens_per_s": res["tokens_per_s"]})
            del res
    med = {k: {"median_seconds": statistics.median(r["seconds"] for r in v),
               "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in v), "runs": v}
           for k, v in runs.items()}
    keys = list(med)
    doc = {"what": __doc__.split("\n\n")[0], "task": a.task, "samples": a.samples, "repeats": a.repeats,
           "model": "smollm2-135m-instruct (weights dequantized from a 4-bit GGUF file)", "machine": machine(),
           "passes": med, "ratio_sum_over_sum_abs": med[keys[1]]["median_seconds"] / med[keys[0]]["median_seconds"]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in med.items()}, indent=2))
    print(f"ratio {doc['ratio_sum_over_sum_abs']:.2f}")


if __name__ == "__main__":
    main()
