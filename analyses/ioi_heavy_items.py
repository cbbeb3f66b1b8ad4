"""Which held-out IOI items carry an early head's measured change (issue 23, 0.8.4).

The 384-item IOI measurement (``results/faithful_maps_ioi384/``) showed the heads of layers 0–2
changing the loss on items 0–191 and not on items 192–383 (their two halves agree at Spearman 0.48).
This script replaces one head at a time by its 3-bit round-to-nearest value (as the faithfulness check
does) and records the change of each item's answer NLL, for a few heads named on the command line:
the mean over each half (it reproduces the stored measurement), the median, and the share of the summed
absolute change carried by the 5 items that change most, with those items' prompts.

    .venv/bin/python analyses/ioi_heavy_items.py --out analyses/results/faithful_maps_ioi384/heavy_items.json

About a minute on 2 CPU cores (two forward passes of 384 short items per head).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from common import REPO, machine

sys.path.insert(0, str(REPO))
from circuitq.artifacts import write_json  # noqa: E402
from circuitq.circuits.faithfulness import replacement, units  # noqa: E402
from circuitq.config import DataConfig, QuantizeConfig  # noqa: E402
from circuitq.data.tasks import Task, collate, tokenize_examples  # noqa: E402
from circuitq.model.arch import Geometry, target_shapes  # noqa: E402
from circuitq.model.loading import load_model  # noqa: E402
from circuitq.pipeline.stages import quantized_weights  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", nargs="+", default=["L0.H8", "L0.H2", "L1.H4", "L1.H5", "L15.H0"],
                    help="head labels, or 'layers:A-B' for every head of layers A..B")
    ap.add_argument("--items", type=int, default=384)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    lm = load_model(device="cpu")
    model, tok = lm.model, lm.tokenizer
    items = Task("ioi", DataConfig(), tok).eval_items(a.items)
    names = list(target_shapes(model))
    weights = {n: model.get_parameter(n).detach() for n in names}
    by_label = {u.label: u for u in units({n: tuple(w.shape) for n, w in weights.items()},
                                          Geometry.from_config(model.config), "heads")}
    if len(a.heads) == 1 and a.heads[0].startswith("layers:"):
        lo, hi = (int(x) for x in a.heads[0].split(":")[1].split("-"))
        a.heads = [x for x in by_label if lo <= int(x.split(".")[0][1:]) <= hi]
    unknown = [h for h in a.heads if h not in by_label]
    if unknown:
        print(f"unknown head {unknown[0]} for --heads (e.g. L0.H8)", file=sys.stderr)
        return 2
    values = replacement(weights, "quantize", quantized_weights(
        model, QuantizeConfig(bits=a.bits, group_size=64, method="rtn"), progress=False).weights)
    tk = tokenize_examples(items, tok, 1024)

    def per_item_nll() -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(items), 32):
                ids, attn, lmask = collate(tk.ids[i:i + 32], tk.scored_from[i:i + 32], tok.pad_token_id or 0)
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn.long()).logits[:, :-1].float(), -1)
                nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
                m = lmask[:, :-1].float()
                out.append((nll * m).sum(1) / m.sum(1))
        return torch.cat(out)

    base = per_item_nll()
    half = len(items) // 2
    heads = {}
    for label in a.heads:
        u = by_label[label]
        saved = {}
        try:
            for n, m in u.entries.items():
                p = model.get_parameter(n)
                saved[n] = p.data.clone()
                p.data[m] = values[n][m]
            d = (per_item_nll() - base).numpy().astype(float)
        finally:
            for n, old in saved.items():
                model.get_parameter(n).data.copy_(old)
        top = np.argsort(-np.abs(d))[:5]
        heads[label] = {"mean_first_half": float(d[:half].mean()), "mean_second_half": float(d[half:].mean()),
                        "median": float(np.median(d)), "median_first_half": float(np.median(d[:half])),
                        "median_second_half": float(np.median(d[half:])), "top5_share_of_abs_sum": float(np.abs(d[top]).sum() / np.abs(d).sum()),
                        "top5": [{"item": int(i), "change": float(d[i]), "prompt": items[i].prompt,
                                  "answer": items[i].completion} for i in top]}
        print(f"{label}: mean items 0–{half - 1} {d[:half].mean():+.4f}, items {half}–{len(items) - 1} "
              f"{d[half:].mean():+.4f}, median {np.median(d):+.4f}; the 5 items that change most carry "
              f"{heads[label]['top5_share_of_abs_sum']:.0%} of Σ|change|: "
              + "; ".join(f"#{int(i)} {d[i]:+.2f}" for i in top))
    if len(heads) >= 3:   # do the two halves rank the heads alike by their mean, and by their median?
        from circuitq.circuits.faithfulness import spearman
        h = list(heads.values())
        for stat in ("mean", "median"):
            r = spearman([x[f"{stat}_first_half"] for x in h], [x[f"{stat}_second_half"] for x in h])
            print(f"{len(h)} heads, items 0–{half - 1} vs {half}–{len(items) - 1}, by the {stat}: Spearman {r:.3f}")
    write_json(a.out, {"format": "circuitq.ioi_heavy_items", "bits": a.bits, "items": len(items), "heads": heads,
                       "machine": machine(), "note": "per-item NLL change of the answer, one head replaced by RTN"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
