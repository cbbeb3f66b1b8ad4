"""Attention blocks, MLP blocks and whole layers as faithfulness units (0.8.8, issue 23 item 1): one table from
the faithfulness JSONs of `circuitq faithfulness --units sublayers|layers --all-units` over calibration seeds.

    .venv/bin/python analyses/faithful_maps_blocks_table.py --dir analyses/results/faithful_maps_blocks

Per task and unit kind: each estimator's Spearman over every unit against the measured loss change (and the
task's metric where every unit has it), mean ± sd over seeds [lowest]; the measurement's ceiling; for sublayers
also the Spearman inside the attention blocks and inside the MLP blocks alone (does an estimator only separate
the two kinds?), and which blocks matter most. Writes DIR/table.md and DIR/table.json. Reads only.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine  # noqa: E402
from faithful_maps_metric_table import per_file, stats  # noqa: E402

sys.path.insert(0, str(REPO))
from circuitq.circuits.faithfulness import spearman  # noqa: E402

NAME = re.compile(r"(?P<task>.+)-(?P<bits>\d)bit-(?P<units>sublayers|layers)-s(?P<seed>\d+)\.json$")


def within(rep: dict, kind: str) -> dict:
    """Each estimator's Spearman over the units whose label ends with ``.kind`` alone."""
    us = [u for u in rep["units"] if u["label"].endswith(f".{kind}")]
    if len(us) < 3:
        return {}
    return {e: spearman([u["predicted"][e] for u in us], [u["measured_loss"] for u in us]) for e in rep["spearman"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=REPO / "analyses" / "results" / "faithful_maps_blocks")
    args = ap.parse_args()
    groups: dict[tuple, list[Path]] = {}
    for f in sorted(args.dir.glob("*.json")):
        m = NAME.match(f.name)
        if m:
            groups.setdefault((m["task"], int(m["bits"]), m["units"]), []).append(f)
    if not groups:
        raise SystemExit(f"no TASK-BITSbit-(sublayers|layers)-sSEED.json under {args.dir}")
    lines = ["# Attention blocks, MLP blocks and whole layers as units (issue 23 item 1, 0.8.8)", "",
             f"Written by `analyses/faithful_maps_blocks_table.py` ({machine()['platform']}, {machine()['cpus']} CPUs, "
             f"torch {machine()['torch']}). **Weights dequantized from a 4-bit GGUF file** (SmolLM2-135M-Instruct). Every "
             "unit replaced alone by its round-to-nearest value, the loss change measured on held-out items (one "
             "measurement per task and unit kind, reused by every calibration seed); Spearman over every unit, mean ± sd "
             "over seeds [lowest seed].", "",
             "| task | bits | units | seeds | estimator | vs loss change | vs metric change | inside attention | inside MLP | ceiling |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    out: dict = {}
    tops = []
    for (task, bits, kind), files in sorted(groups.items()):
        reps = [json.loads(f.read_text()) for f in files]
        rows = [per_file(f) for f in files]
        ins = [(within(r, "attn"), within(r, "mlp")) for r in reps]
        key = f"{task}-{bits}bit-{kind}"
        out[key] = {"files": [str(f.relative_to(REPO)) for f in files], "units": len(reps[0]["units"]),
                    "items": reps[0]["items"], "calib_items": reps[0]["calib_items"], "estimators": {}}
        for e in reps[0]["spearman"]:
            loss = [r["loss"][e] for r in rows]
            metric = [r["metric"].get(e) for r in rows]
            attn = [a.get(e) for a, _ in ins]
            mlp = [m.get(e) for _, m in ins]
            out[key]["estimators"][e] = {"loss": loss, "metric": metric, "inside_attn": attn, "inside_mlp": mlp}
            lines.append(f"| {task} | {bits} | {kind} ({len(reps[0]['units'])}) | {len(files)} | `{e}` | {stats(loss)} | "
                         f"{stats(metric)} | {stats(attn) if kind == 'sublayers' else ''} | "
                         f"{stats(mlp) if kind == 'sublayers' else ''} | "
                         f"{stats([r['ceiling'] for r in rows]).split(' ±')[0]} |")
        ranked = sorted(reps[0]["units"], key=lambda u: -u["measured_loss"])
        tops.append(f"- {task}, {kind}: " + ", ".join(f"{u['label']} {u['measured_loss']:+.3f}" for u in ranked[:5])
                    + f"; smallest {ranked[-1]['label']} {ranked[-1]['measured_loss']:+.3f}")
        if kind == "sublayers":
            a = [u["measured_loss"] for u in reps[0]["units"] if u["label"].endswith(".attn")]
            m = [u["measured_loss"] for u in reps[0]["units"] if u["label"].endswith(".mlp")]
            tops.append(f"  (mean change: attention blocks {sum(a) / len(a):+.4f}, MLP blocks {sum(m) / len(m):+.4f} "
                        "nats per token)")
    lines += ["", "Largest measured loss changes (nats per token, seed 0's measurement):", "", *tops, ""]
    (args.dir / "table.md").write_text("\n".join(lines))
    (args.dir / "table.json").write_text(json.dumps({"machine": machine(), "groups": out}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
