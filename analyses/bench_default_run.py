"""The default ``run``: wall time and peak memory, and whether the results are those of before.

    .venv/bin/python analyses/bench_default_run.py full     --rev HEAD    --out analyses/results/default_run_0.6
    .venv/bin/python analyses/bench_default_run.py reduced  --rev HEAD --model qwen2.5-coder-0.5b-instruct \
        --out analyses/results/qwen_reduced_run
    .venv/bin/python analyses/bench_default_run.py identity --before 6f07778 --after HEAD \
        --out analyses/results/default_run_identity

``reduced``: the reduced run below at the default batch tokens, of commit REV, on ``--model``
(the scale issue's second model: ``--model qwen2.5-coder-0.5b-instruct``), with its peaks.

``full``: the default ``circuitq run`` (2 tasks x 2 bit widths x 8 masks, 128 calibration items,
48 evaluation items) of commit REV, in a child process, with its peak resident set size (the
kernel's ``ru_maxrss``, and the run's own per-stage peaks from ``run.json``) and its wall time.

``identity``: one reduced run (``--tasks mmlu gsm8k --bits 3 --calib-samples 32 --eval-samples 16
--baselines grad --batch-tokens 512``) with the code of BEFORE and of AFTER, one after the other,
then every mask file and every result row compared: masks equal bit for bit, KL / top-1 / NLL
differences reported (the scale issue asks for KL within 1e-6). 512 batch tokens on both sides,
because 0.6 changed the default to 256 (a different summation order of the same gradients).

Each variant runs from its own git worktree (``PYTHONPATH``), same virtual environment, same model
and data, from a neutral folder, so the working tree can change while it runs. Run it alone: two
jobs on two cores slow each other down several-fold. The default model's weights are dequantized
from a 4-bit GGUF file.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, measure_child, worktree  # noqa: E402
REDUCED = ["--tasks", "mmlu", "gsm8k", "--bits", "3", "--calib-samples", "32", "--eval-samples", "16",
           "--baselines", "grad", "--batch-tokens", "512"]


def run_child(src: Path, args: list[str], out: Path, log: Path) -> dict:
    """``python -m circuitq run ARGS --out OUT`` with SRC's code; peak RSS (bytes), wall seconds, rc."""
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1",
           "CIRCUITQ_DATA_DIR": os.environ.get("CIRCUITQ_DATA_DIR", str(REPO.parent / "shared" / "data"))}
    row = measure_child(["-m", "circuitq", "run", *args, "--out", str(out)], env, tempfile.mkdtemp(prefix="bench-cwd-"),
                        log)
    rj = out / "run.json"
    if rj.exists():
        mem = json.loads(rj.read_text()).get("memory", {})
        row["run_json_memory"] = mem
        row["peak_rss_bytes"] = max(row["peak_rss_bytes"], mem.get("process_peak_bytes") or 0)
    return row


def results(run: Path) -> dict[tuple, dict]:
    with (run / "results.csv").open() as fh:
        return {(r["bits"], r["task"], r["method"], r["mask_method"], r["circuit_from"]): r for r in csv.DictReader(fh)}


def mask_files(run: Path) -> dict[str, Path]:
    """Every mask file of the run's steps, keyed by its step's kind and its path below the step."""
    out = {}
    for f in sorted((run / "steps").rglob("*.safetensors")):
        step = f.relative_to(run / "steps").parts[0]
        if step.startswith("mask"):
            kind = step.rsplit("-", 1)[0]   # drop the step's hash: it names the code's config fields too
            out[f"{kind}/{f.name}"] = f
    return out


def compare(before: Path, after: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from circuitq.saliency.masks import load_masks   # decodes either encoding (bool or indices)
    mb, ma = mask_files(before), mask_files(after)
    masks = {"before_only": sorted(set(mb) - set(ma)), "after_only": sorted(set(ma) - set(mb)), "differ": []}
    for k in sorted(set(mb) & set(ma)):
        tb, ta = load_masks(mb[k]).masks, load_masks(ma[k]).masks
        if tb.keys() != ta.keys() or any(not tb[n].equal(ta[n]) for n in tb):
            masks["differ"].append(k)
    masks["compared"] = len(set(mb) & set(ma))
    rb, ra = results(before), results(after)
    rows, worst = [], {}
    for key in sorted(set(rb) & set(ra)):
        row = {"key": "/".join(key)}
        for metric in ("kl", "top1_agreement", "nll_per_token", "kl_all", "top1_all", "nll_all"):
            if rb[key].get(metric) not in (None, "") and ra[key].get(metric) not in (None, ""):
                d = abs(float(ra[key][metric]) - float(rb[key][metric]))
                row[metric] = {"before": float(rb[key][metric]), "after": float(ra[key][metric]), "abs_diff": d}
                worst[metric] = max(worst.get(metric, 0.0), d)
        rows.append(row)
    return {"masks": masks, "rows_compared": len(rows), "rows_missing": sorted("/".join(k) for k in set(rb) ^ set(ra)),
            "max_abs_diff": worst, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("full", "identity", "reduced"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", required=True, help="a folder for the runs, logs and summary.json")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--before", default="6f07778")
    ap.add_argument("--after", default="HEAD")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    doc = {"what": a.what, "machine": machine(), "model": a.model,
           "model_note": "weights dequantized from a 4-bit GGUF file"}
    model = ["--model", a.model]
    if a.what in ("full", "reduced"):
        src, sha = worktree(a.rev)
        args = model + (REDUCED[:-2] if a.what == "reduced" else [])   # reduced: the default batch tokens
        print(f"{a.what} run of {sha[:10]} on {a.model} ...", flush=True)
        doc.update(rev=sha, command="circuitq run " + " ".join(args) + " --out RUN",
                   **run_child(src, args, out / "run", out / "run.log"))
    else:
        doc["command"] = "circuitq run " + " ".join(REDUCED) + " --out RUN"
        for name, rev in (("before", a.before), ("after", a.after)):
            src, sha = worktree(rev)
            print(f"{name}: reduced run of {sha[:10]} ...", flush=True)
            doc[name] = {"rev": sha, **run_child(src, model + REDUCED, out / f"run-{name}", out / f"{name}.log")}
            print(f"  {doc[name]['seconds']:.0f} s, peak {doc[name]['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"rc {doc[name]['rc']}", flush=True)
        if doc["before"]["rc"] == 0 and doc["after"]["rc"] == 0:
            doc["comparison"] = compare(out / "run-before", out / "run-after")
            doc["time_ratio_after_over_before"] = doc["after"]["seconds"] / doc["before"]["seconds"]
            doc["peak_ratio_after_over_before"] = doc["after"]["peak_rss_bytes"] / doc["before"]["peak_rss_bytes"]
    (out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    brief = {k: v for k, v in doc.items() if k not in ("before", "after", "comparison", "run_json_memory")}
    print(json.dumps(brief, indent=2))
    if "comparison" in doc:
        c = doc["comparison"]
        print(json.dumps({"masks": {k: v for k, v in c["masks"].items()}, "max_abs_diff": c["max_abs_diff"],
                          "rows_compared": c["rows_compared"]}, indent=2))


if __name__ == "__main__":
    main()
