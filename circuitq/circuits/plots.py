"""Circuit plots: plotly figures (interactive, for HTML) and matplotlib PNGs of the same data.

Every function takes the maps from ``circuits.py`` and returns a figure; writing is the
caller's business (``write_report`` below is the thin driver for ``circuitq compare``).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from circuitq.circuits.maps import CircuitMap, signed
from circuitq.model.arch import MODULE_TYPES


def _share(m: torch.Tensor) -> torch.Tensor:
    s = m.sum()
    return m / s if s > 0 else m


def head_heatmaps(a: CircuitMap, b: CircuitMap, label_a: str, label_b: str, what: str = "TaCQ selection"):
    """Layer × head share of a non-negative score's mass (``what``) for both tasks and their
    difference (plotly)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ha, hb = _share(a.head), _share(b.head)
    fig = make_subplots(rows=1, cols=3, subplot_titles=(label_a, label_b, f"{label_a} − {label_b}"),
                        horizontal_spacing=0.08)
    vmax = float(max(ha.max(), hb.max()))
    for col, (z, cs, zmin, zmax) in enumerate(((ha, "Viridis", 0, vmax), (hb, "Viridis", 0, vmax),
                                               (ha - hb, "RdBu", -float((ha - hb).abs().max()), float((ha - hb).abs().max()))), 1):
        fig.add_trace(go.Heatmap(z=z.tolist(), colorscale=cs, zmin=zmin, zmax=zmax, showscale=col != 1,
                                 colorbar=dict(x=0.64 if col == 2 else 1.0, len=0.9),
                                 hovertemplate="layer %{y}, head %{x}: %{z:.4f}<extra></extra>"), 1, col)
        fig.update_xaxes(title_text="query head", row=1, col=col)
        fig.update_yaxes(title_text="layer", row=1, col=col)
    fig.update_layout(title=f"Share of {what} mass per attention head (what a mask by it keeps)", height=520)
    return fig


def attribution_heatmaps(maps: list[tuple[str, CircuitMap]], title: str):
    """Layer × head maps of a signed attribution, one panel per label, on a diverging scale centred
    at zero per panel (red: replacing the head is predicted to raise the task loss; blue: to lower
    it). Values are the attribution itself, not shares, so a head that helps when quantized shows."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(maps), subplot_titles=[label for label, _ in maps], horizontal_spacing=0.1)
    n = len(maps)
    for col, (label, m) in enumerate(maps, 1):
        z = m.head.float()
        vmax = float(z.abs().max()) or 1.0
        fig.add_trace(go.Heatmap(z=z.tolist(), colorscale="RdBu_r", zmid=0, zmin=-vmax, zmax=vmax,
                                 colorbar=dict(x=col / n - 0.02 if col < n else 1.0, len=0.9, thickness=12),
                                 hovertemplate="layer %{y}, head %{x}: %{z:.3g}<extra></extra>"), 1, col)
        fig.update_xaxes(title_text="query head", row=1, col=col)
        fig.update_yaxes(title_text="layer", row=1, col=col)
    fig.update_layout(title=title, height=520)
    return fig


def neuron_attribution_rows(m: CircuitMap, n: int = 15) -> list[dict]:
    """The ``n`` MLP neurons with the largest predicted loss increase and the ``n`` with the largest
    predicted decrease (signed attribution), as table rows."""
    flat = m.neuron.flatten()
    k = min(n, flat.numel())
    width = m.neuron.shape[1]
    rows = []
    for label, (vals, idx) in (("raises the loss", torch.topk(flat, k)), ("lowers the loss", torch.topk(-flat, k))):
        for v, i in zip(vals.tolist(), idx.tolist()):
            rows.append({"predicted effect of quantizing": label, "layer": i // width, "neuron": i % width,
                         "attribution": v if label == "raises the loss" else -v})
    return rows


def module_layer_bars(m: CircuitMap, label: str):
    """Share of the circuit's weights by module type and layer (stacked bars, plotly)."""
    import plotly.graph_objects as go

    share = _share(m.layer_module)
    fig = go.Figure([go.Bar(name=t, x=list(range(share.shape[0])), y=share[:, j].tolist())
                     for j, t in enumerate(MODULE_TYPES)])
    fig.update_layout(barmode="stack", title=f"{label}: share of salient weights by layer and module type",
                      xaxis_title="layer", yaxis_title="share of circuit", height=380)
    return fig


def overlap_by_layer(cmp: dict, label: str):
    """IoU and intersection-over-minimum per layer (plotly)."""
    import plotly.graph_objects as go

    layers = list(cmp["per_layer"])
    fig = go.Figure([go.Scatter(x=layers, y=[cmp["per_layer"][i][k] for i in layers], mode="lines+markers", name=k.upper())
                     for k in ("iou", "iom")])
    fig.update_layout(title=f"Circuit overlap by layer ({label})", xaxis_title="layer", yaxis_title="overlap",
                      yaxis_range=[0, 1], height=360)
    return fig


def heatmap_png(a: CircuitMap, b: CircuitMap, label_a: str, label_b: str, path: Path) -> None:
    """The head heatmaps as a PNG (matplotlib, no browser needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if signed(a) or signed(b):   # an attribution: the values themselves, each centred at zero
        za, zb = a.head.numpy(), b.head.numpy()
        va, vb = float(abs(za).max()) or 1.0, float(abs(zb).max()) or 1.0
        panels = [(za, label_a, dict(cmap="RdBu_r", vmin=-va, vmax=va)), (zb, label_b, dict(cmap="RdBu_r", vmin=-vb, vmax=vb))]
        title, width = "Attribution per attention head (red: quantizing it raises the task loss)", 10
    else:
        ha, hb = _share(a.head).numpy(), _share(b.head).numpy()
        d = ha - hb
        vmax, vd = max(ha.max(), hb.max()), abs(d).max()
        panels = [(ha, label_a, dict(cmap="viridis", vmin=0, vmax=vmax)), (hb, label_b, dict(cmap="viridis", vmin=0, vmax=vmax)),
                  (d, f"{label_a} − {label_b}", dict(cmap="RdBu", vmin=-vd, vmax=vd))]
        title, width = "Share of score mass per attention head", 13
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 5), constrained_layout=True)
    for ax, (z, name, kw) in zip(axes, panels):
        im = ax.imshow(z, aspect="auto", origin="lower", **kw)
        ax.set_title(name)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def circuits_png(a: CircuitMap, b: CircuitMap, cmp: dict, label_a: str, label_b: str, path: Path) -> None:
    """The other circuit figures as one PNG: composition by layer and module type for both
    circuits (stacked bars) and their overlap by layer (IoU, intersection/min)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), constrained_layout=True)
    for ax, m, label in ((axes[0], a, label_a), (axes[1], b, label_b)):
        share = _share(m.layer_module).numpy()
        bottom = share[:, 0] * 0
        for j, t in enumerate(MODULE_TYPES):
            ax.bar(range(share.shape[0]), share[:, j], bottom=bottom, label=t)
            bottom = bottom + share[:, j]
        ax.set_title(f"{label}: circuit by layer and module")
        ax.set_xlabel("layer")
        ax.set_ylabel("share of circuit")
    axes[1].legend(fontsize=7, ncol=2)
    layers = list(cmp["per_layer"])
    for k in ("iou", "iom"):
        axes[2].plot(layers, [cmp["per_layer"][i][k] for i in layers], marker="o", label=k.upper())
    axes[2].set_ylim(0, 1)
    axes[2].set_title("Overlap by layer")
    axes[2].set_xlabel("layer")
    axes[2].legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(f'{r[c]:.4g}' if isinstance(r[c], float) else str(r[c]))}</td>"
                                    for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(path: Path, title: str, sections: list[tuple[str, object]], settings: dict) -> None:
    """Standalone HTML: plotly.js inlined once, each section a figure or a list of row dicts."""
    parts, first = [], True
    for heading, item in sections:
        if heading:   # an empty heading continues the section above (a figure under its caption)
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(item, list):
            parts.append(_table(item))
        elif isinstance(item, str):
            parts.append(item)
        else:
            parts.append(item.to_html(full_html=False, include_plotlyjs=first))
            first = False
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
           f"</head><body><h1>{html.escape(title)}</h1>{''.join(parts)}<h2>Settings</h2><pre>"
           f"{html.escape(json.dumps(settings, indent=2, default=str))}</pre></body></html>")
    path.write_text(doc, encoding="utf-8")
