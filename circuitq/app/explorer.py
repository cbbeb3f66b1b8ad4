"""circuitq explorer (Streamlit), shipped inside the package. Launch with ``circuitq app --runs runs``
(or ``streamlit run apps/explorer.py -- --runs runs`` from a checkout).

Pages: Explore (where a task's salient weights sit, at any budget), Compare (two circuits),
Export (a mask -> a quantized model, as a background job). Every artifact is read through the
circuitq library (safetensors and JSON only; nothing is unpickled) and every path is confined to
the runs directory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import streamlit as st
import torch

from circuitq.app import catalog as runs_catalog
from circuitq.app import jobs as background_jobs
from circuitq.app.catalog import confine
from circuitq.circuits import explore
from circuitq.circuits.compare import same_model
from circuitq.circuits.faithfulness import layer_profile
from circuitq.circuits.maps import aggregate, compare_circuits, compare_masks, read_map, spearman, top_units
from circuitq.circuits.plots import attribution_heatmaps, head_heatmaps, overlap_by_layer
from circuitq.config import DEFAULT_FRACTION, CalibConfig, DataConfig, EvalConfig, QuantizeConfig, QuantizeJob
from circuitq.model.arch import MODULE_TYPES, Geometry, arch_for, parse_name
from circuitq.quant.quantizer import QuantSpec, rtn_quantize
from circuitq.saliency.files import load_scores as _load
from circuitq.saliency.masks import combine, mask_fraction, mask_metadata, save_masks

BUDGETS = sorted({0.0005, 0.001, 0.002, DEFAULT_FRACTION, 0.005, 0.01, 0.02})


def runs_dir() -> Path:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--runs", default=os.environ.get("CIRCUITQ_RUNS", "runs"))
    a, _ = p.parse_known_args(sys.argv[1:])
    return Path(a.runs).resolve()


# ---------------------------------------------------------------------------------------------
# cached loading (keyed by path and modification time)
# ---------------------------------------------------------------------------------------------
def _mtime(p: Path) -> float:
    f = p / "scores.safetensors"
    return f.stat().st_mtime if f.exists() else 0.0


@st.cache_resource(max_entries=4, show_spinner="Loading scores…")
def load_scores(path: str, mtime: float):
    return _load(path)


@st.cache_resource(max_entries=4, show_spinner="Ranking weights…")
def ranking(path: str, mtime: float) -> explore.TopIndex:
    f = load_scores(path, mtime)
    return explore.top_index(f["scores"], Geometry(**f["meta"]["geometry"]).model_type, max(BUDGETS))


@st.cache_resource(max_entries=8)
def score_map(path: str, mtime: float):
    f = load_scores(path, mtime)
    return aggregate(f["scores"], Geometry(**f["meta"]["geometry"]))


@st.cache_data(max_entries=16)
def budget_rows(path: str, mtime: float, bits: int, group_size: int) -> list[dict]:
    return explore.budget_table(ranking(path, mtime), BUDGETS, bits, group_size)


@st.cache_resource(max_entries=16)
def circuit(path: str, mtime: float, fraction: float):
    return explore.mask_at(ranking(path, mtime), fraction)


def catalog(root: Path) -> list[runs_catalog.RunEntry]:
    return runs_catalog.scan_runs(root)


@st.cache_data(show_spinner=False)
def attribution_map(path: str, mtime: float):
    return read_map(Path(path))


def faithfulness_caption(run: runs_catalog.RunEntry, task: str, estimator: str, objective: str = "nll") -> str:
    """The measured faithfulness of ``estimator``'s map of ``task`` in this run, in one line
    (``objective``: the map's; ``metric`` reads the Spearman against the measured metric change)."""
    field = "spearman_metric" if objective == "metric" else "spearman"
    docs = [d for _, d in run.faithfulness if d.get("task") == task and estimator in (d.get(field) or {})]
    if not docs:
        return (f"Faithfulness of this map: not measured in this run (circuitq run --faithfulness heads, or "
                f"circuitq faithfulness --all-units --estimators {estimator} on its scores).")
    d = docs[-1]
    rho = d[field][estimator]
    what = f"the measured change of {runs_catalog.md(d.get('metric'))} (sign flipped)" if objective == "metric" \
        else "the measured loss change"
    med = (((d.get("robust") or {}).get("statistics") or {}).get("median") or {}).get(field) or {}
    robust = f" (each unit's median item change: {med[estimator]:.3f})" if estimator in med else ""
    return (f"Measured faithfulness: Spearman {rho:.3f} between {estimator}'s prediction and {what}{robust} "
            f"over {len(d.get('units', []))} {runs_catalog.md(d.get('units_kind'))} units "
            f"({runs_catalog.md(d.get('units_measured', 'top + random'))}); most faithful here: "
            f"{runs_catalog.md(d.get('best_estimator'))}.")


def pct(f: float) -> str:
    return f"{f:.2%}"


# ---------------------------------------------------------------------------------------------
# pages
# ---------------------------------------------------------------------------------------------
def pick_run(runs: list[runs_catalog.RunEntry], key: str) -> runs_catalog.RunEntry | None:
    ok = [r for r in runs if r.ok]
    bad = [r for r in runs if not r.ok]
    if bad:
        with st.sidebar.expander(f"{len(bad)} unreadable run(s)"):
            for r in bad:
                st.write(f"**{runs_catalog.md(r.name)}**: {runs_catalog.md(r.error)}")
    if not ok:
        st.info("No runs yet. Create one with `circuitq run --out runs/main` (the whole pipeline) or "
                "`circuitq score --task mmlu --out runs/mmlu` (scores only), then reload.")
        return None
    name = st.sidebar.selectbox("Run", [r.name for r in ok], key=key)
    return next(r for r in ok if r.name == name)


def page_explore(run: runs_catalog.RunEntry) -> None:
    st.header("Explore a circuit")
    if not run.scores:
        st.warning("This run has no score directories.")
        return
    entry = st.selectbox("Scores", run.scores, format_func=lambda s: s.label, key="explore_scores")
    path, mt = str(entry.path), _mtime(entry.path)
    f = load_scores(path, mt)
    meta = f["meta"]
    geo = Geometry(**meta["geometry"])
    budget = st.select_slider("Budget (share of weights kept in 16-bit)", BUDGETS, value=DEFAULT_FRACTION, format_func=pct,
                              key="budget")
    ti = ranking(path, mt)
    bits, gs = int(meta.get("bits") or 3), int(meta.get("group_size") or -1)
    table = budget_rows(path, mt, bits, gs)
    row = next(r for r in table if r["fraction"] == budget)
    c1, c2, c3 = st.columns(3)
    c1.metric("16-bit weights", f"{row['n_16bit']:,}")
    c2.metric("Average bits", f"{row['average_bits']:.3f}", help=f"{bits}-bit base, group size {gs}, exact accounting")
    c3.metric("In attention", pct(row["attention_share"]))
    if meta.get("model_note"):
        st.caption(f"Model: {runs_catalog.md(meta.get('model'))} — {runs_catalog.md(meta['model_note'])}")

    import plotly.graph_objects as go

    smap = score_map(path, mt)
    task = str(meta.get("task"))
    kinds = (["attribution (atp)"] if task in run.maps else []) + [f"selection mass ({meta.get('method', 'score')})"]
    shown = st.radio("Head map", kinds, horizontal=True, key="head_map_kind",
                     help="atp: the predicted change of the task loss when a head alone is quantized (signed). "
                          "Selection mass: where the circuit's 16-bit weights sit, which says little about what a "
                          "head does (docs/circuits.md).")
    if shown.startswith("attribution"):
        amap, ameta = attribution_map(str(run.maps[task]), _mtime(run.maps[task]))
        of_metric = ameta.get("objective") == "metric"
        st.plotly_chart(attribution_heatmaps([(f"{task}: atp{' of −metric' if of_metric else ''} at "
                                               f"{ameta.get('bits')} bits", amap)],
                                             "Attribution patching per attention head (red: quantizing it "
                                             + ("lowers the task's metric)" if of_metric else "raises the task loss)")),
                     key="heads_heatmap")
        st.caption(faithfulness_caption(run, task, "atp", ameta.get("objective", "nll")))
    else:
        heads = (smap.head / max(smap.total, 1e-30)).tolist()
        fig = go.Figure(go.Heatmap(z=heads, colorscale="Viridis",
                                   hovertemplate="layer %{y}, head %{x}: %{z:.4f}<extra></extra>"))
        fig.update_layout(title=f"Share of {meta.get('method', 'score')} selection mass per attention head (what the "
                                "mask keeps)", xaxis_title="query head", yaxis_title="layer", height=480)
        st.plotly_chart(fig, key="heads_heatmap")
        st.caption(faithfulness_caption(run, task, "score"))

    counts = explore.layer_module_counts(ti, budget, geo.n_layers, geo)
    bars = go.Figure([go.Bar(name=t, x=list(range(geo.n_layers)), y=counts[:, j].tolist())
                      for j, t in enumerate(MODULE_TYPES)])
    bars.update_layout(barmode="stack", title=f"Circuit at {pct(budget)}: 16-bit weights by layer and module",
                       xaxis_title="layer", height=360)
    st.plotly_chart(bars, key="module_bars")
    st.subheader("How the circuit changes with the budget")
    st.dataframe([{**r, "fraction": pct(r["fraction"])} for r in table], hide_index=True)

    st.subheader("Drill down into one weight matrix")
    c1, c2 = st.columns(2)
    layer = c1.number_input("Layer", 0, geo.n_layers - 1, 0, key="layer")
    spec = arch_for(geo.model_type)
    mod = c2.selectbox("Module", spec.module_types, key="module")   # the stored modules (a fused one whole)
    name = next((n for n in f["scores"] if parse_name(n, spec) == (layer, mod)), None)
    if name is None:
        st.warning(f"No scores for layer {layer} {runs_catalog.md(mod)}.")
        return
    mask = explore.mask_for(ti, budget, name)
    dens = explore.tile_density(mask, 32)
    hm = go.Figure(go.Heatmap(z=dens.tolist(), colorscale="Magma", hovertemplate="rows %{y}·32, cols %{x}·32: %{z:.3%}<extra></extra>"))
    hm.update_layout(title=f"{name}: share kept in 16-bit per 32×32 tile ({int(mask.sum())} of {mask.numel()})",
                     xaxis_title="input tile", yaxis_title="output tile", height=420)
    st.plotly_chart(hm, key="tile_heatmap")
    weight = q = None
    src = runs_catalog.model_dir(runs_dir(), meta.get("model_source"))
    try:
        weight = explore.load_weight(src, name).float() if src is not None else None
    except (KeyError, OSError):
        weight = None
    if weight is not None:
        q = rtn_quantize(weight, QuantSpec(bits=bits, group_size=gs)).dequantize()
    rows = explore.top_weights(name, f["scores"][name], weight if weight is not None else torch.full_like(f["scores"][name], float("nan")),
                         q, geo, 100)
    st.caption("Top weights of this matrix (click a column to sort). quant_error = w − RTN(w) at the run's bits"
               + ("" if weight is not None else " (value is empty: the model directory is not inside the runs "
                  "directory or circuitq's model cache, so it is not read)"))
    st.dataframe(rows, hide_index=True, key="top_weights")


def _pair_defaults(scores: list[runs_catalog.ScoreEntry]) -> tuple[int, int]:
    mm = next((i for i, s in enumerate(scores) if s.task.startswith("mmlu")), 0)
    gs = next((i for i, s in enumerate(scores) if s.task.startswith("gsm8k") and s.bits == scores[mm].bits),
              1 if len(scores) > 1 else 0)
    return mm, gs


def page_compare(runs: list[runs_catalog.RunEntry], run: runs_catalog.RunEntry) -> None:
    st.header("Compare two circuits")
    pool = [(r, s) for r in runs if r.ok for s in r.scores]
    if len(pool) < 2:
        st.info("Comparing needs two score directories (e.g. `circuitq run` makes MMLU and GSM8k ones).")
        return
    own = [i for i, (r, _) in enumerate(pool) if r.name == run.name]
    scores_here = [s for r, s in pool if r.name == run.name]
    da, db = _pair_defaults(scores_here) if len(scores_here) > 1 else (0, 1)
    da, db = (own[da], own[db]) if len(own) > 1 else (0, 1)
    fmt = lambda i: f"{pool[i][0].name}: {pool[i][1].label}"  # noqa: E731
    c1, c2 = st.columns(2)
    ia = c1.selectbox("Circuit A", range(len(pool)), index=da, format_func=fmt, key="cmp_a")
    ib = c2.selectbox("Circuit B", range(len(pool)), index=db, format_func=fmt, key="cmp_b")
    budget = st.select_slider("Budget", BUDGETS, value=DEFAULT_FRACTION, format_func=pct, key="cmp_budget")
    ea, eb = pool[ia][1], pool[ib][1]
    fa, fb = load_scores(str(ea.path), _mtime(ea.path)), load_scores(str(eb.path), _mtime(eb.path))
    if not same_model(fa["meta"], fb["meta"]):
        st.error(f"These circuits come from different models ({runs_catalog.md(fa['meta'].get('model'))} vs {runs_catalog.md(fb['meta'].get('model'))}); "
                 "comparing them would be meaningless. Pick two circuits of one model.")
        return
    ma, mb = circuit(str(ea.path), _mtime(ea.path), budget), circuit(str(eb.path), _mtime(eb.path), budget)
    cm = compare_masks(ma, mb, Geometry(**fa["meta"]["geometry"]) if fa["meta"].get("geometry") else None)
    sa, sb = score_map(str(ea.path), _mtime(ea.path)), score_map(str(eb.path), _mtime(eb.path))
    cc = compare_circuits(sa, sb, 20)
    g = cm["global"]
    la, lb = ea.label, eb.label
    cols = st.columns(5)
    cols[0].metric("IoU", f"{g['iou']:.3f}")
    cols[1].metric("Intersection / min", f"{g['iom']:.3f}")
    cols[2].metric("Shared weights", f"{g['intersection']:,}")
    cols[3].metric("Only A", f"{g['a'] - g['intersection']:,}")
    cols[4].metric("Only B", f"{g['b'] - g['intersection']:,}")
    st.caption(f"Head-score Spearman {cc['head_spearman']:.3f}; shared top-20 heads {cc['n_shared_heads']}, "
               f"neurons {cc['n_shared_neurons']}")
    ta, tb = str(fa["meta"].get("task")), str(fb["meta"].get("task"))
    ra, rb = pool[ia][0], pool[ib][0]
    if ta in ra.maps and tb in rb.maps:
        (ma_, qa), (mb_, qb) = (attribution_map(str(r.maps[t]), _mtime(r.maps[t])) for r, t in ((ra, ta), (rb, tb)))
        st.plotly_chart(attribution_heatmaps([(f"A: {ta} (atp, {qa.get('bits')}-bit)", ma_),
                                              (f"B: {tb} (atp, {qb.get('bits')}-bit)", mb_)],
                                             "Attribution patching per attention head (signed)"), key="cmp_atp")
        st.caption(f"A: {faithfulness_caption(ra, ta, 'atp', qa.get('objective', 'nll'))} "
                   f"B: {faithfulness_caption(rb, tb, 'atp', qb.get('objective', 'nll'))} "
                   f"Spearman of the two attribution maps: {spearman(ma_.head, mb_.head):.3f}.")
        with st.expander("Selection mass per head (where the 16-bit weights sit; not what a head does)"):
            st.plotly_chart(head_heatmaps(sa, sb, "A: " + la, "B: " + lb), key="cmp_heads")
    else:
        st.caption("No attribution maps for these circuits (circuitq run makes them by default since 0.7); showing "
                   "the selection mass, which says where the 16-bit weights sit, not what a head does.")
        st.plotly_chart(head_heatmaps(sa, sb, "A: " + la, "B: " + lb), key="cmp_heads")
    st.plotly_chart(overlap_by_layer(cm, "A vs B"), key="cmp_layers")
    st.subheader("Overlap by module type")
    st.dataframe([{"module": t, **v} for t, v in cm["per_module_type"].items()], hide_index=True)
    st.subheader("Top heads and neurons")
    c1, c2 = st.columns(2)
    for col, m, lab in ((c1, sa, "A"), (c2, sb, "B")):
        col.write(f"**{lab}: {la if lab == 'A' else lb}**")
        col.dataframe([{"rank": i + 1, "head": f"L{l}.H{u}", "share": v / max(m.total, 1e-30)}
                       for i, (l, u, v) in enumerate(top_units(m.head, 15))], hide_index=True, key=f"heads_{lab}")
        col.dataframe([{"rank": i + 1, "neuron": f"L{l}.N{u}", "share": v / max(m.total, 1e-30)}
                       for i, (l, u, v) in enumerate(top_units(m.neuron, 15))], hide_index=True, key=f"neurons_{lab}")
    tr = pool[ia][0].transfer
    if tr:
        st.subheader("Cross-task evaluation (from the run)")
        st.dataframe(tr, hide_index=True)


def page_export(root: Path, run: runs_catalog.RunEntry) -> None:
    st.header("Export a quantized model")
    if not run.scores:
        st.warning("This run has no score directories to build a mask from.")
        return
    fmt = lambda s: s.label  # noqa: E731
    a = st.selectbox("Mask from", run.scores, format_func=fmt, key="exp_a")
    how = st.radio("Combine with a second circuit", ["no", "union", "intersection"], horizontal=True, key="exp_how")
    b = st.selectbox("Second circuit", run.scores, format_func=fmt, key="exp_b") if how != "no" else None
    c1, c2, c3 = st.columns(3)
    budget = c1.select_slider("Budget", BUDGETS, value=DEFAULT_FRACTION, format_func=pct, key="exp_budget")
    bits = c2.selectbox("Base bits", [2, 3, 4, 8], index=1, key="exp_bits")
    gs = c3.selectbox("Group size", [-1, 32, 64, 128], index=2, key="exp_gs")
    mask = circuit(str(a.path), _mtime(a.path), budget)
    if b is not None:
        mb = circuit(str(b.path), _mtime(b.path), budget)
        mask = combine([mask, mb], how)
    shapes = {n: tuple(t.shape) for n, t in mask.items()}
    nnz = {n: int(t.sum()) for n, t in mask.items()}
    try:
        avg = explore.predicted_bits(shapes, bits, gs, nnz)
        st.metric("Predicted average bits", f"{avg:.4f}", help=f"{sum(nnz.values()):,} weights in 16-bit "
                  f"({pct(mask_fraction(mask))})")
    except ValueError as e:
        st.error(runs_catalog.md(e))
        return
    c1, c2, c3 = st.columns(3)
    calib = c1.selectbox("Calibration", ["gsm8k", "mmlu"], key="exp_calib")
    samples = c2.number_input("Calibration items", 4, 512, 16, key="exp_samples",
                              help="drawn from the task's calibration split, never from its evaluation items")
    limit = c3.number_input("Evaluation items per task", 8, 1000, 32, key="exp_limit")
    default_name = f"{a.task}-{how if b is not None else 'only'}-{bits}bit-{budget:.4%}".replace("%", "pct").replace(":", "-")
    name = "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in st.text_input("Name", default_name, key="exp_name"))
    out = confine(root, run.path / "models" / name)
    model = runs_catalog.model_dir(root, a.model_source)
    if model is None:
        st.error(f"The model of these scores ({runs_catalog.md(a.model_source)}) is not inside the runs directory or circuitq's model "
                 "cache; the explorer only reads models from there. Quantize it with `circuitq quantize` instead.")
        return
    if st.button("Quantize in the background", key="exp_go", disabled=out.exists()):
        mpath = confine(root, run.path / "masks" / f"{name}.safetensors")
        meta = mask_metadata(mask, model=a.model, model_source=a.model_source,
                             task=a.task + (f"{how}{b.task}" if b else ""), method=a.method, bits=bits, group_size=gs,
                             requested_fraction=budget, samples=a.samples, seed=a.seed,
                             combine=how if b is not None else None,
                             sources=[str(a.path)] + ([str(b.path)] if b else []))
        if mpath.exists():
            st.error(f"A mask named {runs_catalog.md(mpath.name)} already exists in this run; choose another name.")
            return
        save_masks(mpath, mask, meta)

        job = QuantizeJob(model=str(model), task=calib,
                          data=DataConfig(data_dir=os.environ.get("CIRCUITQ_DATA_DIR")),
                          calib=CalibConfig(samples=int(samples), seq_len=256),
                          quantize=QuantizeConfig(bits=bits, group_size=gs, hessian="shared"),
                          eval=EvalConfig(ppl_windows=4))
        spec = background_jobs.export_spec(str(model), mpath, out, job, sorted({a.task, b.task} if b else {a.task}), int(limit))
        background_jobs.start_job(name, out, spec)
        st.success(f"Started: {runs_catalog.md(name)}")
    if out.exists():
        st.caption(f"{runs_catalog.md(out.name)} exists; choose another name to export again.")
    jobs_panel(run)


@st.fragment(run_every=2)
def jobs_panel(run: runs_catalog.RunEntry) -> None:
    jobs = background_jobs.list_jobs(run.path / "models")
    st.subheader("Jobs and models")
    for j in jobs:
        s = background_jobs.job_status(j)
        st.write(f"**{runs_catalog.md(j.name)}** — {runs_catalog.md(s['state'])}" + (f" · {runs_catalog.md(s['step'])}" if s["step"] else ""))
        if s["state"] == "running":
            st.progress((s["percent"] or 0) / 100, text=s["step"][-120:])
        elif s["state"] == "failed":
            st.error(runs_catalog.md(s["last"]))
    models = runs_catalog.read_run(run.path).models if run.path.exists() else []
    rows = []
    for m in models:
        for e in m.evals or [{}]:
            met = e.get("metrics", {})
            rows.append({"model": m.path.name, "average_bits": m.meta.get("average_bits"), "task": e.get("task"),
                         "kl": met.get("kl"), "top1_agreement": met.get("top1_agreement"),
                         "nll_per_token": met.get("nll_per_token"), "accuracy": met.get("accuracy"),
                         "path": str(m.path)})
    if rows:
        st.dataframe(rows, hide_index=True, key="models_table")
    elif not jobs:
        st.caption("No exported models yet.")


def page_faithfulness(run: runs_catalog.RunEntry) -> None:
    """Measured vs predicted change per unit, and the circuit against random sets."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    st.header("Faithfulness")
    if not run.faithfulness:
        st.info("No faithfulness report in this run. Make one with: circuitq faithfulness --scores SCORES_DIR "
                "--units heads --out SCORES_DIR/faithfulness-heads.json")
        return
    labels = [f"{d.get('task')} · {d.get('units_kind')} · {d.get('ablation')} · {p.name}" for p, d in run.faithfulness]
    i = st.selectbox("Report", range(len(labels)), format_func=lambda k: labels[k], key="faith_pick")
    doc = run.faithfulness[i][1]
    rho = doc.get("spearman", {})
    cols = st.columns(max(len(rho), 1) + 1)
    for c, (k, v) in zip(cols, rho.items()):
        c.metric(f"Spearman: {k}", "—" if v != v else f"{v:.3f}")
    cols[-1].metric("only circuit / only random", f"{doc.get('only_circuit_over_only_random', float('nan')):.2f}×")
    for stat, d in ((doc.get("robust") or {}).get("statistics") or {}).items():
        nc = d.get("noise_ceiling") or {}
        st.caption(f"Against each unit's {'median' if stat == 'median' else 'trimmed-mean'} item change (robust to a "
                   "few heavy items): " + ", ".join(f"{runs_catalog.md(k)} {v:.3f}" for k, v in d["spearman"].items())
                   + (f"; a perfect predictor: about {nc['ceiling']:.3f}" if nc else "") + ".")
    est = st.radio("Predicted by", list(rho) or ["score"], horizontal=True, key="faith_est")
    units = doc.get("units", [])
    fig = go.Figure(go.Scatter(x=[u["predicted"].get(est) for u in units], y=[u["measured_loss"] for u in units],
                               mode="markers+text", text=[u["label"] for u in units], textposition="top center"))
    fig.update_layout(xaxis_title=f"predicted ({est})", yaxis_title="measured change of the task loss (nats)",
                      height=460, title="One unit replaced at a time")
    st.plotly_chart(fig, key="faith_scatter")
    profile = layer_profile(units, est)
    if profile:   # 0.8.8: attention and MLP blocks, or whole layers, drawn along the depth of the model
        lfig = make_subplots(specs=[[{"secondary_y": True}]])
        for name, pts in profile.items():
            lfig.add_trace(go.Bar(x=[p[0] for p in pts], y=[p[1] for p in pts], name=f"{name}: measured"))
            lfig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[2] for p in pts], mode="lines+markers",
                                      name=f"{name}: predicted ({est})"), secondary_y=True)
        lfig.update_layout(xaxis_title="layer", height=380, barmode="group",
                           title="By layer: each block replaced alone")
        lfig.update_yaxes(title_text="measured change of the task loss (nats)", secondary_y=False)
        lfig.update_yaxes(title_text=f"predicted ({est})", secondary_y=True)
        st.plotly_chart(lfig, key="faith_layers")
    if doc.get("completeness"):
        ig = doc["completeness"]["ig"]
        st.caption(f"Integrated gradients ({doc['completeness'].get('ig_steps')} steps): Σ attributions "
                   f"{ig['attributed']:+.4f} vs measured L(Q(W)) − L(W) {ig['measured']:+.4f}, gap {ig['gap']:.1%}.")
        path, diag = doc["completeness"].get("path"), doc["completeness"].get("path_diagnosis")
        if path and diag:   # 0.8.7: the loss at IG's nodes (from its own gradient passes) between L(W) and L(Q(W))
            lw = doc["completeness"]["loss_w"]
            xs = [0.0] + [p["alpha"] for p in path] + [1.0]
            ys = [lw] + [p["loss"] for p in path] + [lw + ig["measured"]]
            pfig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers"))
            pfig.update_layout(xaxis_title="α (W + α(Q(W) − W), every weight at once)",
                               yaxis_title="summed calibration loss", height=300, title="Integrated gradients' path")
            st.plotly_chart(pfig, key="faith_ig_path")
            w = diag["worst"]
            st.caption(f"The slope dL/dα varies over ∫|dL/dα| ≈ {diag['variation']:.3f} nats, "
                       f"{diag['cancellation']:.1f}x the net change: a quadrature error of a small share of that is a "
                       f"large share of the net. Least resolved between α = {w['from']:.3f} and {w['to']:.3f} (the loss "
                       f"moved {w['rise']:+.3f}, the slopes at the ends say {w['predicted']:+.3f}); more --ig-steps "
                       "resolve it.")
    curves = doc.get("curves")
    if curves:
        mode = st.radio("Curve", ["keep-top", "replace-top"], horizontal=True, key="faith_curve_mode",
                        help="keep-top: the top k units stay 16-bit, every other unit is replaced (recovery of the "
                             "task metric); replace-top: only the top k are replaced (share of the whole effect).")
        cfig = go.Figure()
        for name, modes in curves["orderings"].items():
            pts = modes[mode]["points"]
            cfig.add_trace(go.Scatter(x=[p["fraction"] for p in pts], y=[p["recovery"] for p in pts],
                                      mode="lines+markers", name=f"{name} (area {modes[mode]['area']:.3f})"))
        cfig.update_layout(xaxis_title=f"fraction of the {curves['units']} units {'kept' if mode == 'keep-top' else 'replaced'}",
                           yaxis_title="recovery" if mode == "keep-top" else "share of the effect", height=420,
                           title="Faithfulness curves: units ordered by each estimator")
        st.plotly_chart(cfig, key="faith_curves")
    con = doc.get("contrasts", {})
    bars = go.Figure(go.Bar(x=list(con), y=[v["loss_change"] for v in con.values()]))
    bars.update_layout(yaxis_title="change of the task loss (nats)", height=360,
                       title=f"The circuit ({doc.get('circuit_entries', 0):,} weights) vs a random set of the same size")
    st.plotly_chart(bars, key="faith_bars")


def main() -> None:
    st.set_page_config(page_title="circuitq explorer", layout="wide")
    root = runs_dir()
    st.sidebar.title("circuitq")
    st.sidebar.caption(f"runs: {root}")
    page = st.sidebar.radio("Page", ["Explore", "Compare", "Faithfulness", "Export"], key="page")
    runs = catalog(root)
    run = pick_run(runs, "run")
    if run is None:
        return
    t0 = time.perf_counter()
    if page == "Explore":
        page_explore(run)
    elif page == "Compare":
        page_compare(runs, run)
    elif page == "Faithfulness":
        page_faithfulness(run)
    else:
        page_export(root, run)
    st.sidebar.caption(f"page drawn in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":   # streamlit runs this file as __main__
    main()
