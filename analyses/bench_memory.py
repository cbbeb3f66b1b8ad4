"""Peak host memory and wall time of ``score``, ``quantize`` and ``run``, before and after, side by side.

    .venv/bin/python analyses/bench_memory.py --out analyses/results/bench_memory.json \
        [--before 6f07778] [--model smollm2-135m-instruct] [--stages score quantize run runtime] [--repeats 1]

Each command runs in its own child process from a neutral folder; its peak resident set size is
read from the kernel (``os.wait4``'s ``ru_maxrss``: the high-water mark of that one process, the
same figure ``/usr/bin/time -v`` prints), its wall time from the clock. ``--before REV`` checks out
that commit into a temporary git worktree and runs the same commands with that code on
``PYTHONPATH`` (same virtual environment, same model, same data), so "before" and "after" are
measured in one run on one machine. ``runtime`` is the Python/torch constant: a process that imports
everything the CLI imports and loads the model, doing nothing else.

Sizes are reduced from the defaults (stated in the output, as the scale issue's table did):
``run --tasks mmlu gsm8k --bits 3 --calib-samples 32 --eval-samples 16 --baselines grad``,
``score --task gsm8k --method tacq --bits 3 --samples 32``,
``quantize --bits 3 --calib gsm8k --samples 32``. ``--full-run`` adds the default ``run``.
``evaluate``: the evaluation alone (4 MMLU items compared with the model itself at every token),
whose peak beyond the runtime and the model is the ``[256, V]`` logits blocks ``pipeline.budget`` counts.

The default model's float weights are dequantized from a 4-bit GGUF file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, measure_child, worktree  # noqa: E402

COMMANDS = {
    "runtime": ["-c", "import sys, circuitq.cli.commands, transformer_lens; from circuitq.model.loading import load_model; "
                      "load_model(sys.argv[1])", "{model}"],
    "score": ["-m", "circuitq", "score", "--model", "{model}", "--task", "gsm8k", "--method", "tacq", "--bits", "3",
              "--samples", "32", "--out", "{tmp}/scores"],
    "quantize": ["-m", "circuitq", "quantize", "--model", "{model}", "--bits", "3", "--calib", "gsm8k", "--samples",
                 "32", "--out", "{tmp}/q"],
    "run": ["-m", "circuitq", "run", "--model", "{model}", "--tasks", "mmlu", "gsm8k", "--bits", "3",
            "--calib-samples", "32", "--eval-samples", "16", "--baselines", "grad", "--out", "{tmp}/run"],
    "full-run": ["-m", "circuitq", "run", "--model", "{model}", "--out", "{tmp}/run"],
    # the evaluation's logits blocks: 4 MMLU items (5 shots) compared with the model itself at every
    # token, [256, V] chunks; the difference before/after 0.8.1 is kl_divergence's three extra blocks
    "evaluate": ["-c", "import sys; from circuitq.model.loading import load_model; from circuitq.data.tasks import "
                       "load_examples; from circuitq.evals import evaluate; lm = load_model(sys.argv[1]); "
                       "ex = load_examples('mmlu', 'eval', 4, shots=5, tokenizer=lm.tokenizer); "
                       "evaluate(lm.model, lm.tokenizer, ex, 'mmlu', reference=lm.model, batch_size=1, "
                       "all_tokens=True, progress=False)", "{model}"],
}


def measure(args: list[str], env: dict, cwd: str, log: Path) -> dict:
    """Run ``python ARGS`` in a child; its peak RSS (bytes) and wall seconds."""
    r = measure_child(args, env, cwd, log)
    run_json = Path(cwd) / "run" / "run.json"
    if run_json.exists():   # a run resets the kernel's peak per stage and keeps the process's peak itself
        own = json.loads(run_json.read_text()).get("memory", {}).get("process_peak_bytes")
        r["peak_rss_bytes"] = max(r["peak_rss_bytes"], own or 0)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--before", default=None, help="a git revision to compare with (its code on PYTHONPATH)")
    ap.add_argument("--stages", nargs="+", default=["runtime", "score", "quantize", "run"], choices=list(COMMANDS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", choices=("before", "after"), default=None, help="measure one variant alone")
    a = ap.parse_args()
    variants = {"after": str(REPO)}
    if a.before:
        variants = {"before": str(worktree(a.before)[0]), **variants}
    if a.only:
        variants = {a.only: variants[a.only]}
    rows = []
    logs = Path(tempfile.mkdtemp(prefix="bench-memory-logs-"))
    for stage in a.stages:
        for _ in range(a.repeats):
            for name, src in variants.items():   # alternate, so drift hits both alike
                tmp = tempfile.mkdtemp(prefix="bench-memory-")
                env = {**os.environ, "PYTHONPATH": src, "TQDM_DISABLE": "1",
                       "CIRCUITQ_DATA_DIR": os.environ.get("CIRCUITQ_DATA_DIR", str(REPO.parent / "shared" / "data"))}
                cmd = [c.format(model=a.model, tmp=tmp) for c in COMMANDS[stage]]
                r = measure(cmd, env, tmp, logs / f"{stage}-{name}-{len(rows)}.log")
                shutil.rmtree(tmp, ignore_errors=True)
                rows.append({"stage": stage, "variant": name, **r})
                print(f"{stage:<9} {name:<7} peak {r['peak_rss_bytes'] / 2**30:6.2f} GiB  {r['seconds']:7.1f} s  "
                      f"rc {r['rc']}", flush=True)
    summary = {}
    for stage in a.stages:
        s = {}
        for name in variants:
            rs = [r for r in rows if r["stage"] == stage and r["variant"] == name]
            s[name] = {"peak_rss_gib": statistics.median(r["peak_rss_bytes"] for r in rs) / 2 ** 30,
                       "seconds": statistics.median(r["seconds"] for r in rs), "ok": all(r["rc"] == 0 for r in rs)}
        if "before" in s and "after" in s:
            s["peak_ratio_after_over_before"] = s["after"]["peak_rss_gib"] / s["before"]["peak_rss_gib"]
            s["time_ratio_after_over_before"] = s["after"]["seconds"] / s["before"]["seconds"]
        summary[stage] = s
    doc = {"model": a.model, "model_note": "weights dequantized from a 4-bit GGUF file", "before": a.before,
           "commands": {k: " ".join(COMMANDS[k]) for k in a.stages}, "repeats": a.repeats,
           "machine": machine(),
           "summary": summary, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
