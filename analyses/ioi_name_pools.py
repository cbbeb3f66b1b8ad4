"""Why held-out IOI faithfulness was capped: per-head quantization effects depend on the names.

    .venv/bin/python analyses/ioi_name_pools.py --bits 3

IOI's calibration and evaluation items draw their names from disjoint pools. This script asks how
well one pool's head ranking carries over to the other, using attribution patching
``ΣG·(Q(W) − W)`` per query head (round-to-nearest at ``--bits``) as the per-head effect, for the
name list of circuitq ≤ 0.7.1 (the first 40 names: pools of 20) and the current one (116 names:
pools of 58). Per list it computes the per-head attribution on: all 400 calibration items, the
first 128 of them, all 400 evaluation items, and the first 48 and 192 evaluation items, and
reports the Spearman correlation between them over all 270 query heads:

* calibration 400 vs evaluation 400: the shift between the two name pools (same templates);
* evaluation 400 vs its first 48 / 192: sampling noise of a measurement on that many items;
* calibration 128 vs calibration 400: noise of the estimator at 128 items.

A first-order prediction computed on the very items it is scored on tracks the measured change of
the loss closely (``--diagnose`` adds that figure from an earlier faithfulness JSON: the
prediction on those 48 evaluation items against the change measured on them), so these
attribution rankings stand in for the measured ones. Writes ``OUT.json`` and ``PAGE`` (markdown). The
default model's weights are dequantized from a 4-bit GGUF file.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from common import REPO, machine

SETS = ("calib400", "calib128", "eval400", "eval192", "eval48")
PAIRS = (("calib400", "eval400", "pool shift (400 items each)"),
         ("calib128", "eval192", "what a faithfulness check sees (estimator 128, measured 192)"),
         ("calib128", "eval48", "the 0.7.0 check's sizes (here: estimator 128, measured 48)"),
         ("eval400", "eval192", "evaluation sampling: 192 of 400"),
         ("eval400", "eval48", "evaluation sampling: 48 of 400"),
         ("calib400", "calib128", "estimator sampling: 128 of 400"))


def _attribution(lm, bits: int):
    """The faithfulness job's settings, the query-head units, and a function of items giving each
    head's ΣG·ΔW (ΔW = round-to-nearest at ``bits`` minus W)."""
    from circuitq.circuits.faithfulness import replacement, unit_sum, units
    from circuitq.config import FaithfulnessJob
    from circuitq.model.arch import Geometry
    from circuitq.pipeline import stages

    job = FaithfulnessJob(task="ioi")
    job = replace(job, quantize=replace(job.quantize, bits=bits, method="rtn"))
    model = lm.model
    targets = list(stages.target_shapes(model))
    w = {n: model.get_parameter(n).detach() for n in targets}
    q = stages.quantized_weights(model, job.quantize, progress=False).weights
    dw = {n: (v.float() - w[n].float()) for n, v in replacement(w, "quantize", q).items()}
    heads = units({n: tuple(t.shape) for n, t in w.items()}, Geometry.from_config(model.config), "heads")

    def attribution(items) -> list[float]:
        g = stages.collect_gradients(model, lm.tokenizer, items, job.calib, ("sum",), progress=False)["stats"]
        atp = {n: g.tensors["sum"][n].float() * dw[n] for n in targets}
        return [unit_sum(u, atp) for u in heads]

    return job, heads, attribution


def head_attributions(lm, bits: int, names: tuple[str, ...]) -> dict[str, list[float]]:
    """Per query head, ΣG·ΔW summed over the head's q rows and o columns, for each item set."""
    import circuitq.data.circuit_tasks as ct
    from circuitq.data.tasks import Task

    ct.NAMES = names
    job, heads, attribution = _attribution(lm, bits)
    task = Task("ioi", job.data, lm.tokenizer)
    calib = task.calib_for(replace(job.calib, samples=400))
    ev = task.eval_items(400)
    # the attribution is a sum over items: nested sets are sums of disjoint chunks (800 items in all)
    chunks = {"c128": calib[:128], "c400": calib[128:400], "e48": ev[:48], "e192": ev[48:192], "e400": ev[192:400]}
    part = {}
    for k, items in chunks.items():
        part[k] = attribution(items)
        print(f"  {len(names)} names, {k}: done", flush=True)

    def total(*ks):
        return [sum(v) for v in zip(*(part[k] for k in ks))]

    out = {"calib128": part["c128"], "calib400": total("c128", "c400"), "eval48": part["e48"],
           "eval192": total("e48", "e192"), "eval400": total("e48", "e192", "e400")}
    out["labels"] = [u.label for u in heads]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--diagnose", type=Path, default=REPO / "analyses/results/faithful_maps/faith-ioi-3bit-s1.json",
                    help="an earlier faithfulness JSON (pools of 20 names) for the same-items figure")
    ap.add_argument("--out", type=Path, default=REPO / "analyses" / "results" / "ioi_name_pools")
    ap.add_argument("--page", type=Path, default=REPO / "analyses" / "IOI_NAME_POOLS.md")
    ap.add_argument("--same-items-only", action="store_true",
                    help="only the same-items diagnostic of --diagnose (printed and written to OUT-same-items-Bbit.json)")
    a = ap.parse_args()
    import circuitq.data.circuit_tasks as ct
    from circuitq.circuits.faithfulness import spearman
    from circuitq.model.loading import load_model

    t0 = time.perf_counter()
    lm = load_model("smollm2-135m-instruct")
    full = tuple(ct.NAMES)
    if a.same_items_only:   # the diagnose file was made with the names of its version: 40 before 0.7.2
        rep = json.loads(a.diagnose.read_text())
        ct.NAMES = full[:40] if rep.get("circuitq_version", "0") < "0.7.2" else full
        got = {**same_items(lm, a.bits, rep), "bits": a.bits, "source": str(a.diagnose), "machine": machine(),
               "seconds": time.perf_counter() - t0}
        out = a.out.with_name(f"{a.out.name}-same-items-{a.bits}bit.json")
        out.write_text(json.dumps(got, indent=2) + "\n")
        print(json.dumps(got, indent=2))
        return
    lists = {"20 per pool (40 names, circuitq <= 0.7.1)": full[:40], f"{len(full) // 2} per pool ({len(full)} names)": full}
    res: dict = {"bits": a.bits, "machine": machine(), "lists": {}}
    for label, names in lists.items():
        att = head_attributions(lm, a.bits, names)
        res["lists"][label] = {f"{x} vs {y}": spearman(att[x], att[y]) for x, y, _ in PAIRS}
    if a.diagnose.exists():   # the prediction on the measured items themselves (needs their gradients)
        rep = json.loads(a.diagnose.read_text())
        res["diagnose_source"] = str(a.diagnose.relative_to(REPO)) if a.diagnose.is_relative_to(REPO) else str(a.diagnose)
        ct.NAMES = full[:40]
        res["same_items"] = same_items(lm, a.bits, rep)
        ct.NAMES = full
    res["seconds"] = time.perf_counter() - t0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# IOI name pools: how far one pool's head ranking carries to the other", "",
             f"Measured by `analyses/ioi_name_pools.py --bits {a.bits}` ({res['seconds'] / 60:.1f} min; "
             f"{res['machine']['platform']}, {res['machine']['cpus']} CPUs, torch {res['machine']['torch']}). "
             "Model: SmolLM2-135M-Instruct, **weights dequantized from a 4-bit GGUF file**. Per-head effect = "
             f"attribution patching ΣG·(Q(W) − W) over the head's q rows and o columns, {a.bits}-bit round-to-nearest; "
             "Spearman over all 270 query heads. One split (split_seed 0).", "",
             "| pair | what it shows | " + " | ".join(res["lists"]) + " |",
             "| --- | --- | " + " | ".join("---" for _ in res["lists"]) + " |"]
    for x, y, what in PAIRS:
        lines.append(f"| {x} vs {y} | {what} | " + " | ".join(f"{v[f'{x} vs {y}']:.3f}" for v in res["lists"].values()) + " |")
    if "same_items" in res:
        s = res["same_items"]
        lines += ["", f"On the items it is scored on, first order is close to exact: attribution patching computed on the "
                      f"{s['items']} evaluation items of `{res['diagnose_source']}` (pools of 20) ranks the changes measured "
                      f"on those same items at Spearman **{s['spearman']:.3f}** (the same file's held-out estimator: "
                      f"{s['held_out']:.3f}). So the held-out gap was not first-order error: it was which names the items use."]
    a.page.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def same_items(lm, bits: int, rep: dict) -> dict:
    """Spearman of ΣG·ΔW and of atp-local computed on the faithfulness JSON's own evaluation items
    against the changes measured on them (a diagnostic: never an estimator, it sees the scored
    items): how much of the gap is first-order error rather than which items were used."""
    from circuitq.circuits.faithfulness import replacement, spearman
    from circuitq.data.tasks import Task
    from circuitq.pipeline import stages
    from circuitq.saliency.attribution import local_attribution

    job, heads, attribution = _attribution(lm, bits)
    items = Task("ioi", job.data, lm.tokenizer).eval_items(rep["items"])
    measured = {u["label"]: u["measured_loss"] for u in rep["units"]}
    y = [measured[u.label] for u in heads]
    model = lm.model
    w = {n: model.get_parameter(n).detach() for n in stages.target_shapes(model)}
    values = replacement(w, "quantize", stages.quantized_weights(model, job.quantize, progress=False).weights)
    local = local_attribution(model, lm.tokenizer, items, heads, values, job.calib, progress=False)
    return {"items": rep["items"], "spearman": spearman(attribution(items), y),
            "spearman_atp_local": spearman([local[u.label] for u in heads], y), "held_out": rep["spearman"]["atp"]}


if __name__ == "__main__":
    main()
