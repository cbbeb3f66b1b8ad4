"""The ``circuitq`` subcommands: each parses its flags (generated from ``circuitq.config``), builds
its config and calls the library (``circuitq.pipeline``). No logic of its own beyond printing."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from circuitq import __version__
from circuitq.cli.flags import add_flags, build, given_flags
from circuitq.config import DEFAULT_MODEL, EvalJob, FaithfulnessJob, MaskConfig, QuantizeJob, RunConfig, ScoreConfig
from circuitq.errors import UsageError, human_bytes

QUANT = [("--bits", "quantize.bits"), ("--group-size", "quantize.group_size"), ("--sym", "quantize.sym"),
         ("--mse", "quantize.mse"), ("--act-order", "quantize.act_order"), ("--hessian", "quantize.hessian"),
         ("--damp", "quantize.damp")]
DATA = [("--split-seed", "data.split_seed"), ("--shots", "data.shots"), ("--template", "data.template"),
        ("--eval-split", "data.eval_split"), ("--data-dir", "data.data_dir")]

SCORE_FLAGS = [("--model", "model"), ("--task", "task"), ("--method", "method"), *QUANT,
               ("--samples", "calib.samples"), ("--seq-len", "calib.seq_len"),
               ("--batch-size", ("calib.batch_size", "quantize.batch_size")), ("--batch-tokens", "calib.batch_tokens"),
               ("--calib-tokens", "calib.tokens"), ("--attention", "calib.attention"), ("--loss", "calib.loss"),
               ("--recompute", "calib.recompute"), ("--objective", "calib.objective"),
               ("--seed", "calib.seed"), *DATA, ("--checkpoint-every", "checkpoint_every"), ("--ig-steps", "ig_steps")]
QUANTIZE_FLAGS = [("--model", "model"), ("--calib", "task"), *QUANT, ("--method", "quantize.method"),
                  ("--samples", "calib.samples"), ("--seq-len", "calib.seq_len"), ("--calib-tokens", "calib.tokens"),
                  ("--seed", "calib.seed"), *DATA,
                  ("--batch-size", ("quantize.batch_size", "eval.batch_size")), ("--ppl-windows", "eval.ppl_windows"),
                  ("--gptq-format", "gptq_format")]
MASK_FLAGS = [("--per-layer", "per_layer"), ("--combine", "combine")]
EVAL_FLAGS = [("--task", "task"), ("--split", "split"), ("--limit", "eval.samples"), ("--seq-len", "eval.seq_len"),
              ("--batch-size", "eval.batch_size"), ("--no-all-tokens", "eval.all_tokens"), *DATA,
              ("--generate", "generate"),
              ("--max-new-tokens", "max_new_tokens")]
RUN_FLAGS = [("--model", "model"), ("--tasks", "tasks"), ("--bits", "bits"), ("--fraction", "mask.fraction"),
             ("--baselines", "baselines"), ("--no-transfer", "transfer"), ("--faithfulness", "faithfulness"),
             ("--head-maps", "head_maps"), ("--map-samples", "map_samples"),
             ("--calib-samples", "calib.samples"),
             ("--calib-seq-len", "calib.seq_len"), ("--calib-tokens", "calib.tokens"), ("--eval-samples", "eval.samples"),
             ("--eval-seq-len", "eval.seq_len"), ("--no-all-tokens", "eval.all_tokens"), *QUANT[1:],
             ("--batch-size", ("calib.batch_size", "quantize.batch_size", "eval.batch_size")),
             ("--batch-tokens", "calib.batch_tokens"), ("--attention", "calib.attention"), ("--loss", "calib.loss"),
             ("--recompute", "calib.recompute"), ("--seed", "calib.seed"), *DATA]
FAITH_FLAGS = [("--task", "task"), ("--units", "units"), ("--all-units", "all_units"), ("--top", "top"),
               ("--random", "random"), ("--estimators", "estimators"), ("--ig-steps", "ig_steps"), ("--window", "window"), ("--curve", "curve"),
               ("--curve-grid", "curve_grid"), ("--ablation", "ablation"), ("--fraction", "fraction"), ("--measured", "measured"), ("--seed", ("seed", "calib.seed")),
               ("--calib-samples", "calib.samples"), ("--objective", "calib.objective"),
               ("--eval-samples", "eval.samples"), ("--bits", "quantize.bits"),
               ("--group-size", "quantize.group_size"), *DATA]
# command -> (default config, flag table): what the CLI-defaults test walks
TABLES = {"faithfulness": (FaithfulnessJob(), FAITH_FLAGS), "score": (ScoreConfig(), SCORE_FLAGS), "quantize": (QuantizeJob(), QUANTIZE_FLAGS),
          "mask": (MaskConfig(), MASK_FLAGS), "eval": (EvalJob(), EVAL_FLAGS), "run": (RunConfig(), RUN_FLAGS)}


def device_for(arg: str | None) -> str:
    import torch

    if arg:
        if arg.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {arg} asked for, but no CUDA device is available")
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def _preset(p) -> None:
    from circuitq.presets import PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a named recipe (circuitq/presets.py); tacq-paper = TaCQ as the official code computes it: "
                        "all-token loss, 5-shot raw MMLU / 8-shot CoT GSM8k, a 128x2048-token calibration budget, "
                        "sequential per-channel GPTQ with MSE scales for Q(W) and the final model. A flag that "
                        "contradicts it is an error")


def _common(p, out_required=True) -> None:
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--out", required=out_required)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


# ---- quantize ---------------------------------------------------------------------------------
def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with (mask-aware) GPTQ or RTN and export it",
                       description="Quantize every decoder linear weight; weights in --mask stay 16-bit. Calibrates "
                                   "on the --calib task's calibration items (never its evaluation items). Writes "
                                   "OUT/hf (plain HF model), OUT/gptq (packed GPTQ, --gptq-format, + 16-bit sidecar), OUT/circuitq.json.")
    add_flags(p, QuantizeJob(), QUANTIZE_FLAGS)
    _preset(p)
    p.add_argument("--mask", help="safetensors mask (HF weight name -> bool) or a TaCQ torch-saved dict")
    p.add_argument("--plan", nargs="*", metavar="PATTERN=BITS",
                   help="per-weight bits by HF name regex (exact name first, then first match; 16 keeps)")
    _common(p)
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(a) -> int:
    import torch

    from circuitq.artifacts import check_writable
    from circuitq.model.loading import load_model
    from circuitq.pipeline.stages import quantize_and_export
    from circuitq.quant.plan import PrecisionPlan
    from circuitq.saliency.masks import load_masks

    job = build(QuantizeJob(), a, QUANTIZE_FLAGS)
    check_writable(a.out, a.overwrite)
    plan = PrecisionPlan.parse(job.quantize.bits, a.plan)
    torch.manual_seed(job.calib.seed)
    device = device_for(a.device)
    lm = load_model(job.model, device="cpu")
    masks, meta = (None, {})
    if a.mask:
        mf = load_masks(a.mask)
        masks, meta = mf.masks, {**mf.metadata, "path": a.mask}
    res = quantize_and_export(lm, job, a.out, masks=masks, mask_meta=meta, plan=plan, overwrite=a.overwrite,
                              device=device)
    ppl = res.perplexity
    print(f"[circuitq] {job.quantize.method} {job.quantize.bits}-bit in {res.seconds:.1f}s, average "
          f"{res.average_bits:.4f} bits/weight, {res.n_16bit} weights in 16-bit"
          + (f"; held-out perplexity {ppl['original']:.3f} -> {ppl['quantized']:.3f}" if ppl["quantized"] else ""))
    from circuitq.model.packed import GPTQ_FORMATS, resolve_gptq_format

    fmt = resolve_gptq_format(job.gptq_format, job.quantize.sym)
    print(f"[circuitq] wrote {res.out}/hf (HF model), {res.out}/gptq (packed GPTQ {fmt}, checkpoint_format "
          f"{GPTQ_FORMATS[fmt]}, + sparse 16-bit sidecar), {res.out}/circuitq.json")
    return 0


# ---- score ------------------------------------------------------------------------------------
def add_score(sub) -> None:
    from circuitq.saliency.methods import METHODS

    p = sub.add_parser("score", help="score every linear weight by how much quantizing it hurts a task",
                       description="Per-sample gradients through TransformerLens hooks -> Q(W) -> saliency scores. "
                                   "Shard with: torchrun --nproc-per-node K -m circuitq score ...")
    add_flags(p, ScoreConfig(), SCORE_FLAGS)
    _preset(p)
    for act in p._actions:
        if act.dest == "cfg__method":
            act.choices = [*METHODS, "ig"]   # ig: integrated gradients (pipeline.score.run_ig)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    _common(p)
    p.set_defaults(func=cmd_score)


def cmd_score(a) -> int:
    import torch

    from circuitq.data.tasks import TaskSpec
    from circuitq.model.loading import load_model
    from circuitq.pipeline.score import run_score
    from circuitq.saliency.objectives import check_objective

    cfg = build(ScoreConfig(), a, SCORE_FLAGS)
    check_objective(cfg.calib.objective, TaskSpec.parse(cfg.task).kind, cfg.calib.loss)   # before the model loads
    torch.manual_seed(cfg.calib.seed)
    lm = load_model(cfg.model, device=device_for(a.device))
    out = run_score(lm, cfg, a.out, resume=a.resume, overwrite=a.overwrite)
    print(f"[circuitq] wrote scores to {out}")
    return 0


# ---- mask -------------------------------------------------------------------------------------
def add_mask(sub) -> None:
    d = MaskConfig()
    p = sub.add_parser("mask", help="select the circuit: top weights of one or more score directories",
                       description=f"Global top-k by --fraction (default {d.fraction * 100:.2f}%%) or by --target-bits; "
                                   "several --scores are combined with --combine union|intersection.")
    p.add_argument("--scores", nargs="+", required=True, help="score directories from `circuitq score`")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fraction", type=float, default=None, help=f"share of weights kept 16-bit (default {d.fraction})")
    g.add_argument("--target-bits", type=float, default=None, help="average bits to reach (exact accounting)")
    add_flags(p, d, MASK_FLAGS)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_mask)


def cmd_mask(a) -> int:
    from dataclasses import replace

    from circuitq.artifacts import check_writable
    from circuitq.pipeline.stages import select
    from circuitq.saliency.files import load_scores
    from circuitq.saliency.masks import mask_fraction, mask_metadata, save_masks

    check_writable(a.out, a.overwrite)
    cfg = build(MaskConfig(), a, MASK_FLAGS)
    cfg = replace(cfg, **({"fraction": a.fraction} if a.fraction is not None else {}), target_bits=a.target_bits)
    files = [load_scores(s) for s in a.scores]
    models = {f["meta"].get("model_source") for f in files}
    if len(models) > 1:
        raise UsageError(f"the score directories come from different models: {sorted(map(str, models))}")
    m0 = files[0]["meta"]
    mask = select([f["scores"] for f in files], cfg, m0.get("bits"), m0.get("group_size"))
    meta = mask_metadata(mask, model=m0.get("model"), model_source=m0.get("model_source"),
                         task="+".join(f["meta"]["task"] for f in files), method=m0.get("method"),
                         bits=m0.get("bits"), group_size=m0.get("group_size"), requested_fraction=a.fraction,
                         samples=m0.get("n_samples"), seq_len=m0.get("seq_len"), seed=m0.get("seed"),
                         target_bits=a.target_bits, per_layer=cfg.per_layer,
                         combine=cfg.combine if len(files) > 1 else None, scores=[str(s) for s in a.scores])
    save_masks(a.out, mask, meta, overwrite=a.overwrite)
    print(f"[circuitq] wrote {a.out}: {mask_fraction(mask):.4%} of weights kept in 16-bit")
    return 0


# ---- compare ----------------------------------------------------------------------------------
def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare two task circuits (e.g. MMLU vs GSM8k) in an HTML report")
    p.add_argument("dir_a", help="score directory of the first task")
    p.add_argument("dir_b", help="score directory of the second task")
    p.add_argument("--fraction", type=float, default=MaskConfig().fraction, help="circuit budget for both")
    p.add_argument("--top-n", type=int, default=20, help="heads/neurons compared")
    p.add_argument("--out", required=True, help="REPORT.html (also writes REPORT.json and REPORT.heads.png)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_compare)


def cmd_compare(a) -> int:
    from circuitq.circuits.compare import write_compare_report
    from circuitq.errors import require_extra
    from circuitq.pipeline.stages import compare
    from circuitq.saliency.files import load_scores

    require_extra("plots", "circuitq compare (an HTML report with figures)")
    res = compare(load_scores(a.dir_a), load_scores(a.dir_b), a.fraction, a.top_n)
    out = write_compare_report(res, a.out, a.overwrite)
    g = res["masks"]["global"]
    print(f"[circuitq] IoU {g['iou']:.3f}, intersection/min {g['iom']:.3f}, head Spearman "
          f"{res['circuits']['head_spearman']:.3f}; wrote {out}")
    return 0


# ---- eval -------------------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a task, against a reference model",
                       description="Accuracy (MMLU), task NLL, and against --reference: KL(ref || model), "
                                   "top-1 agreement and MMLU flips. Writes OUT (.json) and OUT with .csv (per item).")
    p.add_argument("--model", required=True, help="quantized model: OUT/hf of `circuitq quantize`, any HF dir, or alias")
    p.add_argument("--reference", default=None, help="reference model (e.g. the original)")
    add_flags(p, EvalJob(), EVAL_FLAGS)
    _common(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(a) -> int:
    from circuitq.artifacts import check_writable
    from circuitq.model.loading import load_model
    from circuitq.pipeline.stages import evaluate_task, write_eval

    job = build(EvalJob(), a, EVAL_FLAGS)
    out = check_writable(a.out, a.overwrite)
    check_writable(out.with_suffix(".csv"), a.overwrite)   # its per-item table beside it
    device = device_for(a.device)
    lm = load_model(a.model, device=device)
    ref = load_model(a.reference, device=device) if a.reference else None
    doc, items = evaluate_task(lm, job, ref)
    write_eval(out, doc, items, a.overwrite)
    m = doc["metrics"]
    keys = ("kl", "top1_agreement", "nll_per_token", m.get("task_metric"), "accuracy", "kl_all", "perplexity")
    shown = {k: m[k] for k in keys if k and m.get(k) is not None}
    print(f"[circuitq] {job.task} ({m['items']} items): " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return 0


# ---- run --------------------------------------------------------------------------------------
def add_run(sub) -> None:
    p = sub.add_parser("run", help="the main job: circuits, quantized models, evaluation and a report",
                       description="For each bit width and task: score with TaCQ, keep the top --fraction in 16-bit, "
                                   "quantize with mask-aware GPTQ and evaluate against the original on held-out items; "
                                   "with GPTQ, baseline masks and cross-task transfer at the same budget. Finished "
                                   "steps are reused: rerun the same command to resume.")
    add_flags(p, RunConfig(), RUN_FLAGS)
    _preset(p)
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--out", default="runs/main", help="run directory (created, or resumed if it holds a run)")
    p.set_defaults(func=cmd_run)


def cmd_run(a) -> int:
    import shlex

    import torch

    from circuitq.artifacts import LOCK_NAME, check_dir_writable
    from circuitq.model.loading import load_model
    from circuitq.pipeline.run import check_run_config, run
    from circuitq.quant.driver import check_group_size

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a run directory; choose another --out")
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()) and not (
            (out / "run.json").exists() or (out / "steps").is_dir()):
        raise UsageError(f"{out} exists and is not a circuitq run directory; choose another --out")
    cfg = build(RunConfig(), a, RUN_FLAGS)
    check_dir_writable(out)   # before the model is loaded: a read-only --out costs nothing
    check_run_config(cfg)
    torch.manual_seed(cfg.calib.seed)
    device = device_for(a.device)
    lm = load_model(cfg.model, device=device)
    check_group_size(lm.model, cfg.quantize)
    res = run(lm, cfg, out, device, command="circuitq " + shlex.join(a._argv))
    print(f"[circuitq] {len(res.rows)} result rows; report: {out / 'report.html'}; tables: {out / 'results.csv'}, "
          f"{out / 'transfer.csv'}")
    return 0


# ---- app --------------------------------------------------------------------------------------
def add_app(sub) -> None:
    p = sub.add_parser("app", help="open the explorer (Streamlit) on a runs directory")
    p.add_argument("--runs", default="runs", help="directory holding runs (from `circuitq run` or `circuitq score`)")
    p.add_argument("--port", type=int, default=None,
                   help="server port (default: Streamlit's own setting: STREAMLIT_SERVER_PORT, .streamlit/config.toml, "
                        "else 8501)")
    p.add_argument("--host", default="localhost")
    p.set_defaults(func=cmd_app)


def app_command(script, runs, host: str, port: int | None) -> list[str]:
    """The Streamlit command line; ``--server.port`` only when a port was asked for, so that
    ``STREAMLIT_SERVER_PORT`` and ``.streamlit/config.toml`` apply otherwise."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true",
           "--server.address", host, "--browser.gatherUsageStats", "false"]
    if port is not None:
        cmd[5:5] = ["--server.port", str(port)]
    return cmd + ["--", "--runs", str(runs)]


def cmd_app(a) -> int:
    import os
    import subprocess

    from circuitq import app as app_pkg
    from circuitq.errors import require_extra

    script = Path(app_pkg.__file__).resolve().parent / "explorer.py"
    require_extra("app", "the explorer")
    runs = Path(a.runs)
    if not runs.is_dir():
        print(f"[circuitq] {runs} does not exist yet; the explorer will say how to create a run")
    cmd = app_command(script, runs, a.host, a.port)
    port = a.port or os.environ.get("STREAMLIT_SERVER_PORT") or "Streamlit's configured port (default 8501)"
    print(f"[circuitq] explorer on http://{a.host}:{port} (runs: {runs.resolve()}); Ctrl-C stops it", flush=True)
    if os.name == "posix":  # become the server, so stopping this process stops it
        os.execv(sys.executable, cmd)
    return subprocess.call(cmd)


# ---- faithfulness -------------------------------------------------------------------------------
def add_faithfulness(sub) -> None:
    p = sub.add_parser("faithfulness", help="does the circuit's attribution predict what replacing its parts does?",
                       description="Replace one unit at a time (head, KV head, neuron block, module) by Q(W), zero or "
                                   "its row mean, measure the task loss on the evaluation items, and compare with the "
                                   "predicted change of each --estimators; then the circuit vs a random set of the same "
                                   "size; with --curve, faithfulness curves (keep the top k units in 16-bit, replace the "
                                   "rest, and the converse). Writes OUT (JSON), OUT with .csv (one row per unit) and, "
                                   "with --curve, OUT with .curves.csv (one row per point).")
    add_flags(p, FaithfulnessJob(), FAITH_FLAGS)
    p.add_argument("--scores", required=True, help="a scores directory (circuitq score or a run's scores step)")
    p.add_argument("--model", default=None, help="default: the model the scores were made on")
    _common(p)
    p.set_defaults(func=cmd_faithfulness)


def cmd_faithfulness(a) -> int:
    from dataclasses import replace

    import torch

    from circuitq.artifacts import check_writable, read_json, write_csv, write_json
    from circuitq.circuits.faithfulness import reusable_measurements
    from circuitq.model.loading import load_model
    from circuitq.pipeline.stages import check_estimators, faithfulness
    from circuitq.saliency.files import load_scores

    job = build(FaithfulnessJob(), a, FAITH_FLAGS)
    check_estimators(job.estimators, job.calib.objective)
    out = check_writable(a.out, a.overwrite)
    for sibling in (".csv",) + ((".curves.csv",) if job.curve else ()):   # refused before the work, not after
        check_writable(out.with_suffix(sibling), a.overwrite)
    if job.measured:   # an unreadable file is refused before the model loads
        reusable_measurements(read_json(job.measured, "--measured"), None)
    sf = load_scores(a.scores)
    meta = sf["meta"]
    job = replace(job, task=job.task or meta.get("task"))
    if not job.task:
        raise UsageError("the scores do not name their task; pass --task")
    from circuitq.data.tasks import TaskSpec
    from circuitq.saliency.objectives import check_objective

    check_objective(job.calib.objective, TaskSpec.parse(job.task).kind, job.calib.loss)   # before the model loads
    if "--bits" not in given_flags(a._argv) and meta.get("bits"):   # --bits 3 and --bits=3 alike
        job = replace(job, quantize=replace(job.quantize, bits=int(meta["bits"])))
    torch.manual_seed(job.seed)
    lm = load_model(a.model or meta.get("model_source") or meta.get("model"), device=device_for(a.device))
    rep = faithfulness(lm, sf["scores"], job)
    rep.update(scores=str(a.scores), model=lm.name, model_note=lm.note)
    write_json(out, rep, overwrite=a.overwrite, compact_lists=True)
    write_csv(out.with_suffix(".csv"), [{"unit": u["label"], "size": u["size"], **{f"predicted_{k}": v for k, v in
                                         u["predicted"].items()}, "measured_loss": u["measured_loss"],
                                         "measured_metric": u["measured_metric"]} for u in rep["units"]], a.overwrite)
    if "curves" in rep:
        write_csv(out.with_suffix(".curves.csv"), [
            {"ordering": o, "mode": mode, **pt} for o, modes in rep["curves"]["orderings"].items()
            for mode, c in modes.items() for pt in c["points"]], a.overwrite)
        print("[circuitq] faithfulness curves (area = mean recovery over the grid): " + "; ".join(
            f"{o} keep-top {m['keep-top']['area']:.3f}, replace-top {m['replace-top']['area']:.3f}"
            for o, m in rep["curves"]["orderings"].items()))
    if rep.get("noise_ceiling"):
        nc = rep["noise_ceiling"]
        print(f"[circuitq] measurement noise: the changes measured on the even and the odd items agree with Spearman "
              f"{nc['split_half_spearman']:.3f}, so a perfect predictor would reach about {nc['ceiling']:.3f}")
    for e, er in (rep.get("estimator_reliability") or {}).items():
        if er:
            print(f"[circuitq] estimator noise: {e} over the even and the odd of its {er['items']} calibration items "
                  f"agrees with itself at Spearman {er['split_half_spearman']:.3f} (reliability {er['reliability']:.3f}; "
                  f"twice the items: about {er['reliability_doubled']:.3f}, --calib-samples {2 * er['items']})")
    if rep.get("attenuation"):
        print("[circuitq] with both samples this noisy, an estimator ranking the units perfectly over all items would "
              "reach about: " + ", ".join(f"{k} {v['attainable']:.3f} (this one, corrected for both noises: "
                                          f"{v['corrected']:.3f})" for k, v in rep["attenuation"].items()))
    if "completeness" in rep:
        ig = rep["completeness"]["ig"]
        print(f"[circuitq] ig completeness: Σ attributions {ig['attributed']:+.4f} vs measured {ig['measured']:+.4f} "
              f"(gap {ig['gap']:.1%}, {rep['completeness']['ig_steps']} steps)")
        d = rep["completeness"].get("path_diagnosis")
        if d:
            from circuitq.saliency.attribution import describe_path

            print(f"[circuitq] ig path: {describe_path(d, ig['gap'])}")
        if rep.get("ig_cost"):
            c = rep["ig_cost"]
            print(f"[circuitq] ig cost: {c['seconds']:.0f} s for {c['passes']} passes over {c['calibration_tokens']} "
                  f"calibration tokens ({c['seconds_per_step']:.1f} s per step, {c['tokens_per_second']:.0f} tokens/s)")
    c = rep["contrasts"]
    print(f"[circuitq] {len(rep['units'])} {job.units} units on {job.task} ({job.ablation}): Spearman(predicted, "
          f"measured) " + ", ".join(f"{k} {v:.3f}" for k, v in rep["spearman"].items())
          + f"; only the circuit {c['only circuit']['loss_change']:+.4f} vs only random "
            f"{c['only random']['loss_change']:+.4f} nats; all but the circuit {c['all but circuit']['loss_change']:+.4f} "
            f"vs all but random {c['all but random']['loss_change']:+.4f}")
    for stat, d in ((rep.get("robust") or {}).get("statistics") or {}).items():
        name = "median" if stat == "median" else f"{rep['robust']['trim']:.0%}-trimmed mean"
        print(f"[circuitq] robust to a few heavy items, each unit's {name} item change of the loss: Spearman "
              + ", ".join(f"{k} {v:.3f}" for k, v in d["spearman"].items())
              + "".join(f", {k} by its own {stat} item {v:.3f}" for k, v in (d.get("spearman_matched") or {}).items())
              + (f" (a perfect predictor: about {d['noise_ceiling']['ceiling']:.3f})" if d.get("noise_ceiling") else ""))
    if rep.get("spearman_metric"):
        print(f"[circuitq] against the measured change of the task metric ({rep['metric']}, sign flipped; the estimators' "
              f"objective: {rep['objective']}): " + ", ".join(f"{k} {v:.3f}" for k, v in rep["spearman_metric"].items())
              + (f" (a perfect predictor: about {rep['noise_ceiling_metric']['ceiling']:.3f})"
                 if rep.get("noise_ceiling_metric") else ""))
    if rep.get("timing"):
        print("[circuitq] time by stage: " + "; ".join(f"{k} {v:.0f} s" for k, v in rep["timing"]["seconds"].items()))
    if rep.get("memory"):
        print("[circuitq] peak memory by stage: " + "; ".join(f"{k} {human_bytes(v)}" for k, v in
                                                           rep["memory"]["measured_peak_bytes"].items()))
    print(f"[circuitq] wrote {out}, {out.with_suffix('.csv')}" + (f" and {out.with_suffix('.curves.csv')}"
                                                                 if "curves" in rep else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="circuitq", description="Task-Circuit Quantization (TaCQ) toolkit")
    p.add_argument("--version", action="version", version=f"circuitq {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_quantize, add_score, add_mask, add_compare, add_eval, add_run, add_faithfulness, add_app):
        add(sub)
    for sp in [p, *sub.choices.values()]:   # no abbreviations: a flag means what the code checks for
        sp.allow_abbrev = False
    return p


__all__ = ["build_parser", "TABLES", "DEFAULT_MODEL"]
