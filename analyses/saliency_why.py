"""Why does plain Σ|G| beat TaCQ's Σ|G|·|W−Q(W)|·|W| on the default model, and does a principled
variant beat both? Measured on each task's evaluation half, over calibration seeds.

    .venv/bin/python analyses/saliency_why.py --tasks mmlu gsm8k --seeds 0 1 2

Per task and seed (32 calibration items, 48 evaluation items, 3-bit, group 64, shared
Hessians, 0.35% kept in 16-bit; the same stage functions as ``circuitq run``):

* **Diagnostics** of the three factors of TaCQ's score: the spread (sd of log10) of Σ|G|, |ΔW|
  and |W| over all weights, the Spearman correlation of each with the TaCQ score, |ΔW| in units
  of the quantization step (how degenerate it is: weights that already lie on the 3-bit grid
  get |ΔW| ≈ 0), the overlap (IoU) of the circuits, and the share of each circuit in layers 0-1.
* **Quality**: mask-aware GPTQ with each candidate's circuit, KL to the original on the
  evaluation items (MMLU: answer letter and every token). Candidates (none is tuned to the
  evaluation items):
  - ``tacq`` Σ|G|·|ΔW|·|W| (the paper); ``grad`` Σ|G|;
  - ``tacq-nw``: Σ|G|·|ΔW|, the first-order estimate without the extra |W| factor;
  - ``taylor2``: |ΣG·ΔW| + ½·ΣG²·ΔW², a second-order estimate with per-sample signs kept;
  - ``grad-rel``: Σ|G| relative to its layer-module mean (a per-module threshold).

Writes ``analyses/results/saliency_why.csv`` and ``analyses/SALIENCY_WHY.md`` (sentences computed
from the numbers). The default model's weights are dequantized from a 4-bit GGUF file.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CANDIDATES = ("tacq", "grad", "tacq-nw", "spqr", "taylor2", "grad-rel")
CROSS = ("tacq", "tacq-nw", "grad")   # candidates whose circuits are also scored on the other task


def candidate_scores(name, W, dW, st, n) -> torch.Tensor:
    """``[out, in]`` scores of candidate ``name`` for weight ``n`` (pure)."""
    g_abs, g_sum, g_sq = st["sum_abs"][n], st["sum"][n], st["sum_sq"][n]
    if name == "tacq":
        return g_abs * dW.abs() * W.abs()
    if name == "grad":
        return g_abs.clone()
    if name == "tacq-nw":
        return g_abs * dW.abs()
    if name == "taylor2":
        return (g_sum * dW).abs() + 0.5 * g_sq * dW ** 2
    if name == "grad-rel":
        return g_abs / g_abs.mean().clamp(min=1e-30)
    raise ValueError(name)


def _spearman(a: torch.Tensor, b: torch.Tensor, n: int = 200_000, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (min(n, a.numel()),), generator=g)
    ra = a.flatten()[idx].argsort().argsort().double()
    rb = b.flatten()[idx].argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _iou(a: dict, b: dict) -> float:
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / max(union, 1)


def diagnostics(weights, dW, stats, steps, masks) -> dict:
    """Factor spreads, correlations, |ΔW| in grid steps, circuit overlaps and layer shares."""
    cat = lambda d: torch.cat([d[n].flatten().float() for n in weights])  # noqa: E731
    W, D, G = cat(weights).abs(), cat(dW).abs(), cat(stats["sum_abs"])
    T = G * D * W
    lg = lambda x: torch.log10(x.clamp(min=1e-30))  # noqa: E731
    pos = (W > 0) & (D > 0) & (G > 0)
    S = cat(steps)
    rel = (D / S.clamp(min=1e-30))
    out = {"sd_log_grad": float(lg(G[pos]).std()), "sd_log_dW": float(lg(D[pos]).std()),
           "sd_log_W": float(lg(W[pos]).std()), "rho_tacq_grad": _spearman(T, G), "rho_tacq_dW": _spearman(T, D),
           "rho_tacq_W": _spearman(T, W), "dW_below_0.05_step": float((rel < 0.05).float().mean()),
           "dW_zero": float((D == 0).float().mean()), "dW_mean_steps": float(rel.mean())}
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"iou_{a}_{b}"] = _iou(masks[a], masks[b])
    for a in names:
        tot = sum(int(m.sum()) for m in masks[a].values())
        early = sum(int(m.sum()) for k, m in masks[a].items() if k.startswith(("model.layers.0.", "model.layers.1.")))
        out[f"share_layers01_{a}"] = early / max(tot, 1)
    return out


def prepare_task(lm, task_name: str, seed: int, a) -> dict:
    """Scores, Hessians, the mask-free GPTQ model and every candidate's circuit of one task."""
    import circuitq
    from circuitq.config import CalibConfig, MaskConfig, QuantizeConfig
    from circuitq.data.tasks import Task
    from circuitq.pipeline import stages
    from circuitq.quant.driver import Reference, quant_spec, quantize_copy

    calib = CalibConfig(samples=a.calib_samples, seed=seed)
    q = QuantizeConfig(bits=a.bits, group_size=a.group_size, hessian="shared")
    task = Task(task_name, circuitq.DataConfig(data_dir=a.data_dir), lm.tokenizer)
    items = task.calib_for(calib)
    print(f"  {task_name} seed {seed}: gradients, Hessians and Q(W)", flush=True)
    stats = stages.collect_gradients(lm.model, lm.tokenizer, items, calib, ("sum_abs", "sum", "sum_sq"),
                                     progress=False)["stats"].tensors
    H = stages.collect_hessians(lm.model, stages.calibration_tokens(items, lm.tokenizer, calib), q, progress=False)
    # the mask-free GPTQ model is both the gptq baseline and Q(W) (with the errors SpQR reads)
    twin, res = quantize_copy(lm.model, q, None, hessians=H, masks=None, device=None, progress=False, keep_hinv=True)
    ref = Reference({n: twin.get_parameter(n).detach() for n in circuitq.target_shapes(lm.model)},
                    res.hinv_diag, q, res.gptq_errors)
    weights = {n: lm.model.get_parameter(n).detach().float() for n in circuitq.target_shapes(lm.model)}
    dW = {n: ref.weights[n].float() - weights[n] for n in weights}
    spec = quant_spec(q)
    steps = {}
    for n, w in weights.items():   # the RTN step of each weight's group: (max - min) / maxq
        g = w.shape[1] if q.group_size == -1 else q.group_size
        wg = w.reshape(w.shape[0], -1, g)
        st = ((wg.amax(-1) - wg.amin(-1)) / spec.maxq).clamp(min=1e-12)
        steps[n] = st.repeat_interleave(g, dim=1)
    masks = {}
    for c in a.candidates:
        sc = (stages.score_weights("spqr", lm.model, reference=ref) if c == "spqr" else
              {n: candidate_scores(c, weights[n], dW[n], stats, n) for n in weights})
        masks[c] = stages.select(sc, MaskConfig(fraction=a.fraction))
    diag = diagnostics(weights, dW, stats, steps, masks) if a.diagnostics else {}
    del stats, steps, dW
    return {"task": task, "q": q, "H": H, "masks": masks, "gptq": (twin, res), "diag": diag}


def evaluate_seed(lm, prepared: dict, seed: int, a) -> list[dict]:
    """KL of the gptq model, every candidate's own circuit and the other tasks' circuits
    (``c[other]``) on each task's evaluation half."""
    from circuitq.config import EvalConfig
    from circuitq.pipeline import stages

    ev = EvalConfig(samples=a.eval_samples)
    rows = []
    for name, P in prepared.items():
        task = P["task"]
        evitems = task.eval_items(a.eval_samples)
        cache: dict = {}
        stages.evaluate(lm.model, lm.tokenizer, evitems, task.kind, cfg=ev, progress=False, logits_out=cache)
        jobs = [("gptq", None)] + [(c, P["masks"][c]) for c in a.candidates]
        jobs += [(f"{c}[{o}]", prepared[o]["masks"][c]) for o in prepared if o != name
                 for c in a.cross if c in prepared[o]["masks"]]
        for label, mask in jobs:
            if mask is None:
                twin, res = P["gptq"]
            else:
                twin, res = stages.quantize(lm.model, P["q"], hessians=P["H"], masks=mask, progress=False)
            m = stages.evaluate(twin, lm.tokenizer, evitems, task.kind, cfg=ev, progress=False,
                                reference_logits=cache).metrics
            rows.append({"task": name, "seed": seed, "method": label, "kl": m["kl"], "kl_all": m.get("kl_all"),
                         "top1": m["top1_agreement"], "nll": m["nll_per_token"],
                         "average_bits": res.bits.average_bits})
            print(f"  {name} seed {seed} {label:<14} KL {m['kl']:.4f}"
                  + (f" KL_all {m['kl_all']:.4f}" if m.get("kl_all") is not None else ""), flush=True)
            del twin
        P["gptq"] = None
    return rows


def _ms(v):
    v = [x for x in v if x is not None]
    return (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else (None, None)


def _beyond(a: tuple, b: tuple) -> str:
    """'beyond' when the means differ by more than the sum of the seed sds, else 'within'."""
    return "beyond" if abs(a[0] - b[0]) > a[1] + b[1] else "within"


def summary(rows, diags, cmd, seconds) -> str:
    seeds_all = sorted({r["seed"] for r in rows})
    L = ["# Why Σ|G| beats TaCQ on the default model, and what beats both", "", f"Command(s): `{cmd}`  ",
         f"Machine: {platform.platform()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores; "
         f"last invocation {seconds / 60:.1f} min. Seeds: {', '.join(map(str, seeds_all))}.", "",
         "SmolLM2-135M-Instruct, **weights dequantized from a 4-bit (Q4_1) GGUF file**. 3-bit, group 64, shared "
         "Hessians, 0.35% of the weights in 16-bit, 32 calibration items per seed, 48 evaluation items (the task's "
         "evaluation half, never used for calibration). Mean ± sd over seeds; a difference is *beyond* the seed "
         "spread when the means differ by more than the sum of the two sds.", "",
         "## Diagnostics (mean over seeds)", ""]
    keys = sorted({k for d in diags for k in d if k not in ("task", "seed")},
                  key=lambda k: (not k.startswith(("sd_", "rho_", "dW_")), k))
    tasks = sorted({r["task"] for r in rows})
    L += ["| measure | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for k in keys:
        cells = []
        for t in tasks:
            v = [float(d[k]) for d in diags if d["task"] == t and d.get(k) not in (None, "")]
            cells.append(f"{statistics.fmean(v):.3f} (n={len(v)})" if v else "—")
        L.append(f"| {k} | " + " | ".join(cells) + " |")
    L += ["", "## Quality: KL to the original", "",
          "| task | method | seeds | KL | KL every token | top-1 | gap closed |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    agg, gapagg = {}, {}
    order = ["gptq", *CANDIDATES]
    methods = sorted({r["method"] for r in rows}, key=lambda m: (order.index(m) if m in order else len(order), m))
    for t in tasks:
        g = {r["seed"]: r["kl"] for r in rows if r["task"] == t and r["method"] == "gptq"}
        for m in methods:
            sel = [r for r in rows if r["task"] == t and r["method"] == m]
            if not sel:
                continue
            km, ks = _ms([r["kl"] for r in sel])
            am, as_ = _ms([r["kl_all"] for r in sel])
            tm, _ = _ms([r["top1"] for r in sel])
            gm, gs = _ms([1 - r["kl"] / g[r["seed"]] for r in sel if r["seed"] in g])
            agg[(t, m)] = (km, ks, len(sel))
            gapagg[(t, m)] = (gm, gs)
            L.append(f"| {t} | {m} | {len(sel)} | {km:.4f} ± {ks:.4f} | "
                     + (f"{am:.4f} ± {as_:.4f}" if am is not None else "—") + f" | {tm:.3f} | "
                     + (f"{gm:.3f} ± {gs:.3f}" if gm is not None else "—") + " |")
    L += ["", "## Findings (computed)", ""]
    for t in tasks:
        d = [x for x in diags if x["task"] == t and x.get("rho_tacq_grad") not in (None, "")]
        if d:
            f = lambda k: statistics.fmean(float(x[k]) for x in d)  # noqa: E731
            widest = max(("grad", "dW", "W"), key=lambda k: f(f"sd_log_{k}"))
            closest = max(("grad", "dW", "W"), key=lambda k: f(f"rho_tacq_{k}"))
            L.append(f"- {t}: the log-spread of the factors is Σ|G| {f('sd_log_grad'):.2f}, |ΔW| {f('sd_log_dW'):.2f}, "
                     f"|W| {f('sd_log_W'):.2f} decades (widest: {widest}); TaCQ's ranking follows {closest} most "
                     f"(Spearman with TaCQ: Σ|G| {f('rho_tacq_grad'):.2f}, |ΔW| {f('rho_tacq_dW'):.2f}, "
                     f"|W| {f('rho_tacq_W'):.2f}). {f('dW_below_0.05_step'):.1%} of the weights move less than 0.05 "
                     f"grid steps (|ΔW| = 0: {f('dW_zero'):.1%}); TaCQ and grad circuits overlap at IoU "
                     f"{f('iou_tacq_grad'):.2f}.")
        cands = [m for m in CANDIDATES if (t, m) in agg]
        if not cands:
            continue
        best = min(cands, key=lambda m: agg[(t, m)][0])
        L.append(f"- {t}: lowest mean KL: **{best}** ({agg[(t, best)][0]:.4f} ± {agg[(t, best)][1]:.4f}, "
                 f"{agg[(t, best)][2]} seeds; gap closed {gapagg[(t, best)][0]:.3f}).")
        for other in cands:
            if other == best:
                continue
            b, o = agg[(t, best)], agg[(t, other)]
            pb = {r["seed"]: r["kl"] for r in rows if r["task"] == t and r["method"] == best}
            diffs = [r["kl"] - pb[r["seed"]] for r in rows if r["task"] == t and r["method"] == other and r["seed"] in pb]
            dm, ds = _ms(diffs)
            paired = "" if len(diffs) < 2 else (
                f"; paired over {len(diffs)} seeds {other} − {best} = {dm:+.4f} ± {ds:.4f}, "
                f"{'lower on every seed' if all(d > 0 for d in diffs) else 'not lower on every seed'}, "
                f"{'beyond' if dm > ds else 'within'} its sd")
            L.append(f"  - {best} vs {other}: KL {b[0]:.4f} vs {o[0]:.4f}, " + (
                "one seed: no seed spread to compare with." if min(b[2], o[2]) < 2 else
                f"{_beyond(b, o)} the seed spread ({b[1] + o[1]:.4f}){paired}."))
    cross = [m for m in methods if "[" in m]
    if cross:
        L += ["", "## Task specificity: own circuit vs the other task's circuit (same method)", "",
              "| evaluated on | method | own KL | other task's circuit KL | own better by | seeds | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for m in cross:
            base, other = m.split("[")[0], m.split("[")[1].rstrip("]")
            for t in tasks:
                if (t, m) not in agg or (t, base) not in agg:
                    continue
                own, oth = agg[(t, base)], agg[(t, m)]
                per = {r["seed"]: r["kl"] for r in rows if r["task"] == t and r["method"] == base}
                diffs = [r["kl"] - per[r["seed"]] for r in rows if r["task"] == t and r["method"] == m
                         and r["seed"] in per]
                dm, ds = _ms(diffs)
                n = len(diffs)
                if n < 2:
                    verdict = "one seed"
                elif dm > 0 and dm > ds:
                    verdict = "own better (paired diff > its sd)"
                elif dm < 0 and -dm > ds:
                    verdict = "other better (paired diff > its sd)"
                else:
                    verdict = "no difference beyond seed spread"
                L.append(f"| {t} | {base} | {own[0]:.4f} ± {own[1]:.4f} | {oth[0]:.4f} ± {oth[1]:.4f} | "
                         f"{dm:+.4f} ± {ds:.4f} | {n} | {verdict} |")
    return "\n".join(L) + "\n"


def _load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for r in csv.DictReader(path.open()):
        r = dict(r)
        r["seed"] = int(r["seed"])
        for k in ("kl", "kl_all", "top1", "nll", "average_bits"):
            if k in r:
                r[k] = float(r[k]) if r[k] not in ("", None) else None
        out.append(r)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", nargs="+", default=["mmlu", "gsm8k"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    p.add_argument("--cross", nargs="*", default=list(CROSS), choices=CANDIDATES,
                   help="candidates whose circuits are also evaluated on the other tasks (task specificity)")
    p.add_argument("--no-diagnostics", dest="diagnostics", action="store_false")
    p.add_argument("--fresh", action="store_true", help="drop the rows already in --out-csv instead of merging")
    p.add_argument("--aggregate-only", action="store_true", help="rebuild the summary from --out-csv")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--fraction", type=float, default=None, help="default: circuitq's DEFAULT_FRACTION")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=48)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-csv", default=str(HERE / "results" / "saliency_why.csv"))
    p.add_argument("--out-md", default=str(HERE / "SALIENCY_WHY.md"))
    a = p.parse_args()
    t0 = time.perf_counter()
    csv_path = Path(a.out_csv)
    diag_path = csv_path.with_name(csv_path.stem + "_diagnostics.csv")
    rows = [] if a.fresh else _load_rows(csv_path)
    diags = [] if a.fresh or not diag_path.exists() else [dict(d, seed=int(d["seed"])) for d in
                                                         csv.DictReader(diag_path.open())]
    if a.aggregate_only:
        _write(rows, diags, a, t0)
        return 0
    from circuitq import DEFAULT_FRACTION, load_model

    a.fraction = a.fraction or DEFAULT_FRACTION
    a.cross = [c for c in a.cross if c in a.candidates]
    lm = load_model(a.model)
    for seed in a.seeds:
        prepared = {}
        for t in a.tasks:
            prepared[t] = prepare_task(lm, t, seed, a)
            if prepared[t]["diag"]:
                diags = [d for d in diags if not (d["task"] == t and d["seed"] == seed)]
                diags.append({"task": t, "seed": seed, **prepared[t]["diag"]})
        new = evaluate_seed(lm, prepared, seed, a)
        keys = {(r["task"], r["seed"], r["method"]) for r in new}
        rows = [r for r in rows if (r["task"], r["seed"], r["method"]) not in keys] + new
        rows.sort(key=lambda r: (r["seed"], r["task"]))
        _write(rows, diags, a, t0)
        del prepared
    return 0


def _write(rows, diags, a, t0) -> None:
    import shlex

    csv_path = Path(a.out_csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["task", "seed", "method", "kl", "kl_all", "top1", "nll", "average_bits"]
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if diags:
        dk = ["task", "seed"] + sorted({k for d in diags for k in d if k not in ("task", "seed")})
        with open(csv_path.with_name(csv_path.stem + "_diagnostics.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=dk, restval="")
            w.writeheader()
            w.writerows(diags)
    log = csv_path.with_name(csv_path.stem + "_commands.txt")
    cmds = log.read_text().splitlines() if log.exists() else []
    cmd = "python analyses/saliency_why.py " + shlex.join(sys.argv[1:])
    if not a.aggregate_only and cmd not in cmds:
        cmds.append(cmd)
        log.write_text("\n".join(cmds) + "\n")
    Path(a.out_md).write_text(summary(rows, diags, "`; `".join(cmds) or cmd, time.perf_counter() - t0))


if __name__ == "__main__":
    sys.exit(main())
