"""Head maps against a measurement robust to a few heavy items (issue 23, 0.8.5).

``circuitq faithfulness`` (0.8.5 on) keeps every unit's change on every held-out item
(``measured_items``). The task loss is their mean, and on IOI's first layers a handful of items
that move by nats carry it (0.8.4, ``results/faithful_maps_ioi384/``). This script ranks the
estimators stored in a set of faithfulness JSONs (one per calibration seed, one measurement)
against three statistics of the same per-item changes:

* ``mean``: the task loss's change (the figure every earlier table reports);
* ``median``: each unit's median item change;
* ``trimmed``: the mean without the lowest and highest 10% of items.

For each: Spearman over all units per estimator (mean ± sd over the files [lowest]), by layer band,
against the task metric's change too (sign flipped), and the statistic's own split-half ceiling
(even vs odd items, √ Spearman–Brown). ``matched``: an estimator with per-item terms (``atp-local``,
``atp-local2``) summarised by a robust statistic over its *calibration* items (the file's
``robust.statistics.*.predicted_matched``, circuitq ≥ 0.8.5 at commit 78f923f), ranked against each
measurement. Nothing is tuned: every number is recomputed from the stored vectors.

    .venv/bin/python analyses/faithful_maps_robust.py \\
        --files analyses/results/faithful_maps_robust/ioi-3bit-e384-s?.json \\
        --out analyses/results/faithful_maps_robust/table

Cost: seconds (no model is loaded).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from common import REPO, machine

sys.path.insert(0, str(REPO))
from circuitq.artifacts import write_json  # noqa: E402
from circuitq.circuits.faithfulness import ITEM_STATISTICS, item_statistic, spearman  # noqa: E402

STATS = ("mean",) + ITEM_STATISTICS


def layer(label: str) -> int:
    return int(label.split(".")[0][1:])


def bands(n_layers: int) -> list[tuple[int, int]]:
    """The first three layers, the rest of the first third, the middle, the last third."""
    third = n_layers // 3
    return [(0, 3), (3, third), (third, 2 * third), (2 * third, n_layers)]


def measured(u: dict, stat: str, field: str = "measured_items", part: slice = slice(None)) -> float:
    """A unit's measured change by ``stat`` over the items in ``part`` (the loss, or with
    ``field="measured_metric_items"`` the metric, sign flipped so that "hurts" is positive)."""
    x = u[field][part]
    sign = -1.0 if field == "measured_metric_items" else 1.0
    return sign * (sum(x) / len(x) if stat == "mean" else item_statistic(x, stat))


def ceiling(us: list[dict], stat: str, field: str = "measured_items") -> float:
    """√ Spearman–Brown of the statistic on the even against the odd items."""
    r = spearman([measured(u, stat, field, slice(0, None, 2)) for u in us],
                 [measured(u, stat, field, slice(1, None, 2)) for u in us])
    rel = 2 * r / (1 + r) if r == r and r > -1 else float("nan")
    return math.sqrt(rel) if rel == rel and rel > 0 else 0.0


def with_items(doc: dict, path: Path) -> dict:
    """``doc`` with every unit's per-item changes, taken from the file it reused (``measured_from``,
    relative to the working directory, to the file's folder or to the repository's parent) when it
    does not carry them itself (the stored seeds keep them once, in the measurement's own file)."""
    us = doc["units"]
    if all(u.get("measured_items") is not None for u in us) or not doc.get("measured_from"):
        return doc
    src = Path(doc["measured_from"])
    for cand in (src, path.parent / src.name, REPO.parent / src):
        if cand.exists():
            items = {u["label"]: u for u in json.loads(cand.read_text())["units"]}
            for u in us:
                for f in ("measured_items", "measured_metric_items"):
                    u.setdefault(f, items[u["label"]].get(f))
            return doc
    raise SystemExit(f"{path}: its per-item changes are in {src}, which is not here")


def one_file(doc: dict) -> dict:
    """Per statistic: Spearman per estimator overall and per band, against loss and metric."""
    us = doc["units"]
    if any(u.get("measured_items") is None for u in us):
        raise SystemExit(f"{doc.get('scores')}: no per-item changes (measured before circuitq 0.8.5)")
    n_layers = 1 + max(layer(u["label"]) for u in us)
    ests = list(us[0]["predicted"])
    metric = all(u.get("measured_metric_items") is not None for u in us)
    out: dict = {}
    for stat in STATS:
        d: dict = {"all": {}, "bands": {}, "metric": {}}
        y = [measured(u, stat) for u in us]
        for e in ests:
            d["all"][e] = spearman([u["predicted"][e] for u in us], y)
            if metric:
                d["metric"][e] = spearman([u["predicted"][e] for u in us],
                                          [measured(u, stat, "measured_metric_items") for u in us])
        robust = (doc.get("robust") or {}).get("statistics") or {}
        for lo, hi in bands(n_layers):
            sub = [u for u in us if lo <= layer(u["label"]) < hi]
            ys = [measured(u, stat) for u in sub]
            b = {e: spearman([u["predicted"][e] for u in sub], ys) for e in ests}
            for summ in ITEM_STATISTICS:
                for e, vals in ((robust.get(summ) or {}).get("predicted_matched") or {}).items():
                    b[f"{e}, {summ} of its items"] = spearman([vals[u["label"]] for u in sub], ys)
            d["bands"][f"{lo}-{hi - 1}"] = b | {"ceiling": ceiling(sub, stat)}
        d["ceiling"] = ceiling(us, stat)
        if metric:
            d["ceiling_metric"] = ceiling(us, stat, "measured_metric_items")
        # estimators with per-item terms summarised over their calibration items by each statistic
        d["matched"] = {}
        for summ in ITEM_STATISTICS:
            pm = ((((doc.get("robust") or {}).get("statistics") or {}).get(summ) or {}).get("predicted_matched") or {})
            for e, vals in pm.items():
                d["matched"][f"{e}, {summ} of its items"] = spearman([vals[u["label"]] for u in us], y)
        out[stat] = d
    return out


def brown(rel: float, factor: float) -> float:
    """Spearman–Brown: the reliability of ``factor`` times the items."""
    return factor * rel / (1 + (factor - 1) * rel)


def attenuation_rows(docs: list[dict]) -> tuple[list[str], dict]:
    """The mean's Spearman corrected for both samples' noise (``circuits.faithfulness.attenuation``,
    recomputed from each file's reliabilities) and what it projects for more calibration (K) and
    held-out (M) items: ``corrected · √(rel_e(K) · rel_m(M))``, with Spearman–Brown for both."""
    ests = [e for e in docs[0]["spearman"] if all((d.get("estimator_reliability") or {}).get(e) and e in d["spearman"]
                                                  for d in docs)]
    out: dict = {}
    lines = ["", "The mean, corrected for both samples' noise (Spearman / √(reliability of the estimator's calibration "
             "items × of the held-out items)), and projected (Spearman–Brown) for K calibration and M held-out items:", "",
             "| estimator | observed | attainable | corrected | K 400, M 384 | K 400, M 768 | K 1200, M 768 | K ∞, M 384 | K ∞, M 768 |",
             "| --- |" + " --- |" * 8]
    for e in ests:
        rows = []
        for d in docs:
            re_, rm = d["estimator_reliability"][e]["reliability"], d["noise_ceiling"]["reliability"]
            k0, m0 = d["calib_items"], d["items"]
            att = math.sqrt(re_ * rm)
            cor = d["spearman"][e] / att
            proj = {(k, m): cor * math.sqrt((1.0 if k == math.inf else brown(re_, k / k0)) * brown(rm, m / m0))
                    for k, m in ((400, 384), (400, 768), (1200, 768), (math.inf, 384), (math.inf, 768))}
            rows.append((d["spearman"][e], att, cor, proj))
        out[e] = {"observed": summary([r[0] for r in rows]), "attainable": summary([r[1] for r in rows]),
                  "corrected": summary([r[2] for r in rows]),
                  "projected": {f"K{k}-M{m}": summary([r[3][(k, m)] for r in rows]) for k, m in rows[0][3]}}
        lines.append(f"| `{e}` | " + " | ".join(fmt(out[e][x]) for x in ("observed", "attainable", "corrected")) + " | "
                     + " | ".join(f"{v['mean']:.3f}" for v in out[e]["projected"].values()) + " |")
    lines += ["", "(Projections assume the estimator's per-item terms and the measurement's item changes are "
              "exchangeable samples; the corrected figure itself carries the reliabilities' sampling noise.)"]
    return lines, out


def summary(xs: list[float]) -> dict:
    xs = [x for x in xs if x == x]
    return {"mean": statistics.fmean(xs) if xs else float("nan"), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs) if xs else float("nan"), "n": len(xs)}


def fmt(s: dict) -> str:
    return f"{s['mean']:.3f}" if s["n"] == 1 else f"{s['mean']:.3f} ± {s['sd']:.3f} [{s['min']:.3f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", nargs="+", required=True, help="faithfulness JSONs of one measurement (one per seed)")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    a = ap.parse_args(argv)
    docs = [with_items(json.loads(Path(f).read_text()), Path(f)) for f in a.files]
    keys = {json.dumps(d.get("measurement"), sort_keys=True) for d in docs}
    if len(keys) != 1:
        raise SystemExit("the files measured different things; give the seeds of one measurement")
    per = [one_file(d) for d in docs]
    ests = [e for e in docs[0]["units"][0]["predicted"] if all(e in d["units"][0]["predicted"] for d in docs)]
    res: dict = {"files": [str(f) for f in a.files], "units": len(docs[0]["units"]), "items": docs[0]["items"],
                 "task": docs[0]["task"], "machine": machine(), "statistics": {}}
    lines = [f"# {docs[0]['task']}: Spearman over all {res['units']} {docs[0].get('units_kind')} units against three "
             f"statistics of the same per-item changes ({res['items']} held-out items; {len(docs)} file(s))", "",
             "| estimator | " + " | ".join(STATS) + " |", "| --- |" + " --- |" * len(STATS)]
    for e in ests:
        lines.append(f"| `{e}` | " + " | ".join(fmt(summary([p[s]["all"][e] for p in per])) for s in STATS) + " |")
    for e in sorted({k for p in per for k in p["median"]["matched"]}):
        name, summ = e.split(", ", 1)
        lines.append(f"| `{name}`, {summ} | "
                     + " | ".join(fmt(summary([p[s]["matched"].get(e, float("nan")) for p in per])) for s in STATS) + " |")
    lines.append("| ceiling (split half, √ Spearman–Brown) | " + " | ".join(f"{per[0][s]['ceiling']:.3f}" for s in STATS) + " |")
    if per[0]["mean"]["metric"]:
        lines += ["", f"Against the task metric's change ({docs[0].get('metric')}, sign flipped):", "",
                  "| estimator | " + " | ".join(STATS) + " |", "| --- |" + " --- |" * len(STATS)]
        for e in ests:
            lines.append(f"| `{e}` | " + " | ".join(fmt(summary([p[s]["metric"][e] for p in per])) for s in STATS) + " |")
        lines.append("| ceiling | " + " | ".join(f"{per[0][s]['ceiling_metric']:.3f}" for s in STATS) + " |")
    att_lines, res["attenuation"] = attenuation_rows(docs)
    lines += att_lines
    bands_ = list(per[0]["mean"]["bands"])
    lines += ["", "By layer band (mean over the files; ceiling in brackets):", "",
              "| estimator, statistic | " + " | ".join(f"layers {b}" for b in bands_) + " |",
              "| --- |" + " --- |" * len(bands_)]
    band_rows = [k for k in per[0]["mean"]["bands"][bands_[0]] if k != "ceiling"
                 and all(k in p["mean"]["bands"][bands_[0]] for p in per)]
    for s in STATS:
        for e in band_rows:
            lines.append(f"| `{e.split(', ')[0]}`{', ' + e.split(', ', 1)[1] if ', ' in e else ''}, {s} | " + " | ".join(
                f"{summary([p[s]['bands'][b][e] for p in per])['mean']:.3f} ({per[0][s]['bands'][b]['ceiling']:.3f})"
                for b in bands_) + " |")
    for s in STATS:
        res["statistics"][s] = {"all": {e: summary([p[s]["all"][e] for p in per]) for e in ests},
                                "matched": {e: summary([p[s]["matched"].get(e, float("nan")) for p in per])
                                            for e in per[0][s]["matched"]},
                                "metric": {e: summary([p[s]["metric"][e] for p in per]) for e in ests
                                           if e in per[0][s]["metric"]},
                                "ceiling": per[0][s]["ceiling"], "ceiling_metric": per[0][s].get("ceiling_metric"),
                                "bands": {b: {k: summary([p[s]["bands"][b][k] for p in per]) for k in per[0][s]["bands"][b]
                                              if all(k in p[s]["bands"][b] for p in per)}
                                          for b in bands_}}
    m = res["machine"]
    lines += ["", f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}; files: "
              + ", ".join(Path(f).name for f in a.files)]
    write_json(Path(a.out + ".json"), res)
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
