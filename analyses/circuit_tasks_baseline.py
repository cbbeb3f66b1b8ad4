"""The unquantized default model on the canonical circuit tasks (their evaluation items).

    .venv/bin/python analyses/circuit_tasks_baseline.py --items 200

Writes ``analyses/results/circuit_tasks_baseline.json`` and ``analyses/CIRCUIT_TASKS.md``: per
task its metric, accuracy and the chance level, so that only tasks the model does clearly above
chance are used to rank circuits. The default model's weights are dequantized from a 4-bit GGUF
file.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# accuracy of a model that knows nothing: IOI picks one of two names; greater-than: the mass on
# larger tens digits exceeds the mass on smaller ones for a uniform guess when start < 4.5 (about
# half the start years); induction: 1 / (number of words); capitals: about 0 (open vocabulary)
CHANCE = {"ioi": 0.5, "greater-than": 0.5, "induction": 1 / 110, "capitals": 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="split seed of the generators")
    a = p.parse_args()
    from circuitq import DataConfig, EvalConfig, Task, evaluate, load_model
    from circuitq.data.circuit_tasks import CIRCUIT_TASKS

    t0 = time.perf_counter()
    lm = load_model(a.model)
    res = {}
    for kind in CIRCUIT_TASKS:
        task = Task(kind, DataConfig(split_seed=a.seed), lm.tokenizer)
        items = task.eval_items(a.items)
        m = evaluate(lm.model, lm.tokenizer, items, kind, cfg=EvalConfig(samples=a.items), progress=False).metrics
        res[kind] = {"items": m["items"], "metric": m["task_metric"], "value": m[m["task_metric"]],
                     "accuracy": m["accuracy"], "nll_per_token": m["nll_per_token"], "chance": CHANCE[kind]}
        print(kind, res[kind], flush=True)
    suffix = "" if a.model == "smollm2-135m-instruct" else "-" + "".join(c if c.isalnum() else "-" for c in a.model)
    out = HERE / "results" / f"circuit_tasks_baseline{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "model_note": lm.note, "machine": platform.platform(),
                               "seconds": time.perf_counter() - t0, "tasks": res}, indent=2) + "\n")
    lines = [f"# The unquantized {a.model} on the circuit tasks", "",
             f"`python analyses/circuit_tasks_baseline.py --model {a.model} --items {a.items}` on {platform.platform()}. "
             f"{lm.note or a.model} (**its weights come from a 4-bit GGUF file** where the note says so); evaluation "
             "items of each generated task (disjoint from its calibration items).", "",
             "| task | items | metric | value | accuracy | chance | clearly above chance |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, r in res.items():
        above = r["accuracy"] >= r["chance"] + 0.25
        lines.append(f"| {k} | {r['items']} | {r['metric']} | {r['value']:.3f} | {r['accuracy']:.3f} | "
                     f"{r['chance']:.3f} | {'yes' if above else 'no'} |")
    md = HERE / f"CIRCUIT_TASKS{suffix}.md"
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
