"""One ``circuitq run``'s results as a Markdown table: per task and bit width, each method's KL,
top-1 agreement, NLL, task metric, average bits and the share of plain GPTQ's KL it removes.

    .venv/bin/python analyses/run_table.py runs/gemma3/run --title "Gemma 3 270M" > analyses/RUN_GEMMA3_270M.md

Gap closed = (KL_gptq − KL_method) / KL_gptq on the same held-out items (1 = the 16-bit model's
outputs, 0 = no better than GPTQ without 16-bit weights; negative = worse). Reads the run's
``results.json``; writes to stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def gap_rows(rows: list[dict]) -> list[dict]:
    """The rows of one run with ``gap_closed`` against the same task × bits' plain GPTQ row
    (None where KL is missing: the 16-bit reference)."""
    gptq = {(r["task"], r["bits"]): r.get("kl") for r in rows if r["method"] == "gptq"}
    out = []
    for r in rows:
        base, kl = gptq.get((r["task"], r["bits"])), r.get("kl")
        gap = (base - kl) / base if base and kl is not None and r["method"] != "gptq" else None
        out.append({**r, "gap_closed": gap})
    return out


def fmt(v, spec: str) -> str:
    return "–" if v is None or v == "" else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| task | bits | method | circuit from | avg bits | KL | top-1 | NLL | task metric | gap closed |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in gap_rows(rows):
        metric = f"{r.get('task_metric')} {fmt(r.get('task_metric_value'), '.3f')}" if r.get("task_metric") else "–"
        lines.append(f"| {r['task']} | {r['bits']} | {r['method']} | {r.get('circuit_from') or '-'} | "
                     f"{fmt(r.get('average_bits'), '.3f')} | {fmt(r.get('kl'), '.4f')} | "
                     f"{fmt(r.get('top1_agreement'), '.3f')} | {fmt(r.get('nll_per_token'), '.3f')} | {metric} | "
                     f"{fmt(r.get('gap_closed'), '+.2f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    f = a.run / "results.json"
    if not f.is_file():
        sys.exit(f"{a.run} has no results.json: is it a finished circuitq run directory?")
    doc = json.loads(f.read_text())
    print(f"## {a.title or a.run.name}\n")
    if doc.get("model_note"):
        print(f"Model: {doc['model_note']}\n")
    print(table(doc["rows"]))


if __name__ == "__main__":
    main()
