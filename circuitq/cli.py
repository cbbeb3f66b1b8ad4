"""``circuitq`` command line: parses arguments and calls the library. Defaults come from the
library's config dataclasses."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from circuitq import __version__
from circuitq.data.calib import CalibConfig
from circuitq.model.loading import DEFAULT_MODEL
from circuitq.quant.driver import QuantizeConfig
from circuitq.saliency.score import ScoreConfig

_QD, _CD, _SD = QuantizeConfig(), CalibConfig(), ScoreConfig()


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with (mask-aware) GPTQ or RTN and export it",
                       description="Quantize every decoder linear weight; weights in --mask stay 16-bit. "
                                   "Writes OUT/hf (plain HF model), OUT/gptq (packed GPTQ v1 + 16-bit sidecar) "
                                   "and OUT/circuitq.json.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias {DEFAULT_MODEL}, a local HF directory or a hub id")
    p.add_argument("--mask", help="safetensors mask (HF weight name -> bool) or a TaCQ torch-saved dict")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=_QD.bits)
    p.add_argument("--group-size", type=int, default=_QD.group_size, help="-1 = per output channel")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--mse", action="store_true", help="MSE clipping search for scales")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    p.add_argument("--method", choices=["gptq", "rtn"], default=_QD.method)
    p.add_argument("--hessian", choices=["sequential", "shared"], default=_QD.hessian,
                   help="sequential: GPTQ's layer-by-layer recipe; shared: one pass of the original model, all "
                        "modules batched (several times faster, slightly lower quality)")
    p.add_argument("--plan", nargs="*", metavar="PATTERN=BITS",
                   help="per-weight bits by HF name regex (exact name first, then first match; 16 keeps)")
    p.add_argument("--calib", default=_CD.source, help="gsm8k, mmlu or text:PATH (.txt/.jsonl)")
    p.add_argument("--samples", type=int, default=_CD.samples)
    p.add_argument("--seq-len", type=int, default=_CD.seq_len)
    p.add_argument("--seed", type=int, default=_CD.seed)
    p.add_argument("--data-dir", help="folder with mmlu/ and gsm8k/ in their public layouts")
    p.add_argument("--batch-size", type=int, default=_QD.batch_size)
    p.add_argument("--damp", type=float, default=_QD.damp)
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--ppl-windows", type=int, default=16, help="held-out windows for perplexity (0 = skip)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_quantize)


def _device(arg: str | None) -> str:
    import torch

    if arg:
        if arg.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {arg} asked for, but no CUDA device is available")
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_quantize(a: argparse.Namespace) -> int:
    import torch

    from circuitq.artifacts import check_writable
    from circuitq.data.calib import build_calibration
    from circuitq.evals import perplexity
    from circuitq.quant.export import export_all
    from circuitq.saliency.masks import load_masks, mask_fraction, validate_masks
    from circuitq.model.loading import load_model
    from circuitq.quant.plan import PrecisionPlan
    from circuitq.quant.driver import quantize_model, target_shapes
    from circuitq.quant.quantizer import QuantSpec

    check_writable(a.out, a.overwrite)
    QuantSpec(bits=a.bits, group_size=a.group_size)  # validate early
    plan = PrecisionPlan.parse(a.bits, a.plan)
    torch.manual_seed(a.seed)
    device = _device(a.device)
    lm = load_model(a.model, device="cpu")
    shapes = target_shapes(lm.model)
    for name, (_, in_f) in shapes.items():
        QuantSpec(bits=a.bits, group_size=a.group_size).n_groups(in_f)
    masks, mask_meta = None, {}
    if a.mask:
        mf = load_masks(a.mask)
        missing = validate_masks(mf.masks, shapes)
        if missing:
            print(f"[circuitq] the mask does not mention {len(missing)} targeted weights; they get no 16-bit entries")
        masks, mask_meta = mf.masks, mf.metadata
        print(f"[circuitq] mask {a.mask}: {mask_fraction(masks):.4%} of the weights it covers stay 16-bit")
    ccfg = CalibConfig(a.calib, a.samples, a.seq_len, a.seed)
    data = build_calibration(ccfg, lm.tokenizer, a.data_dir, heldout_windows=max(a.ppl_windows, 1))
    qcfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=a.sym, mse=a.mse, method=a.method,
                          damp=a.damp, act_order=a.act_order, batch_size=a.batch_size, hessian=a.hessian)
    ppl_before = perplexity(lm.model, data.heldout, a.batch_size) if a.ppl_windows else None
    res = quantize_model(lm.model, data.calib if a.method == "gptq" else None, plan, qcfg, masks, device)
    ppl_after = perplexity(lm.model, data.heldout, a.batch_size) if a.ppl_windows else None
    meta = {"model": a.model, "model_source": lm.source, "model_note": lm.note, "method": a.method,
            "bits": a.bits, "group_size": a.group_size, "sym": a.sym, "mse": a.mse, "act_order": a.act_order,
            "hessian": a.hessian, "damp": a.damp, "plan": plan.to_dict(), "calib": ccfg.source, "samples": a.samples,
            "seq_len": a.seq_len, "seed": a.seed, "mask": a.mask, "mask_metadata": mask_meta,
            "device": device, "circuitq_version": __version__, "average_bits": res.bits.average_bits}
    summary = {**res.summary(), "heldout_perplexity": {"original": ppl_before, "quantized": ppl_after,
                                                       "windows": int(data.heldout.shape[0])}}
    out = export_all(a.out, lm.model, lm.tokenizer, res.qweights, meta, summary, a.overwrite)
    print(f"[circuitq] {a.method} {a.bits}-bit in {res.seconds:.1f}s, average {res.bits.average_bits:.4f} bits/weight, "
          f"{res.bits.nnz} weights in 16-bit" + (f"; held-out perplexity {ppl_before:.3f} -> {ppl_after:.3f}" if ppl_after else ""))
    print(f"[circuitq] wrote {out}/hf (HF model), {out}/gptq (packed GPTQ v1 + sparse 16-bit sidecar), {out}/circuitq.json")
    return 0


def _add_score(sub) -> None:
    from circuitq.saliency.methods import METHODS

    p = sub.add_parser("score", help="score every linear weight by how much quantizing it hurts a task",
                       description="Per-sample gradients through TransformerLens hooks -> saliency scores. "
                                   "Shard with: torchrun --nproc-per-node K -m circuitq score ...")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--task", default=_SD.task, help="mmlu, mmlu:CATEGORY, mmlu:SUBJECT, gsm8k, text:PATH, jsonl:PATH")
    p.add_argument("--method", default=_SD.method, choices=list(METHODS))
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=_SD.bits)
    p.add_argument("--group-size", type=int, default=_SD.group_size)
    p.add_argument("--samples", type=int, default=_SD.samples)
    p.add_argument("--seq-len", type=int, default=_SD.seq_len)
    p.add_argument("--batch-size", type=int, default=_SD.batch_size, help="samples per forward/backward (at most)")
    p.add_argument("--batch-tokens", type=int, default=_SD.batch_tokens,
                   help="padded tokens per forward/backward (at most; 0 = no limit): bounds memory")
    p.add_argument("--attention", choices=["sdpa", "eager", "bridge"], default=_SD.attention,
                   help="sdpa: HF's fused attention inside the TransformerLens bridge (less memory); "
                        "bridge: TransformerLens's step-by-step attention. Same scores")
    p.add_argument("--shots", type=int, default=_SD.shots, help="MMLU few-shot examples from the dev split")
    p.add_argument("--seed", type=int, default=_SD.seed)
    p.add_argument("--data-dir")
    p.add_argument("--device", default=None)
    p.add_argument("--checkpoint-every", type=int, default=_SD.checkpoint_every, help="samples between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_score)


def cmd_score(a: argparse.Namespace) -> int:
    import torch

    from circuitq.model.loading import load_model
    from circuitq.saliency.score import run_score

    torch.manual_seed(a.seed)
    lm = load_model(a.model, device=_device(a.device))
    if a.batch_size < 1 or a.batch_tokens < 0:
        raise ValueError("--batch-size must be at least 1 and --batch-tokens at least 0 (0 = no limit)")
    cfg = ScoreConfig(a.task, a.method, a.bits, a.group_size, a.samples, a.seq_len, a.batch_size, a.seed,
                      a.shots, a.checkpoint_every, a.batch_tokens, a.attention)
    out = run_score(lm, cfg, a.out, a.data_dir, a.resume, a.overwrite)
    print(f"[circuitq] wrote scores to {out}")
    return 0


def _add_mask(sub) -> None:
    p = sub.add_parser("mask", help="select the circuit: top weights of one or more score directories",
                       description="Global top-k by --fraction (default 0.35%%) or by --target-bits; "
                                   "several --scores are combined with --combine union|intersection.")
    p.add_argument("--scores", nargs="+", required=True, help="score directories from `circuitq score`")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fraction", type=float, default=None, help="fraction of weights kept 16-bit (default 0.0035)")
    g.add_argument("--target-bits", type=float, default=None, help="average bits to reach (exact accounting)")
    p.add_argument("--per-layer", action="store_true", help="the same fraction in every decoder layer")
    p.add_argument("--combine", choices=["union", "intersection"], default="union")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_mask)


def cmd_mask(a: argparse.Namespace) -> int:
    from circuitq.saliency.masks import combine, fraction_for_bits, mask_fraction, save_masks, select_per_layer, select_topk
    from circuitq.artifacts import check_writable
    from circuitq.saliency.score import load_scores

    check_writable(a.out, a.overwrite)
    files = [load_scores(s) for s in a.scores]
    models = {f["meta"].get("model_source") for f in files}
    if len(models) > 1:
        raise ValueError(f"the score directories come from different models: {sorted(map(str, models))}")
    masks = []
    for f in files:
        sc, meta = f["scores"], f["meta"]
        frac = a.fraction if a.fraction is not None else 0.0035
        if a.target_bits is not None:
            frac = fraction_for_bits(a.target_bits, meta["bits"], meta["group_size"],
                                     {n: tuple(t.shape) for n, t in sc.items()})
        masks.append((select_per_layer if a.per_layer else select_topk)(sc, frac))
    mask = masks[0] if len(masks) == 1 else combine(masks, a.combine)
    m0 = files[0]["meta"]
    meta = {"model": m0.get("model"), "model_source": m0.get("model_source"),
            "task": "+".join(f["meta"]["task"] for f in files), "method": m0.get("method"),
            "bits": m0.get("bits"), "group_size": m0.get("group_size"), "fraction": mask_fraction(mask),
            "requested_fraction": a.fraction, "target_bits": a.target_bits, "per_layer": a.per_layer,
            "combine": a.combine if len(files) > 1 else None, "samples": m0.get("n_samples"),
            "seq_len": m0.get("seq_len"), "seed": m0.get("seed"), "scores": [str(s) for s in a.scores],
            "circuitq_version": __version__}
    save_masks(a.out, mask, meta, overwrite=a.overwrite)
    print(f"[circuitq] wrote {a.out}: {mask_fraction(mask):.4%} of weights kept in 16-bit")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare two task circuits (e.g. MMLU vs GSM8k) in an HTML report")
    p.add_argument("dir_a", help="score directory of the first task")
    p.add_argument("dir_b", help="score directory of the second task")
    p.add_argument("--fraction", type=float, default=0.0035, help="circuit budget for both")
    p.add_argument("--top-n", type=int, default=20, help="heads/neurons compared")
    p.add_argument("--out", required=True, help="REPORT.html (also writes REPORT.json and REPORT.heads.png)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_compare)


def cmd_compare(a: argparse.Namespace) -> int:
    from circuitq.circuits.compare import compare_dirs, write_compare_report

    res = compare_dirs(a.dir_a, a.dir_b, a.fraction, a.top_n)
    out = write_compare_report(res, a.out, a.overwrite)
    g = res["masks"]["global"]
    print(f"[circuitq] IoU {g['iou']:.3f}, intersection/min {g['iom']:.3f}, head Spearman "
          f"{res['circuits']['head_spearman']:.3f}; wrote {out}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a task, against a reference model",
                       description="Accuracy (MMLU), task NLL, and against --reference: KL(ref || model), "
                                   "top-1 agreement and MMLU flips. Writes OUT (.json) and OUT with .csv (per item).")
    p.add_argument("--model", required=True, help="quantized model: OUT/hf of `circuitq quantize`, any HF dir, or alias")
    p.add_argument("--reference", default=None, help="reference model (e.g. the original)")
    p.add_argument("--task", default="mmlu", help="mmlu, mmlu:CATEGORY, mmlu:SUBJECT, gsm8k, text:PATH, jsonl:PATH")
    p.add_argument("--split", default="eval", choices=["eval", "calib"])
    p.add_argument("--limit", type=int, default=None, help="at most this many items of the split")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--generate", action="store_true",
                   help="gsm8k: also generate greedily and score the final number by exact match (slow on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--data-dir")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(a: argparse.Namespace) -> int:
    import csv
    import io
    import json

    from circuitq.artifacts import atomic_file, check_writable
    from circuitq.evals import check_same_vocab, evaluate
    from circuitq.model.loading import load_model
    from circuitq.data.tasks import TaskSpec, load_examples

    out = check_writable(a.out, a.overwrite)
    device = _device(a.device)
    lm = load_model(a.model, device=device)
    ref = load_model(a.reference, device=device) if a.reference else None
    if ref is not None:
        check_same_vocab(lm.tokenizer, ref.tokenizer, lm.model, ref.model)
    spec = TaskSpec.parse(a.task)
    examples = load_examples(a.task, a.split, None, a.seed, a.shots, a.data_dir, lm.tokenizer)
    if a.limit is not None and a.limit > len(examples):
        print(f"[circuitq] --limit {a.limit} is larger than the {a.split} split ({len(examples)} items); using all of it")
    examples = examples[: a.limit] if a.limit else examples
    if a.generate and spec.kind != "gsm8k":
        raise ValueError("--generate scores GSM8k final answers; use it with --task gsm8k")
    res = evaluate(lm.model, lm.tokenizer, examples, spec.kind, ref.model if ref else None, a.batch_size, a.seq_len)
    if a.generate:
        from circuitq.evals import generate_exact_match

        gen = generate_exact_match(lm.model, lm.tokenizer, examples, a.max_new_tokens, a.batch_size)
        res.metrics["generation"] = {k: gen[k] for k in ("exact_match", "items", "unparseable")}
        if gen["unparseable"]:
            print(f"[circuitq] {gen['unparseable']} of {gen['items']} generations contain no number (counted as wrong)")
    doc = {"format": "circuitq.eval", "version": __version__, "model": a.model, "reference": a.reference,
           "task": a.task, "split": a.split, "seed": a.seed, "shots": a.shots, "limit": a.limit,
           "model_note": lm.note or (ref.note if ref else ""), "metrics": res.metrics}
    with atomic_file(out, overwrite=a.overwrite) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    buf = io.StringIO()
    cols = sorted({k for r in res.items for k in r})
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(res.items)
    with atomic_file(out.with_suffix(".csv"), overwrite=True) as tmp:
        tmp.write_text(buf.getvalue())
    m = res.metrics
    shown = {k: m[k] for k in ("kl", "top1_agreement", "nll_per_token", "accuracy", "perplexity") if k in m}
    print(f"[circuitq] {a.task} ({m['items']} items): " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return 0


def _add_run(sub) -> None:
    from circuitq.pipeline.run import RunConfig

    d = RunConfig()
    p = sub.add_parser("run", help="the main job: circuits, quantized models, evaluation and a report",
                       description="For each bit width and task: score with TaCQ, keep the top --fraction in 16-bit, "
                                   "quantize with mask-aware GPTQ and evaluate against the original on held-out items; "
                                   "with GPTQ, magnitude/spqr/grad/random masks and cross-task transfer at the same "
                                   "budget. Finished steps are reused: rerun the same command to resume.")
    p.add_argument("--model", default=d.model, help=f"alias {DEFAULT_MODEL}, a local HF directory or a hub id")
    p.add_argument("--tasks", nargs="+", default=list(d.tasks), help="tasks as in `circuitq score --task`")
    p.add_argument("--bits", nargs="+", type=int, choices=[2, 3, 4, 8], default=list(d.bits))
    p.add_argument("--fraction", type=float, default=d.fraction, help="share of weights kept in 16-bit")
    p.add_argument("--baselines", nargs="*", default=list(d.baselines), help="mask methods compared with tacq")
    p.add_argument("--no-transfer", action="store_true", help="skip the cross-task and union circuits")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="held-out items per task")
    p.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len)
    p.add_argument("--group-size", type=int, default=d.group_size, help="-1 = per output channel")
    p.add_argument("--hessian", choices=["shared", "sequential"], default=d.hessian,
                   help="shared: one Hessian pass per task reused by every mask (fast); sequential: GPTQ's "
                        "layer-by-layer recipe for every model (best quality; for GPUs)")
    p.add_argument("--damp", type=float, default=d.damp)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed, help="calibration sampling seed")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="calibration/evaluation split (keep fixed)")
    p.add_argument("--shots", type=int, default=d.shots)
    p.add_argument("--data-dir")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/main", help="run directory (created, or resumed if it holds a run)")
    p.set_defaults(func=cmd_run)


def cmd_run(a: argparse.Namespace) -> int:
    import shlex

    import torch

    from circuitq.model.loading import load_model
    from circuitq.quant.quantizer import QuantSpec
    from circuitq.pipeline.run import RunConfig, run

    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not ((out / "run.json").exists() or (out / "steps").is_dir()):
        raise ValueError(f"{out} exists and is not a circuitq run directory; choose another --out")
    cfg = RunConfig(a.model, tuple(a.tasks), tuple(a.bits), a.fraction, tuple(a.baselines), not a.no_transfer,
                    a.calib_samples, a.calib_seq_len, a.eval_samples, a.eval_seq_len, a.group_size, a.hessian,
                    a.damp, a.batch_size, a.seed, a.split_seed, a.shots)
    for b in cfg.bits:
        QuantSpec(bits=b, group_size=cfg.group_size)
    torch.manual_seed(a.seed)
    device = _device(a.device)
    lm = load_model(a.model, device=device)
    from circuitq.quant.driver import target_shapes

    for _, (_, in_f) in target_shapes(lm.model).items():
        QuantSpec(bits=cfg.bits[0], group_size=cfg.group_size).n_groups(in_f)
    res = run(lm, cfg, out, a.data_dir, device, command="circuitq " + shlex.join(a._argv))
    print(f"[circuitq] {len(res.rows)} result rows; report: {out / 'report.html'}; tables: {out / 'results.csv'}, "
          f"{out / 'transfer.csv'}")
    return 0


def _add_app(sub) -> None:
    p = sub.add_parser("app", help="open the explorer (Streamlit) on a runs directory")
    p.add_argument("--runs", default="runs", help="directory holding runs (from `circuitq run` or `circuitq score`)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="localhost")
    p.set_defaults(func=cmd_app)


def cmd_app(a: argparse.Namespace) -> int:
    import importlib.util
    import os
    import subprocess

    from circuitq import app as app_pkg

    script = Path(app_pkg.__file__).resolve().parent / "explorer.py"
    if importlib.util.find_spec("streamlit") is None:
        raise ValueError("the explorer needs streamlit: pip install 'circuitq[app]' (or: pip install streamlit)")
    runs = Path(a.runs)
    if not runs.is_dir():
        print(f"[circuitq] {runs} does not exist yet; the explorer will say how to create a run")
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true", "--server.port",
           str(a.port), "--server.address", a.host, "--browser.gatherUsageStats", "false", "--", "--runs", str(runs)]
    print(f"[circuitq] explorer on http://{a.host}:{a.port} (runs: {runs.resolve()}); Ctrl-C stops it", flush=True)
    if os.name == "posix":  # become the server, so stopping this process stops it
        os.execv(sys.executable, cmd)
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="circuitq", description="Task-Circuit Quantization (TaCQ) toolkit")
    p.add_argument("--version", action="version", version=f"circuitq {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_score(sub)
    _add_mask(sub)
    _add_compare(sub)
    _add_eval(sub)
    _add_run(sub)
    _add_app(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args._argv = list(argv) if argv is not None else sys.argv[1:]
    from circuitq.model.arch import UnsupportedArchitecture
    from circuitq.data.readers import DataError
    from circuitq.quant.export import ExportError
    from circuitq.quant.gptq import HessianError
    from circuitq.saliency.masks import MaskError
    from circuitq.model.loading import ModelLoadError
    from circuitq.circuits.compare import CompareError
    from circuitq.evals import TokenizerMismatch

    known = (TokenizerMismatch, CompareError, UnsupportedArchitecture, DataError, ExportError, HessianError, MaskError, ModelLoadError,
             FileExistsError, ValueError, FloatingPointError)
    t0 = time.perf_counter()
    try:
        rc = args.func(args)
    except known as e:
        print(f"circuitq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitq: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    print(f"[circuitq] {args.command} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
