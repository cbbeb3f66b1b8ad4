"""One table of every head-map faithfulness measurement of issue 23, by task, bits and the
estimators' objective (NLL or the task's metric): Spearman over all query heads against the
measured loss change and against the measured metric change, and the keep-top curve at 10% of the
heads, mean ± sd over calibration seeds [lowest]. Read from the faithfulness JSONs themselves (the
Spearman against the metric is computed from each file's per-head predictions and measurements,
so files of circuitq < 0.8 count too). Writes ``analyses/FAITHFUL_MAPS_METRIC.md``.

    # IOI's loss at 3 bits against 384 held-out items, and the window estimators (0.8.4):
    # results/faithful_maps_ioi384/README.md, results/faithful_maps_window/README.md
    .venv/bin/python analyses/faithful_maps_metric_table.py
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

from common import REPO, machine

sys.path.insert(0, str(REPO))
from circuitq.circuits.faithfulness import spearman  # noqa: E402

R = REPO / "analyses" / "results"
SMOL, GEMMA = "SmolLM2-135M", "Gemma 3 270M"


def _group(model: str, task: str, bits: int, items: int, objective: str, folder: str, pattern: str) -> tuple:
    """One group of seeds: its description and its faithfulness JSONs under ``results/folder``."""
    return model, task, bits, items, objective, sorted((R / folder).glob(pattern))


# (model, task, bits, held-out items, objective, files): one group of seeds each
GROUPS = [
    _group(SMOL, "ioi", 3, 192, "nll", "faithful_maps_names58", "faith-ioi-3bit-s?.json"),
    _group(SMOL, "ioi", 3, 192, "metric", "faithful_maps_metric", "faith-ioi-3bit-s?.json"),
    _group(SMOL, "ioi", 3, 192, "metric, 256 calib. items", "faithful_maps_metric_calib", "faith-ioi-3bit-c256-s?.json"),
    _group(SMOL, "ioi", 3, 192, "metric, all 400 calib. items", "faithful_maps_metric_calib", "faith-ioi-3bit-c400-s?.json"),
    _group(SMOL, "ioi", 2, 96, "nll", "faithful_maps_names58_2bit", "faith-ioi-2bit-s?-96.json"),
    _group(SMOL, "ioi", 2, 96, "metric", "faithful_maps_metric_2bit", "faith-ioi-2bit-s?.json"),
    _group(SMOL, "greater-than", 3, 96, "nll", "faithful_maps_gt", "faith-greater-than-3bit-s?.json"),
    _group(SMOL, "greater-than", 3, 96, "metric", "faithful_maps_metric_gt", "faith-greater-than-3bit-s?.json"),
    _group(SMOL, "greater-than", 2, 96, "nll", "faithful_maps_gt_2bit", "nll-greater-than-2bit-s?.json"),
    _group(SMOL, "greater-than", 2, 96, "metric", "faithful_maps_gt_2bit", "faith-greater-than-2bit-s?.json"),
    # capitals: 20 calibration countries, so every seed draws the same items (one estimate; README there)
    _group(SMOL, "capitals", 3, 20, "nll", "faithful_maps_capitals", "faith-capitals-3bit-s0.json"),
    _group(SMOL, "induction", 3, 96, "nll", "faithful_maps_induction", "faith-induction-3bit-s?.json"),
    # 0.8.3: capitals and induction at 2 bits, gsm8k (32 calibration and 32 held-out items: long answers)
    _group(SMOL, "capitals", 2, 20, "nll", "faithful_maps_2bit_tasks", "capitals-2bit-s0.json"),
    _group(SMOL, "induction", 2, 96, "nll", "faithful_maps_2bit_tasks", "induction-2bit-s?.json"),
    _group(SMOL, "gsm8k", 3, 32, "nll, 32 calib. items", "faithful_maps_gsm8k", "gsm8k-3bit-s?.json"),
    _group(SMOL, "gsm8k", 2, 32, "nll, 32 calib. items", "faithful_maps_gsm8k", "gsm8k-2bit-s?.json"),
    # 0.8.4: IOI's loss at 3 bits against 384 held-out items (twice the items: a higher ceiling), and
    # from all 400 calibration items; the window estimators against the 192-item measurement
    _group(SMOL, "ioi", 3, 384, "nll", "faithful_maps_ioi384", "ioi-3bit-e384-s?.json"),
    _group(SMOL, "ioi", 3, 384, "nll, all 400 calib. items", "faithful_maps_ioi384", "ioi-3bit-e384-c400-s0.json"),
    _group(SMOL, "ioi", 3, 192, "nll, all 400 calib. items", "faithful_maps_window", "ioi-3bit-c400-nll-s0.json"),
    _group(SMOL, "ioi", 3, 192, "nll, --window 2", "faithful_maps_window", "ioi-3bit-w2-s0.json"),
    _group(SMOL, "ioi", 3, 192, "nll, --window 29 (to the last layer)", "faithful_maps_window", "ioi-3bit-wend-s0.json"),
    # 0.8.4: IOI at 2 bits with curves (the 0.7.3 measurement of 96 items reused)
    _group(SMOL, "ioi", 2, 96, "metric, with curves", "faithful_maps_curves_2bit", "ioi-2bit-metric-s?.json"),
    _group(SMOL, "ioi", 2, 96, "nll, with curves", "faithful_maps_curves_2bit", "ioi-2bit-nll-s?.json"),
    _group(GEMMA, "ioi", 3, 192, "nll", "gemma3_270m_faith", "faith-ioi-3bit-s?.json"),
    _group(GEMMA, "ioi", 3, 192, "metric", "gemma3_270m_faith", "fm-metric-ioi-3bit-s?.json"),
]
ESTIMATORS = ("score", "atp", "atp-local", "atp-local2", "atp-window", "atp-window2", "atp-denoise")
COMMANDS = """## Commands (2 CPU cores; each seed after the first reuses the first's measurement)

    # IOI, 3 bits, loss objective (0.7.2): results/faithful_maps_names58/
    .venv/bin/python analyses/faithful_maps.py --tasks ioi --bits 3 --seeds 0 1 2 --root runs/faithful-maps-072 \\
        --out analyses/results/faithful_maps_names58
    # IOI, 2 bits, loss objective (0.7.3): commands in results/faithful_maps_names58_2bit/README.md
    # greater-than, 3 bits, loss objective (0.8.0; seed 0 measures all 270 heads: 54 min)
    .venv/bin/python analyses/faithful_maps.py --tasks greater-than --bits 3 --seeds 0 1 2 --eval-samples 96 \\
        --root runs/faithful-maps-gt --out analyses/results/faithful_maps_gt
    # the metric objective, against the measurements above (scores directories linked into each root)
    .venv/bin/python analyses/faithful_maps.py --tasks ioi --bits 3 --seeds 0 1 2 --estimators atp atp-local atp-denoise \\
        --objective metric --measured runs/faithful-maps-072/faith-ioi-3bit-s0.json --eval-samples 192 \\
        --root runs/fm-metric --out analyses/results/faithful_maps_metric
    .venv/bin/python analyses/faithful_maps.py --tasks greater-than --bits 3 --seeds 0 1 2 --estimators atp atp-local \\
        atp-denoise --objective metric --measured runs/faithful-maps-gt/faith-greater-than-3bit-s0.json --eval-samples 96 \\
        --root runs/fm-metric-gt --out analyses/results/faithful_maps_metric_gt
    # IOI, 2 bits, the metric objective, no curves: commands in results/faithful_maps_metric_2bit/README.md
    # IOI, 3 bits, the metric objective from 256 and all 400 calibration items (0.8.1, no curves; 4-6 min each)
    for s in 0 1 2; do circuitq faithfulness --scores runs/fm-metric/scores-ioi-3bit-s$s --units heads --all-units \
        --estimators atp atp-local --objective metric --bits 3 --seed $s --calib-samples 256 --eval-samples 192 \
        --measured runs/faithful-maps-072/faith-ioi-3bit-s0.json --out runs/fm-metric-c256/faith-ioi-3bit-s$s.json; done
    # (and --calib-samples 512, which the split caps at 400, seed 0 only) -> results/faithful_maps_metric_calib/
    # Gemma 3 270M, IOI, 3 bits, the metric objective against 0.7.3's measurement (0.8.1; 37 min with curves)
    circuitq faithfulness --model gemma-3-270m --scores runs/gemma3/scores-ioi-3bit-s0 --units heads --all-units \
        --estimators atp atp-local atp-denoise --objective metric --curve --bits 3 --seed 0 --calib-samples 128 \
        --eval-samples 192 --measured runs/gemma3/faith-ioi-3bit-s0.json --out runs/gemma3/fm-metric-ioi-3bit-s0.json
    # capitals and induction, 3 bits, loss objective (0.8.2): results/faithful_maps_capitals/, faithful_maps_induction/
    .venv/bin/python analyses/faithful_maps.py --tasks capitals --bits 3 --seeds 0 1 2 --eval-samples 96 \\
        --root runs/fm-capitals --out analyses/results/faithful_maps_capitals
    .venv/bin/python analyses/faithful_maps.py --tasks induction --bits 3 --seeds 0 1 2 --eval-samples 96 \\
        --root runs/fm-induction --out analyses/results/faithful_maps_induction
    # greater-than, 2 bits, both objectives (0.8.2, no curves): commands in results/faithful_maps_gt_2bit/README.md
    # IG at K = 4, 8, 16 and the weight-level estimators' reliability (0.8.2): results/faithful_maps_ig_steps/README.md
    # atp-local2 against the same measurements, 3 seeds (0.8.3): results/faithful_maps_second_order/README.md
    # GSM8k at 3 bits (0.8.3): results/faithful_maps_gsm8k/README.md; capitals, induction at 2 bits:
    # results/faithful_maps_2bit_tasks/README.md; Gemma seeds 1-2 (0.8.3): the Gemma command above with
    # --seed 1|2, --estimators atp atp-local atp-denoise, no --curve, --measured <its seed-0 measurement>
    # IOI's loss at 3 bits against 384 held-out items, and the window estimators (0.8.4):
    # results/faithful_maps_ioi384/README.md, results/faithful_maps_window/README.md
    .venv/bin/python analyses/faithful_maps_metric_table.py
"""


def stats(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.3f} (1 seed)"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f} [{min(xs):.3f}]"


IG_STEPS = R / "faithful_maps_ig_steps"   # faith-ioi-3bit-ig{K}-s0.json and ig{K}-s0.log


def ig_seconds(log: Path) -> float | None:
    """The integrated-gradients loop's wall time, from the last ``ig`` progress bar of a log."""
    if not log.exists():
        return None
    found = re.findall(r"ig: 100%\|[^|]*\| (\d+)/\1 \[(?:(\d+):)?(\d+):(\d+)", log.read_text(errors="replace"))
    if not found:
        return None
    _, h, m, sec = found[-1]
    return int(h or 0) * 3600 + int(m) * 60 + int(sec)


def ig_rows() -> list[str]:
    """Integrated gradients by its number of steps, against the same measurement."""
    rows = []
    for f in sorted(IG_STEPS.glob("faith-ioi-3bit-ig*-s0.json"), key=lambda p: int(re.search(r"ig(\d+)", p.name)[1])):
        rep = json.loads(f.read_text())
        k = rep["completeness"]["ig_steps"]
        c = rep["completeness"]["ig"]
        secs = ig_seconds(f.with_name(f"ig{k}-s0.log"))
        rows.append(f"| {k} | {rep['spearman']['ig']:.3f} | {rep['spearman'].get('atp', float('nan')):.3f} | "
                    f"{c['attributed']:+.4f} | {c['measured']:+.4f} | {abs(c['gap']):.1%} | "
                    f"{'—' if secs is None else f'{secs} s ({secs / k:.0f} s per step)'} |")
    return rows


SECOND = R / "faithful_maps_second_order"   # {ioi,gt,induction,capitals}-{B}bit-s{S}.json (0.8.3)
SECOND_GROUPS = [("ioi", 3, 192, "ioi-3bit"), ("ioi", 2, 96, "ioi-2bit"), ("greater-than", 3, 96, "gt-3bit"),
                 ("greater-than", 2, 96, "gt-2bit"), ("induction", 3, 96, "induction-3bit"),
                 ("capitals", 3, 20, "capitals-3bit"),
                 # measured with atp-local2 from the start (0.8.3): results/faithful_maps_gsm8k, _2bit_tasks
                 ("gsm8k", 3, 32, "../faithful_maps_gsm8k/gsm8k-3bit"),
                 ("induction", 2, 96, "../faithful_maps_2bit_tasks/induction-2bit"),
                 ("capitals", 2, 20, "../faithful_maps_2bit_tasks/capitals-2bit")]


def second_order_rows() -> list[str]:
    """``atp-local2`` beside ``atp-local`` and ``atp`` from the same runs (same calibration items,
    same measurement), with the paired per-seed difference and each one's own reliability."""
    rows = []
    for task, bits, items, stem in SECOND_GROUPS:
        folder, name = (SECOND / stem).parent, (SECOND / stem).name
        reps = [json.loads(f.read_text()) for f in sorted(folder.glob(f"{name}-s?.json"))]
        if not reps:
            continue
        rho = {e: [r["spearman"][e] for r in reps] for e in ("atp", "atp-local", "atp-local2")}
        diff = [b - a for a, b in zip(rho["atp-local"], rho["atp-local2"])]
        rel = {e: [((r.get("estimator_reliability") or {}).get(e) or {}).get("reliability") for r in reps]
               for e in ("atp-local", "atp-local2")}
        # how large the second-order term is beside the first-order one: per head ½Σt² / |Σt|, median over heads
        ratio = statistics.median((u["predicted"]["atp-local2"] - u["predicted"]["atp-local"])
                                  / max(abs(u["predicted"]["atp-local"]), 1e-12) for u in reps[0]["units"])
        best = max(rho, key=lambda e: statistics.mean(rho[e]))
        cells = [f"**{stats(rho[e])}**" if e == best else stats(rho[e]) for e in ("atp", "atp-local", "atp-local2")]
        rows.append(f"| {task} | {bits} | {items} | {len(reps)} | {' | '.join(cells)} | "
                    f"{statistics.mean(diff):+.3f} ({min(diff):+.3f} … {max(diff):+.3f}) | {ratio:.2f} | "
                    f"{stats(rel['atp-local']).split(' ±')[0]} / {stats(rel['atp-local2']).split(' ±')[0]} | "
                    f"{reps[0]['noise_ceiling']['ceiling']:.3f} |")
    return rows


IOI384 = R / "faithful_maps_ioi384"   # ioi-3bit-e384-s{S}.json, ioi-3bit-e384-c400-s0.json (0.8.4)
FIRST192 = R / "faithful_maps_names58" / "faith-ioi-3bit-s0.json"


def ioi384_rows() -> list[str]:
    """IOI, 3 bits, loss: each estimator against the 384-item measurement, against its first 192 items
    (0.7.2's measurement: the same items, the same batches) and against the other 192. Every answer is
    one token, so the 384-item mean is the mean of the two halves' and the second half's change is
    ``2 · m384 − m192`` exactly."""
    first = {u["label"]: u["measured_loss"] for u in json.loads(FIRST192.read_text())["units"]} \
        if FIRST192.exists() else None
    rows = []
    for f in sorted(IOI384.glob("ioi-3bit-e384-*.json")):
        rep = json.loads(f.read_text())
        labels = [u["label"] for u in rep["units"]]
        m384 = {u["label"]: u["measured_loss"] for u in rep["units"]}
        for e in ("atp", "atp-local", "atp-local2"):
            if e not in rep["spearman"]:
                continue
            p = [u["predicted"][e] for u in rep["units"]]
            a = spearman(p, [first[x] for x in labels]) if first else float("nan")
            b = spearman(p, [2 * m384[x] - first[x] for x in labels]) if first else float("nan")
            rows.append(f"| {f.stem} | {rep['calib_items']} | `{e}` | **{rep['spearman'][e]:.3f}** | {a:.3f} | {b:.3f} | "
                        f"{rep['noise_ceiling']['ceiling']:.3f} |")
    if first and rows:
        rep = json.loads(sorted(IOI384.glob("ioi-3bit-e384-s0.json"))[0].read_text())
        labels = [u["label"] for u in rep["units"]]
        m384 = {u["label"]: u["measured_loss"] for u in rep["units"]}
        agree = spearman([first[x] for x in labels], [2 * m384[x] - first[x] for x in labels])
        rows.append(f"| the measurement itself: first 192 vs the other 192 items | — | — | — | — | {agree:.3f} | — |")
    return rows


def ioi384_band_rows() -> list[str]:
    """The same split by the heads' layer: `atp-local` from all 400 calibration items against each half,
    and the two halves' measurements against each other."""
    f = IOI384 / "ioi-3bit-e384-c400-s0.json"
    if not (f.exists() and FIRST192.exists()):
        return []
    first = {u["label"]: u["measured_loss"] for u in json.loads(FIRST192.read_text())["units"]}
    units = json.loads(f.read_text())["units"]
    rows = []
    for lo, hi in ((0, 3), (3, 10), (10, 20), (20, 30), (3, 30)):
        us = [u for u in units if lo <= int(u["label"].split(".")[0][1:]) < hi]
        p = [u["predicted"]["atp-local"] for u in us]
        m1 = [first[u["label"]] for u in us]
        m2 = [2 * u["measured_loss"] - first[u["label"]] for u in us]
        rows.append(f"| {lo}–{hi - 1} | {len(us)} | {spearman(p, m1):.3f} | {spearman(p, m2):.3f} | {spearman(m1, m2):.3f} |")
    return rows


def reliability_rows() -> list[str]:
    """Each estimator's split-half reliability over its own calibration items, where a file has it."""
    rows = []
    for model, task, bits, _, obj, files in GROUPS:
        for f in files:
            rep = json.loads(f.read_text())
            for e, r in (rep.get("estimator_reliability") or {}).items():
                if r:
                    rho = (f"{spearman([u['predicted'][e] for u in rep['units']], [-u['measured_metric'] for u in rep['units']]):.3f}"
                           " (metric)") if obj.startswith("metric") else f"{rep['spearman'][e]:.3f} (loss)"
                    rows.append(f"| {model} | {task} | {bits} | {obj} | {f.stem} | `{e}` | {r['items']} | "
                                f"{r['split_half_spearman']:.3f} | {r['reliability']:.3f} | {r['reliability_doubled']:.3f} | "
                                f"{rho} |")
    extra = sorted((R / "faithful_maps_metric_calib").glob("atp-ioi-3bit-c*-s0.json")) + \
        sorted(IG_STEPS.glob("faith-ioi-3bit-ig4-s0.json"))   # one IG file: atp is the same in all three
    for f in extra:
        rep = json.loads(f.read_text())
        for e, r in (rep.get("estimator_reliability") or {}).items():
            if r:
                metric = rep["objective"] == "metric"
                rho = spearman([u["predicted"][e] for u in rep["units"]], [-u["measured_metric"] for u in rep["units"]]) \
                    if metric else rep["spearman"][e]
                rows.append(f"| SmolLM2-135M | ioi | 3 | {rep['objective']} | {f.stem} | `{e}` | {r['items']} | "
                            f"{r['split_half_spearman']:.3f} | {r['reliability']:.3f} | {r['reliability_doubled']:.3f} | "
                            f"{rho:.3f} ({'metric' if metric else 'loss'}) |")
    return rows


def per_file(path: Path) -> dict:
    rep = json.loads(path.read_text())
    units = rep["units"]
    has_metric = all(u.get("measured_metric") is not None for u in units)   # gsm8k: no metric per item
    out = {"loss": dict(rep["spearman"]), "metric": {}, "rec10": {}, "ceiling": (rep.get("noise_ceiling") or {}).get("ceiling"),
           "agree": spearman([u["measured_loss"] for u in units], [-u["measured_metric"] for u in units])
           if has_metric else None}
    for e in rep["spearman"]:
        out["metric"][e] = spearman([u["predicted"][e] for u in units], [-u["measured_metric"] for u in units]) \
            if has_metric else None
    curves = rep.get("curves")
    if curves:
        for o, modes in curves["orderings"].items():
            pts = [p for p in modes["keep-top"]["points"] if p["fraction"] <= 0.1 + 1e-9]
            out["rec10"][o] = (pts[-1]["recovery"], pts[-1]["metric"], curves["full"]["metric"], curves["none"]["metric"],
                               modes["keep-top"].get("area"))
    return out


def section(title: str, text: str, header: list[str], rows: list[str]) -> list[str]:
    """A Markdown section with a table, or nothing without rows."""
    if not rows:
        return []
    return [f"## {title}", "", text, "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header), *rows, ""]


def main() -> None:
    lines = ["# Head maps of the loss and of the task's metric (issue 23, 0.8.0–0.8.4)", "",
             f"Written by `analyses/faithful_maps_metric_table.py` from the faithfulness JSONs under `analyses/results/` "
             f"({machine()['platform']}, {machine()['cpus']} CPUs, torch {machine()['torch']}). **Both models' weights are "
             "dequantized from 4-bit GGUF files.** Every query head is replaced alone by its round-to-nearest value at "
             "the given bits and the change measured on held-out items (IOI: names never in calibration; greater-than: "
             "start years never in calibration); the estimators come from 128 calibration items per seed (unless "
             "the objective column says more: IOI's calibration split holds 400 items, so at 400 every seed draws "
             "the same items and only one is run), their "
             "gradients of the answer's NLL (`nll`) or of minus the task's metric (`metric`: IOI's logit difference, "
             "greater-than's probability difference). One measurement per task and bits, reused by every seed and "
             "objective (`--measured`). Mean ± sd over seeds [lowest seed].", "",
             "## Spearman over all query heads", "",
             "| model | task | bits | items | objective | seeds | estimator | vs measured loss change | vs measured metric change | loss ceiling |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    agree = []
    curve_rows = []
    for model, task, bits, items, obj, files in GROUPS:
        if not files:
            continue
        rows = [per_file(f) for f in files]
        agree.append((model, task, bits, rows[0]["agree"]))
        for e in ESTIMATORS:
            if e not in rows[0]["loss"]:
                continue
            lines.append(f"| {model} | {task} | {bits} | {items} | {obj} | {len(rows)} | `{e}` | "
                         f"{stats([r['loss'][e] for r in rows])} | {stats([r['metric'][e] for r in rows])} | "
                         f"{stats([r['ceiling'] for r in rows]).split(' ±')[0]} |")
        curved = [r for r in rows if r["rec10"]]   # seeds run without --curve have no curve
        for o in list(ESTIMATORS) + ["random"]:
            if curved and all(o in r["rec10"] for r in curved):
                rec = [r["rec10"][o] for r in curved]
                curve_rows.append(f"| {model} | {task} | {bits} | {obj} | {len(curved)} | `{o}` | {stats([x[0] for x in rec])} | "
                                  f"{stats([x[1] for x in rec])} | {rec[0][2]:.3f} | {rec[0][3]:.3f} | "
                                  f"{stats([x[4] for x in rec])} |")
    lines += ["", "The loss and the metric as targets: Spearman between each head's measured loss change and its "
              "measured metric change (sign flipped so that both are \"hurts the task\"): "
              + "; ".join(f"{m} {t} {b} bits {a:.2f}" for m, t, b, a in dict(((m, t, b), (m, t, b, a)) for m, t, b, a in agree
                                                                        if a is not None).values())
              + ".", "",
              "## Keep-top curves at 10% of the heads", "",
              "The top 10% of heads by each ordering stay 16-bit, every other head is replaced. Recovery = "
              "(m − m_none) / (m_full − m_none) of the task metric: 1 = the 16-bit model's, 0 = every head replaced; "
              "above 1 the ordering leaves out heads whose replacement raises the metric. Greater-than at 3 bits: "
              "replacing every head *raises* the metric (m_none > m_full), so its recovery has the opposite sign.", "",
              "| model | task | bits | objective | seeds | ordering | recovery at 10% | metric at 10% | 16-bit metric | all replaced | keep-top area |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *curve_rows, ""]
    lines += section("Integrated gradients by its number of steps (IOI, 3 bits, loss objective, seed 0)",
                     "`ig` with K Gauss–Legendre nodes against the 0.7.2 measurement of all 270 heads (192 held-out "
                     "items); completeness: Σ attributions over every targeted weight against the measured "
                     "L(Q(W)) − L(W) on the 128 calibration items with every weight replaced. `atp` is the same run's "
                     "one-pass estimate (K = 1 at α = 0). Time: the IG loop alone, on 2 CPU cores.",
                     ["K", "Spearman `ig`", "Spearman `atp`", "Σ attributions", "measured", "completeness gap", "time"],
                     ig_rows())
    lines += section("The second-order term: `atp-local2` (0.8.3, loss objective)",
                     "`atp-local2` = Σ_i (t_i + ½ t_i²) over `atp-local`'s per-item terms t_i: the Hessian of what "
                     "follows the head's attention block taken as each item's empirical Fisher (the coefficient ½ is "
                     "Taylor's, fixed before any run, not fitted). The same runs give all three estimators (the same "
                     "calibration items of each seed, the same stored measurement), so the difference is paired. "
                     "The best mean in bold. ½Σt² ÷ abs(Σt): how large the second-order term is beside the first-order "
                     "one for the median head. Reliability: split half over the calibration items (mean over seeds), "
                     "`atp-local` / `atp-local2`.",
                     ["task", "bits", "held-out items", "seeds", "`atp`", "`atp-local`", "`atp-local2`",
                      "`atp-local2` − `atp-local` (min … max)", "½Σt² ÷ abs(Σt), median head, seed 0", "reliability",
                      "loss ceiling"], second_order_rows())
    lines += section("IOI's loss at 3 bits against 384 held-out items (0.8.4)",
                     "Every query head measured on 384 held-out items (its first 192 are 0.7.2's measurement, "
                     "the same items in the same batches), the estimators from 128 calibration items per seed or all "
                     "400 (`c400`). The same estimator against the first and the other 192 items shows how much a "
                     "192-item measurement's own sample moves the figure.",
                     ["file", "calibration items", "estimator", "vs 384 items", "vs items 0–191", "vs items 192–383",
                      "ceiling (384)"], ioi384_rows())
    lines += section("The same by layer (IOI, 3 bits, `atp-local` from 400 calibration items)",
                     "Heads grouped by their decoder layer: the estimator against items 0–191 and 192–383, and the "
                     "two halves' measured changes against each other. `analyses/ioi_heavy_items.py` names the "
                     "items behind the first layers' disagreement (`results/faithful_maps_ioi384/heavy_items.json`).",
                     ["layers", "heads", "vs items 0–191", "vs items 192–383", "items 0–191 vs 192–383"],
                     ioi384_band_rows())
    lines += section("Each estimator's own reliability",
                     "Split half over the estimator's calibration items: its per-head values from the even and from the "
                     "odd items (`atp-local`: each item's own term; additive weight-level estimators such as `atp`: the "
                     "statistics of the first half, then of both), their Spearman, the Spearman–Brown reliability for "
                     "all the items and projected for twice as many, beside the Spearman the same file measured "
                     "against the held-out changes (of the loss, or the metric where said).",
                     ["model", "task", "bits", "objective", "file", "estimator", "items", "split half", "reliability",
                      "twice the items", "Spearman measured"], reliability_rows())
    lines += [COMMANDS]
    (REPO / "analyses" / "FAITHFUL_MAPS_METRIC.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
