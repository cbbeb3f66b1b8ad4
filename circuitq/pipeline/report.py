"""The report of a ``circuitq run``: tables (CSV, JSON) and one standalone HTML file with the
results table (method × task × bits), the transfer matrix, the circuit plots and the settings.

Pure table builders (``pivot``, ``transfer_matrix``) and figure builders; ``write_run_outputs``
is the thin writer (every file written to a temporary path and renamed).
"""
from __future__ import annotations

import html
import importlib.util
import json
from pathlib import Path

import torch

from circuitq.artifacts import atomic_file, write_csv, write_json
from circuitq.circuits.compare import _AsFloat, _select, compare_dirs, write_pngs
from circuitq.circuits.maps import aggregate, read_map
from circuitq.circuits.plots import (
    attribution_heatmaps,
    head_heatmaps,
    module_layer_bars,
    neuron_attribution_rows,
    overlap_by_layer,
    write_report,
)
from circuitq.model.arch import Geometry
from circuitq.saliency.files import load_scores

COLUMNS = ("method", "average_bits", "kl", "top1_agreement", "nll_per_token", "kl_all", "top1_all",
           "task_metric", "task_metric_value", "accuracy",
           "flips_lost", "flips_gained", "n_16bit")


def pivot(rows: list[dict], bits: int, task: str) -> list[dict]:
    """The rows of one (bits, task) as a table: reference first, then by KL (best first)."""
    sel = [r for r in rows if r["bits"] == bits and r["task"] == task]
    ref = [r for r in sel if r["mask_method"] == "-"]
    rest = sorted((r for r in sel if r["mask_method"] != "-"),
                  key=lambda r: (r["kl"] is None, r["kl"] if r["kl"] is not None else 0))
    return [{c: ("—" if r.get(c) is None else r.get(c)) for c in COLUMNS} for r in ref + rest]


def transfer_matrix(transfer: list[dict], bits: int, metric: str = "kl") -> list[dict]:
    """Rows: circuit source; columns: evaluated task; cells: ``metric``."""
    tasks = sorted({t["evaluated_on"] for t in transfer if t["bits"] == bits})
    sources = []
    for t in transfer:
        if t["bits"] == bits and t["circuit"] not in sources:
            sources.append(t["circuit"])
    out = []
    for s in sources:
        row = {"circuit ↓ / evaluated on →": s}
        for task in tasks:
            v = [t[metric] for t in transfer if t["bits"] == bits and t["circuit"] == s and t["evaluated_on"] == task]
            row[task] = v[0] if v and v[0] is not None else "—"
        out.append(row)
    return out


def weighted_mean_diff_ci(a: list[float], b: list[float], w: list[float], n_boot: int = 2000,
                          seed: int = 0) -> tuple[float, float, float]:
    """Token-weighted mean of ``b - a`` over paired items, and its 95% bootstrap interval
    (items resampled with replacement). Worked example: ``a=[1, 1]``, ``b=[2, 2]``, any weights:
    ``(1.0, 1.0, 1.0)``."""
    A, B, W = (torch.tensor(x, dtype=torch.float64) for x in (a, b, w))
    est = float(((B - A) * W).sum() / W.sum())
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(a), (n_boot, len(a)), generator=g)
    ww = W[idx]
    boots = ((B[idx] - A[idx]) * ww).sum(1) / ww.sum(1).clamp(min=1e-30)
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return est, lo, hi


def diagonal_dominance(item_kl: dict, bits: int, tasks: list[str]) -> dict:
    """Is the transfer matrix at ``bits`` diagonal-dominant: on every task, does the task's own
    TaCQ circuit give a lower KL than every other task's circuit, beyond the item-level 95%
    bootstrap interval? ``item_kl``: ``{(bits, label, task): (per-item KL, per-item tokens)}``
    with labels ``tacq`` (own) and ``tacq[OTHER]``. Returns ``{"dominant": bool | None,
    "pairs": [{"task", "other", "own_kl", "other_kl", "margin", "ci"}]}`` where ``margin`` is
    other − own (positive = own circuit better); ``dominant`` is None when a pair is missing."""
    pairs, ok = [], True
    for t in tasks:
        own = item_kl.get((bits, "tacq", t))
        for o in tasks:
            if o == t:
                continue
            other = item_kl.get((bits, f"tacq[{o}]", t))
            if own is None or other is None or None in own[0] or None in other[0]:
                return {"dominant": None, "pairs": pairs}
            w = own[1]
            est, lo, hi = weighted_mean_diff_ci(own[0], other[0], w)
            own_kl = sum(k * n for k, n in zip(own[0], w)) / sum(w)
            pairs.append({"task": t, "other": o, "own_kl": own_kl, "other_kl": own_kl + est, "margin": est,
                          "ci": [lo, hi], "beyond_noise": lo > 0})
            ok = ok and lo > 0
    return {"dominant": ok if pairs else None, "pairs": pairs}


def dominance_html(dom: dict, bits: int) -> str:
    """One paragraph and table stating the verdict (computed, never typed)."""
    if dom["dominant"] is None:
        return f"<p>{bits}-bit: not enough transfer jobs (or per-item KL) to decide.</p>"
    verdict = ("<b>yes</b>: every task's own circuit beats every other task's circuit on that task, beyond the "
               "items' 95% bootstrap interval" if dom["dominant"] else
               "<b>no</b>: on at least one task another task's circuit is as good or better")
    rows = "".join(f"<tr><td>{html.escape(p['task'])}</td><td>{html.escape(p['other'])}</td><td>{p['own_kl']:.4f}</td>"
                   f"<td>{p['other_kl']:.4f}</td><td>{p['margin']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]</td>"
                   f"<td>{'yes' if p['beyond_noise'] else 'no'}</td></tr>" for p in dom["pairs"])
    return (f"<p>Diagonal-dominant at {bits} bits: {verdict}. The interval is over evaluation items of this run; "
            "the spread over calibration seeds is in <code>analyses/</code>.</p><table><tr><th>evaluated on</th>"
            "<th>other circuit</th><th>own KL</th><th>other KL</th><th>margin (other − own) [95% CI]</th>"
            f"<th>beyond noise</th></tr>{rows}</table>")


def kl_figure(rows: list[dict]):
    """KL(reference ‖ quantized) by method, one panel per bit width, bars grouped by task (plotly)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    bits = sorted({r["bits"] for r in rows})
    tasks = sorted({r["task"] for r in rows})
    fig = make_subplots(rows=1, cols=len(bits), subplot_titles=[f"{b}-bit" for b in bits])
    for i, b in enumerate(bits, 1):
        for t in tasks:
            sel = [r for r in rows if r["bits"] == b and r["task"] == t and r["kl"] is not None and r["mask_method"] != "-"]
            fig.add_trace(go.Bar(name=t, x=[r["method"] for r in sel], y=[r["kl"] for r in sel],
                                 legendgroup=t, showlegend=i == 1), 1, i)
        fig.update_yaxes(title_text="KL (nats/token)", type="log", row=1, col=i)
    fig.update_layout(barmode="group", title="KL divergence to the unquantized model (lower is better)", height=420)
    return fig


def kl_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = sorted({r["bits"] for r in rows})
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(bits), figsize=(6 * len(bits), 4.5), constrained_layout=True, squeeze=False)
    for ax, b in zip(axes[0], bits):
        methods = sorted({r["method"] for r in rows if r["bits"] == b and r["mask_method"] != "-"})
        width = 0.8 / max(len(tasks), 1)
        for k, t in enumerate(tasks):
            vals = []
            for m in methods:
                v = [r["kl"] for r in rows if r["bits"] == b and r["task"] == t and r["method"] == m]
                vals.append(v[0] if v and v[0] is not None else float("nan"))
            ax.bar([i + k * width for i in range(len(methods))], vals, width, label=t)
        ax.set_xticks([i + width * (len(tasks) - 1) / 2 for i in range(len(methods))], methods, rotation=40, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"{b}-bit: KL to the original (lower is better)")
        ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _intro(doc: dict, res) -> str:
    cfg = doc["config"]
    note = doc.get("model_note") or ""
    lines = [f"<p><b>Model:</b> {html.escape(str(doc['model']))} ({html.escape(str(doc['model_source']))})"
             + (f" — <b>{html.escape(note)}</b>" if note else "") + "</p>",
             f"<p><b>Tasks:</b> {html.escape(', '.join(cfg['tasks']))}; <b>bits:</b> {html.escape(', '.join(map(str, cfg['bits'])))}; "
             f"<b>16-bit budget:</b> {cfg['mask']['fraction']:.4%} of the weights; group size {cfg['quantize']['group_size']}; "
             f"Hessians: {cfg['quantize']['hessian']}; {cfg['calib']['samples']} calibration and {cfg['eval']['samples']} "
             "held-out items per task.</p>",
             "<p>Lead measures: KL(reference ‖ quantized) per scored token, top-1 agreement with the reference, "
             "and the task NLL per token. Accuracy is MMLU letter log-likelihood accuracy; for a model near "
             "chance (as the default SmolLM2-135M is) accuracy and flips are noise and the first three columns "
             "carry the comparison.</p>",
             "<p><b>Items:</b> " + "; ".join(
                 f"{html.escape(t)}: evaluated on {html.escape(v['eval'])}, calibrated on {html.escape(v['calib'])}"
                 + (f" ({html.escape(v['note'])})" if v.get("note") else "")
                 for t, v in (doc.get("data_sources") or {}).items()) + ".</p>",
             ("<p><b>Rows left out (answer not parseable):</b> " + html.escape(json.dumps(doc.get("unparseable_eval_rows")))
              + "</p>" if any((doc.get("unparseable_eval_rows") or {}).values()) else ""),
             f"<p>{res.steps.get('computed', 0)} steps computed, {res.steps.get('reused', 0)} reused; "
             f"{res.seconds:.0f} s in all on {html.escape(str(doc.get('device')))}.</p>"]
    return "".join(lines)


def faithfulness_note(task: str, rep: dict | None, estimator: str, objective: str = "nll") -> str:
    """What is known about how faithful ``estimator``'s map of ``task`` is, for the caption beside it
    (``objective``: the map's; ``metric`` reads the Spearman against the measured metric change)."""
    if not rep:
        return (f"<p>Faithfulness of this map on {html.escape(task)}: not measured in this run (add "
                "<code>--faithfulness heads</code>, about 24 evaluation passes per task, or run "
                "<code>circuitq faithfulness --all-units --curve</code> on its scores).</p>")
    metric = objective == "metric" and rep.get("spearman_metric")
    rho = rep.get("spearman_metric") if metric else rep.get("spearman", {})
    parts = ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in rho.items())
    n, kind = len(rep.get("units", [])), html.escape(str(rep.get("units_kind")))
    pick = html.escape(str(rep.get("units_measured", "top by score + random")))
    what = f"measured change of {html.escape(str(rep.get('metric')))}, sign flipped" if metric else "measured loss change"
    return (f"<p>Measured faithfulness on {html.escape(task)} (this run): Spearman(predicted, {what}) "
            f"over {n} {kind} units ({pick}), each replaced alone by its {html.escape(str(rep.get('ablation')))}d "
            f"value: {parts}. This map draws <b>{html.escape(estimator)}</b>"
            + (f"; the most faithful here is <b>{html.escape(str(rep.get('best_estimator')))}</b>." if
               rep.get("best_estimator") else ".") + "</p>")


def _attribution_sections(res, bits: int) -> list:
    maps = getattr(res, "maps", None) or {}
    if not maps:
        return []
    loaded = {t: read_map(Path(p) / "map.safetensors") for t, p in maps.items()}
    faith = getattr(res, "faithfulness", None) or {}
    caption = ("<p>Attribution patching (<b>atp</b>): per head, Σ over the calibration items of "
               f"G · (Q(W) − W) over the head's weights (q rows and o columns; k/v shared by GQA), Q(W) the "
               f"mask-free {bits}-bit quantizer: the predicted change of the summed task loss when only that "
               "head is quantized. Signed, on a diverging scale: red heads are predicted to hurt the task when "
               "quantized, blue ones to help it. Unlike the selection mass below, it predicts what a head does "
               "(docs/circuits.md has the measurements).</p>")
    if any(m[1].get("objective") == "metric" for m in loaded.values()):
        caption += ("<p><b>atp of −metric</b> (<code>--head-maps atp-metric</code>): for a task with a differentiable "
                    "metric, G is the gradient of minus that metric (IOI's logit difference, greater-than's probability "
                    "difference, capitals' margin), so red heads are predicted to lower the task's own metric when "
                    "quantized.</p>")
    caption += "".join(faithfulness_note(t, faith.get(t), "atp", m[1].get("objective", "nll")) for t, m in loaded.items())
    out = [("Attribution patching per attention head", caption),
           ("", attribution_heatmaps([(f"{t}: atp{' of −metric' if m[1].get('objective') == 'metric' else ''} at "
                                       f"{m[1].get('bits')} bits", m[0]) for t, m in loaded.items()],
                                         "Attribution patching per attention head (predicted Δ task loss when quantized)"))]
    for t, (m, _) in loaded.items():
        out.append((f"MLP neurons by attribution: {t}", neuron_attribution_rows(m)))
    return out


def _circuit_sections(run_dir: Path, res, fraction: float) -> list:
    out = []
    by_bits: dict[int, dict] = {}
    for (task, bits), p in res.score_dirs.items():
        by_bits.setdefault(bits, {})[task] = p
    if not by_bits:
        return out
    bits = max(by_bits)
    tasks = sorted(by_bits[bits])
    out += [(h, item) for h, item in _attribution_sections(res, bits)]
    if len(tasks) < 2:
        f = load_scores(by_bits[bits][tasks[0]], lazy=True)
        m = _select(f["scores"], fraction)
        cmap = aggregate(_AsFloat(m), Geometry(**f["meta"]["geometry"]))
        return out + [(f"Circuit composition: {tasks[0]} ({bits}-bit TaCQ)", module_layer_bars(cmap, tasks[0]))]
    c = compare_dirs(str(by_bits[bits][tasks[0]]), str(by_bits[bits][tasks[1]]), fraction)
    la, lb = tasks[0], tasks[1]
    g = c["masks"]["global"]
    summary = [{"metric": k, "value": v} for k, v in (
        (f"|{la}| (16-bit weights)", g["a"]), (f"|{lb}|", g["b"]), ("shared", g["intersection"]),
        ("IoU", g["iou"]), ("intersection / min", g["iom"]), ("head Spearman", c["circuits"]["head_spearman"]),
        ("neuron Spearman", c["circuits"]["neuron_spearman"]))]
    sa, sb = c["score_maps"]
    ca, cb = c["mask_maps"]
    out += [(f"Circuits at {bits} bits: {la} vs {lb}", summary), ("TaCQ selection mass per attention head (what the mask keeps; not a prediction of what a head "
             "does: use the attribution map above)", head_heatmaps(sa, sb, la, lb)),
            (f"Circuit composition: {la}", module_layer_bars(ca, la)), (f"Circuit composition: {lb}", module_layer_bars(cb, lb)),
            ("Circuit overlap by layer", overlap_by_layer(c["masks"], f"{la} vs {lb}"))]
    out.append(("_png", c))
    return out


def faithfulness_rows(rep: dict) -> list[dict]:
    """One table per task of a run's faithfulness check: per estimator Spearman(predicted,
    measured) over the units, then the circuit-vs-random contrasts (loss change, nats/token)."""
    rows = [{"what": f"Spearman(predicted by {k}, measured) over {len(rep['units'])} {rep.get('units_kind')} units",
             "value": v} for k, v in rep["spearman"].items()]
    rows.append({"what": "best estimator", "value": rep["best_estimator"]})
    if rep.get("noise_ceiling"):
        rows.append({"what": "noise ceiling: Spearman a perfect predictor would reach (split-half reliability, √)",
                     "value": rep["noise_ceiling"]["ceiling"]})
    for stat, d in ((rep.get("robust") or {}).get("statistics") or {}).items():
        what = "median item change" if stat == "median" else f"{rep['robust']['trim']:.0%}-trimmed mean item change"
        rows += [{"what": f"Spearman(predicted by {k}, measured as each unit's {what}; robust to a few heavy items)",
                  "value": v} for k, v in d["spearman"].items()]
        if d.get("noise_ceiling"):
            rows.append({"what": f"noise ceiling of the {what}", "value": d["noise_ceiling"]["ceiling"]})
    for k, a in (rep.get("attenuation") or {}).items():
        rows.append({"what": f"attainable Spearman for {k} with both samples this noisy (√ of the two reliabilities); "
                             f"{k} corrected for them: {a['corrected']:.3f}", "value": a["attainable"]})
    for k, r in (rep.get("estimator_reliability") or {}).items():
        if r:
            rows.append({"what": f"reliability of {k} over its {r['items']} calibration items (split half, "
                                 f"Spearman–Brown; twice the items: {r['reliability_doubled']:.3f})",
                         "value": r["reliability"]})
    for label, c in rep["contrasts"].items():
        rows.append({"what": f"loss change, {label} {rep.get('ablation')}d", "value": c["loss_change"]})
        if c.get("metric_change") is not None:
            rows.append({"what": f"metric change, {label}", "value": c["metric_change"]})
    rows.append({"what": "only circuit / only random (loss change)", "value": rep["only_circuit_over_only_random"]})
    if rep.get("completeness"):
        rows.append({"what": f"ig completeness gap ({rep['completeness'].get('ig_steps')} steps)",
                     "value": rep["completeness"]["ig"]["gap"]})
        if rep["completeness"].get("path_diagnosis"):
            rows.append({"what": "ig path: ∫|dL/dα| over |L(Q(W)) − L(W)| (cancellation along the path)",
                         "value": rep["completeness"]["path_diagnosis"]["cancellation"]})
    for o, modes in ((rep.get("curves") or {}).get("orderings") or {}).items():
        for mode, c in modes.items():
            rows.append({"what": f"faithfulness curve area, units ordered by {o}, {mode}", "value": c["area"]})
    return rows


def missing_plot_packages() -> list[str]:
    """The plotting packages (the ``plots`` extra) that are not installed."""
    return [m for m in ("plotly", "matplotlib") if importlib.util.find_spec(m) is None]


def write_run_outputs(run_dir: Path, doc: dict, res) -> None:
    """``results.csv``, ``transfer.csv``, ``results.json``, ``run.json``, ``report.html`` and PNGs.
    The tables and ``run.json`` come first; without plotly/matplotlib (the ``plots`` extra) the
    report is written without figures and says so."""
    run_dir = Path(run_dir)
    for name, rows in (("results.csv", res.rows), ("transfer.csv", res.transfer)):
        write_csv(run_dir / name, rows)
    cfg = doc["config"]
    if len(cfg["tasks"]) > 1 and cfg.get("transfer", True):
        doc["diagonal_dominance"] = {str(b): diagonal_dominance(res.item_kl, b, list(cfg["tasks"])) for b in cfg["bits"]}
    write_json(run_dir / "results.json", {"rows": res.rows, "transfer": res.transfer, "config": doc["config"],
                                          "model_note": doc.get("model_note"),
                                          "diagonal_dominance": doc.get("diagonal_dominance")})
    sections: list = [("About this run", _intro(doc, res))]
    for b in cfg["bits"]:
        for t in cfg["tasks"]:
            sections.append((f"Results: {t}, {b}-bit", pivot(res.rows, b, t)))
    missing = missing_plot_packages()
    no_figs = (f"<p>Figures skipped: {', '.join(missing)} not installed "
               "(<code>pip install 'circuitq[plots]'</code>): the figures and circuit maps are left out; "
               "results.csv, transfer.csv and run.json are complete.</p>") if missing else None
    if missing:
        print(f"[circuitq run] report without figures: {', '.join(missing)} not installed "
              "(pip install 'circuitq[plots]')", flush=True)
    sections.append(("KL by method", no_figs or kl_figure(res.rows)))
    if len(cfg["tasks"]) > 1 and cfg.get("transfer", True):
        for b in cfg["bits"]:
            sections.append((f"Transfer matrix at {b} bits: KL to the original", transfer_matrix(res.transfer, b, "kl")))
            sections.append((f"Transfer matrix at {b} bits: task NLL", transfer_matrix(res.transfer, b, "nll_per_token")))
            if any(t.get("kl_all") is not None for t in res.transfer if t["bits"] == b):
                sections.append((f"Transfer matrix at {b} bits: KL over every token (MMLU)",
                                 transfer_matrix(res.transfer, b, "kl_all")))
            sections.append((f"Task specificity at {b} bits", dominance_html(doc["diagonal_dominance"][str(b)], b)))
    for t, rep in (getattr(res, "faithfulness", None) or {}).items():
        sections.append((f"Faithfulness: {t}, {rep.get('bits')}-bit circuit vs real ablation", faithfulness_rows(rep)))
    circ = [("Circuits", no_figs)] if missing else _circuit_sections(run_dir, res, cfg["mask"]["fraction"])
    png = [item for h, item in circ if h == "_png"]
    sections += [(h, item) for h, item in circ if h != "_png"]
    sections.append(("Commands", f"<pre>{html.escape(doc.get('command') or '')}</pre>"
                                 "<p>Rerunning the same command reuses every finished step; change a setting and "
                                 "only the steps that depend on it run again.</p>"))
    sections.append(("Log", f"<pre>{html.escape(chr(10).join(doc.get('log', [])))}</pre>"))
    settings = {k: doc.get(k) for k in ("config", "model", "model_source", "model_note", "model_fingerprint", "device",
                                        "machine", "steps", "seconds", "score_dirs", "unparseable_eval_rows",
                                        "circuitq_version")}
    write_json(run_dir / "run.json", doc)   # before the figures: a failing plot never loses the record
    with atomic_file(run_dir / "report.html", overwrite=True) as tmp:
        write_report(tmp, f"circuitq run: {doc['model']}", sections, settings)
    if missing:
        return
    with atomic_file(run_dir / "report.kl.png", overwrite=True) as tmp:
        kl_png(res.rows, tmp.with_suffix(".png"))
        tmp.with_suffix(".png").replace(tmp)
    if png:
        write_pngs(png[0], run_dir / "report.html")
