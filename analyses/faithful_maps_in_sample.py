"""Where does a head map's gap to the measured changes come from: the estimator's approximation, or
which items it and the measurement were taken on? (issue 23, 0.8.4)

A faithfulness JSON measures every query head's change of the task loss on held-out items and
compares it with estimators computed on *other* (calibration) items. Two things limit that Spearman:
the linearisation inside the estimator, and item sampling (a head's effect differs from item to item,
so two finite sets of items disagree). This script separates them. It computes ``atp-local`` (and
``atp-window`` at a few windows, for the heads of the first layers) **on the measured items
themselves**, from their per-item terms, and compares with the stored measurement:

* ``in-sample``: the estimator on the same items as the measurement: only the approximation differs;
* ``same half`` / ``cross half``: the estimator on the even (odd) items against the measurement on
  the even (odd) items, and against the other half: what changing the items alone costs.

This is a diagnostic of the estimator, not a held-out result: nothing is chosen from it, and the
held-out figures stay those of the faithfulness JSONs. Per layer band (27 … 90 heads).

    .venv/bin/python analyses/faithful_maps_in_sample.py \\
        --measured analyses/results/faithful_maps_names58/faith-ioi-3bit-s0.json \\
        --out analyses/results/faithful_maps_in_sample/ioi-3bit

Cost (2 CPU cores): one gradient pass and 270 sublayer reruns over the measured items, then one
gradient pass and the windowed reruns per window for the heads of the first ``--early`` layers
(the window to the last layer is a forward from the head's layer per head). About 5 min on IOI.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from common import REPO, machine

sys.path.insert(0, str(REPO))
from circuitq.artifacts import write_json  # noqa: E402
from circuitq.circuits.faithfulness import replacement, spearman, units  # noqa: E402
from circuitq.config import CalibConfig, DataConfig, QuantizeConfig  # noqa: E402
from circuitq.data.tasks import Task  # noqa: E402
from circuitq.model.arch import Geometry, target_shapes  # noqa: E402
from circuitq.model.loading import load_model  # noqa: E402
from circuitq.pipeline.stages import quantized_weights  # noqa: E402
from circuitq.pipeline.store import examples_digest, model_fingerprint  # noqa: E402
from circuitq.saliency.attribution import local_attribution, second_order  # noqa: E402


def bands(n_layers: int) -> list[tuple[int, int]]:
    """Layer bands: the first three layers, the rest of the first third, the middle, the last third."""
    third = n_layers // 3
    return [(0, 3), (3, third), (third, 2 * third), (2 * third, n_layers)]


def layer(label: str) -> int:
    return int(label.split(".")[0][1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", required=True, help="a faithfulness JSON over all query heads (quantize ablation)")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    ap.add_argument("--early", type=int, default=6, help="heads of layers below this get the window sweep")
    ap.add_argument("--windows", type=int, nargs="+", default=[0, 2, 8, 1000],
                    help="windows for the sweep (one past the last layer = to the last layer)")
    a = ap.parse_args(argv)
    doc = json.loads(open(a.measured).read())
    key = doc["measurement"]
    if doc.get("ablation") != "quantize" or doc.get("units_kind") != "heads" or doc.get("units_measured") != "all":
        print(f"{a.measured}: needs a faithfulness JSON of all query heads with --ablation quantize", file=sys.stderr)
        return 2
    t0 = time.time()
    lm = load_model(doc.get("model"), device="cpu")
    model = lm.model
    if model_fingerprint(model) != key["model_fingerprint"]:
        print(f"{a.measured} was measured on another model", file=sys.stderr)
        return 2
    items = Task(doc["task"], DataConfig(), lm.tokenizer).eval_items(key["eval"]["samples"])
    if examples_digest(items) != key["eval_items"]:
        print(f"{a.measured}: its evaluation items are not the task's first {len(items)}", file=sys.stderr)
        return 2
    names = list(target_shapes(model))
    weights = {n: model.get_parameter(n).detach() for n in names}
    ul = units({n: tuple(w.shape) for n, w in weights.items()}, Geometry.from_config(model.config), "heads")
    q = quantized_weights(model, QuantizeConfig(bits=key["bits"], group_size=key["group_size"], method="rtn"),
                          progress=False).weights
    values = replacement(weights, "quantize", q)
    calib = CalibConfig(samples=len(items), seq_len=key["eval"]["seq_len"])
    meas = {u["label"]: u for u in doc["units"]}
    n_layers = model.config.num_hidden_layers

    def compare(per: dict, labels: list[str]) -> dict:
        """Spearman of the estimator (from per-item terms) against the measurement, by how the items match."""
        tot = [float(per[x].sum()) for x in labels]
        ev = [float(per[x][0::2].sum()) for x in labels]
        od = [float(per[x][1::2].sum()) for x in labels]
        m = [meas[x]["measured_loss"] for x in labels]
        me = [meas[x]["measured_halves"][0] for x in labels]
        mo = [meas[x]["measured_halves"][1] for x in labels]
        return {"heads": len(labels), "in_sample": spearman(tot, m),
                "same_half": (spearman(ev, me) + spearman(od, mo)) / 2,
                "cross_half": (spearman(ev, mo) + spearman(od, me)) / 2,
                "measurement_split_half": spearman(me, mo)}

    rows = {}
    _, per = local_attribution(model, lm.tokenizer, items, ul, values, calib, per_item=True)
    _, per2 = second_order(per)
    all_labels = [u.label for u in ul]
    rows["atp-local"] = {"all": compare(per, all_labels)}
    rows["atp-local2"] = {"all": compare(per2, all_labels)}
    for lo, hi in bands(n_layers):
        labels = [x for x in all_labels if lo <= layer(x) < hi]
        rows["atp-local"][f"L{lo}-{hi - 1}"] = compare(per, labels)
        rows["atp-local2"][f"L{lo}-{hi - 1}"] = compare(per2, labels)
    early = [u for u in ul if layer(u.label) < a.early]
    sweep = {}
    for w in a.windows:
        _, pw = local_attribution(model, lm.tokenizer, items, early, values, calib, per_item=True, window=w)
        _, pw2 = second_order(pw)
        name = f"window {w}" if w < n_layers - 1 else "window to the last layer"
        sweep[name] = {}
        for lo, hi in [(0, 3), (3, a.early)]:
            labels = [u.label for u in early if lo <= layer(u.label) < hi]
            sweep[name][f"L{lo}-{hi - 1}"] = {"first": compare(pw, labels), "second": compare(pw2, labels)}
    lab = [u.label for u in early]
    sweep["atp-local (the unit's block)"] = {f"L{lo}-{hi - 1}": {
        "first": compare(per, [x for x in lab if lo <= layer(x) < hi]),
        "second": compare(per2, [x for x in lab if lo <= layer(x) < hi])} for lo, hi in [(0, 3), (3, a.early)]}
    out = {"format": "circuitq.faithfulness_in_sample", "measured": a.measured, "task": doc["task"],
           "bits": key["bits"], "items": len(items), "estimators": rows, "window_sweep": sweep,
           "machine": machine(), "seconds": time.time() - t0,
           "note": "estimators computed on the measured items themselves: a diagnostic, not a held-out result"}
    write_json(a.out + ".json", out, overwrite=True)
    md = [f"# In-sample diagnostic: {doc['task']}, {key['bits']} bits, {len(items)} measured items\n",
          "Estimators computed **on the measured items themselves** (a diagnostic of the approximation, "
          "not a held-out result). Default model, weights dequantized from a 4-bit GGUF file. "
          f"{out['machine']['cpus']} CPUs, torch {out['machine']['torch']}, {out['seconds'] / 60:.1f} min.\n",
          "| estimator | heads | n | in-sample | same half | cross half | measurement split-half |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for e, by in rows.items():
        for band, r in by.items():
            md.append(f"| `{e}` | {band} | {r['heads']} | {r['in_sample']:.3f} | {r['same_half']:.3f} | "
                      f"{r['cross_half']:.3f} | {r['measurement_split_half']:.3f} |")
    md += ["", f"## Heads of layers 0–{a.early - 1}: how much of the network to recompute exactly\n",
           "| recomputed exactly | heads | in-sample, first order | in-sample, + ½Σt² |", "| --- | --- | --- | --- |"]
    for name, by in sweep.items():
        for band, r in by.items():
            md.append(f"| {name} | {band} | {r['first']['in_sample']:.3f} | {r['second']['in_sample']:.3f} |")
    open(a.out + ".md", "w").write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
