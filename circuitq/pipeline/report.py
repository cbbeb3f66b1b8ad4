"""The report of a ``circuitq run``: tables (CSV, JSON) and one standalone HTML file with the
results table (method × task × bits), the transfer matrix, the circuit plots and the settings.

Pure table builders (``pivot``, ``transfer_matrix``) and figure builders; ``write_run_outputs``
is the thin writer (every file written to a temporary path and renamed).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from circuitq.artifacts import atomic_file, write_csv, write_json

LEAD = ("kl", "top1_agreement", "nll_per_token")
COLUMNS = ("method", "average_bits", "kl", "top1_agreement", "nll_per_token", "accuracy", "flips_lost",
           "flips_gained", "n_16bit")


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
             f"<p><b>Tasks:</b> {', '.join(cfg['tasks'])}; <b>bits:</b> {', '.join(map(str, cfg['bits']))}; "
             f"<b>16-bit budget:</b> {cfg['mask']['fraction']:.4%} of the weights; group size {cfg['quantize']['group_size']}; "
             f"Hessians: {cfg['quantize']['hessian']}; {cfg['calib']['samples']} calibration and {cfg['eval']['samples']} "
             "held-out items per task.</p>",
             "<p>Lead measures: KL(reference ‖ quantized) per scored token, top-1 agreement with the reference, "
             "and the task NLL per token. Accuracy is MMLU letter log-likelihood accuracy; for a model near "
             "chance (as the default SmolLM2-135M is) accuracy and flips are noise and the first three columns "
             "carry the comparison.</p>",
             ("<p><b>Rows left out (answer not parseable):</b> " + html.escape(json.dumps(doc.get("unparseable_eval_rows")))
              + "</p>" if any((doc.get("unparseable_eval_rows") or {}).values()) else ""),
             f"<p>{res.steps.get('computed', 0)} steps computed, {res.steps.get('reused', 0)} reused; "
             f"{res.seconds:.0f} s in all on {html.escape(str(doc.get('device')))}.</p>"]
    return "".join(lines)


def _circuit_sections(run_dir: Path, res, fraction: float) -> list:
    from circuitq.circuits.compare import compare_dirs
    from circuitq.circuits.plots import head_heatmaps, module_layer_bars, overlap_by_layer

    out = []
    by_bits: dict[int, dict] = {}
    for (task, bits), p in res.score_dirs.items():
        by_bits.setdefault(bits, {})[task] = p
    if not by_bits:
        return out
    bits = max(by_bits)
    tasks = sorted(by_bits[bits])
    if len(tasks) < 2:
        from circuitq.circuits.maps import aggregate
        from circuitq.model.arch import Geometry
        from circuitq.saliency.masks import select_topk
        from circuitq.saliency.files import load_scores

        f = load_scores(by_bits[bits][tasks[0]])
        m = select_topk(f["scores"], fraction)
        cmap = aggregate({k: v.float() for k, v in m.items()}, Geometry(**f["meta"]["geometry"]))
        return [(f"Circuit composition: {tasks[0]} ({bits}-bit TaCQ)", module_layer_bars(cmap, tasks[0]))]
    c = compare_dirs(str(by_bits[bits][tasks[0]]), str(by_bits[bits][tasks[1]]), fraction)
    la, lb = tasks[0], tasks[1]
    g = c["masks"]["global"]
    summary = [{"metric": k, "value": v} for k, v in (
        (f"|{la}| (16-bit weights)", g["a"]), (f"|{lb}|", g["b"]), ("shared", g["intersection"]),
        ("IoU", g["iou"]), ("intersection / min", g["iom"]), ("head Spearman", c["circuits"]["head_spearman"]),
        ("neuron Spearman", c["circuits"]["neuron_spearman"]))]
    sa, sb = c["score_maps"]
    ca, cb = c["mask_maps"]
    out += [(f"Circuits at {bits} bits: {la} vs {lb}", summary), ("Saliency per attention head", head_heatmaps(sa, sb, la, lb)),
            (f"Circuit composition: {la}", module_layer_bars(ca, la)), (f"Circuit composition: {lb}", module_layer_bars(cb, lb)),
            ("Circuit overlap by layer", overlap_by_layer(c["masks"], f"{la} vs {lb}"))]
    out.append(("_png", c))
    return out


def write_run_outputs(run_dir: Path, doc: dict, res) -> None:
    """``results.csv``, ``transfer.csv``, ``results.json``, ``run.json``, ``report.html`` and PNGs."""
    from circuitq.circuits.plots import write_report

    run_dir = Path(run_dir)
    for name, rows in (("results.csv", res.rows), ("transfer.csv", res.transfer)):
        write_csv(run_dir / name, rows)
    write_json(run_dir / "results.json", {"rows": res.rows, "transfer": res.transfer, "config": doc["config"],
                                          "model_note": doc.get("model_note")})
    cfg = doc["config"]
    sections: list = [("About this run", _intro(doc, res))]
    for b in cfg["bits"]:
        for t in cfg["tasks"]:
            sections.append((f"Results: {t}, {b}-bit", pivot(res.rows, b, t)))
    sections.append(("KL by method", kl_figure(res.rows)))
    if len(cfg["tasks"]) > 1 and cfg.get("transfer", True):
        for b in cfg["bits"]:
            sections.append((f"Transfer matrix at {b} bits: KL to the original", transfer_matrix(res.transfer, b, "kl")))
            sections.append((f"Transfer matrix at {b} bits: task NLL", transfer_matrix(res.transfer, b, "nll_per_token")))
    circ = _circuit_sections(run_dir, res, cfg["mask"]["fraction"])
    png = [item for h, item in circ if h == "_png"]
    sections += [(h, item) for h, item in circ if h != "_png"]
    sections.append(("Commands", f"<pre>{html.escape(doc.get('command') or '')}</pre>"
                                 "<p>Rerunning the same command reuses every finished step; change a setting and "
                                 "only the steps that depend on it run again.</p>"))
    sections.append(("Log", f"<pre>{html.escape(chr(10).join(doc.get('log', [])))}</pre>"))
    settings = {k: doc.get(k) for k in ("config", "model", "model_source", "model_note", "model_fingerprint", "device",
                                        "machine", "steps", "seconds", "score_dirs", "unparseable_eval_rows",
                                        "circuitq_version")}
    with atomic_file(run_dir / "report.html", overwrite=True) as tmp:
        write_report(tmp, f"circuitq run: {doc['model']}", sections, settings)
    with atomic_file(run_dir / "report.kl.png", overwrite=True) as tmp:
        kl_png(res.rows, tmp.with_suffix(".png"))
        tmp.with_suffix(".png").replace(tmp)
    if png:
        from circuitq.circuits.compare import write_pngs

        write_pngs(png[0], run_dir / "report.html")
    write_json(run_dir / "run.json", doc)
