"""The pipeline's stages as library functions, one per stage, called by every entry point (the
CLI's ``score``, ``quantize``, ``eval`` and ``run``, the explorer's export jobs and the Python
API):

    gradients -> Q(W) -> scores -> mask -> quantize (+ export) -> evaluate

Each takes a model already in memory and typed settings from ``circuitq.config``, and returns
tensors or a small result object; none reads or writes files except ``export`` (and
``quantize_and_export``, which is ``circuitq quantize`` as a function). Caching, step keys
and file layout belong to the drivers (``pipeline.run``, ``pipeline.score``).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from circuitq import __version__, allocator
from circuitq.artifacts import check_writable, read_json, write_csv, write_json
from circuitq.circuits.compare import compare_scores
from circuitq.circuits.faithfulness import (
    LayerReplay,
    SplitHalves,
    UnitEstimate,
    evaluation_passes,
    faithfulness_curves,
    faithfulness_report,
    item_statistic,
    replacement,
    reusable_measurements,
    union,
    unit_order,
    unit_values,
    units,
)
from circuitq.config import CalibConfig, EvalConfig, MaskConfig, QuantizeConfig, QuantizeJob, to_dict
from circuitq.data.calib import calibration_sequences, heldout_windows
from circuitq.data.tasks import TASK_KINDS, Task, tokenize_examples
from circuitq.errors import UsageError
from circuitq.evals import check_same_vocab, generate_exact_match, perplexity
from circuitq.evals import evaluate as _evaluate
from circuitq.model.arch import Geometry, arch_for, target_shapes
from circuitq.pipeline.budget import PeakMeter
from circuitq.pipeline.store import examples_digest, model_fingerprint
from circuitq.quant.driver import check_group_size, quantize_copy, quantize_model, qw_quantization
from circuitq.quant.driver import collect_hessians as _collect
from circuitq.quant.driver import qw_stream as _stream
from circuitq.quant.export import export_all
from circuitq.quant.hessians import write_hessians as _write
from circuitq.quant.plan import PrecisionPlan
from circuitq.saliency.attribution import (
    denoising_attribution,
    gauss_legendre,
    integrated_gradients,
    local_attribution,
    path_diagnosis,
    second_order,
)
from circuitq.saliency.capture import STATS, collect_stats
from circuitq.saliency.masks import (
    combine,
    fraction_for_bits,
    mask_fraction,
    select_per_layer,
    select_rank_max,
    select_topk,
    validate_masks,
)
from circuitq.saliency.methods import METHODS, SaliencyInputs, compute_scores
from circuitq.saliency.methods import method as saliency_method
from circuitq.saliency.objectives import check_objective


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def needed_stats(method: str) -> tuple[str, ...]:
    """The gradient statistics a saliency method reads (``()`` for task-free methods)."""
    return tuple(s for s in STATS if s in saliency_method(method).stats)


def collect_gradients(model, tokenizer, examples, calib: CalibConfig = CalibConfig(), stats=("sum_abs",), *,
                      state=None, start: int = 0, progress: bool = True, on_batch=None, model_path: str | None = None):
    """Per-sample gradient statistics of ``examples`` (``Σ|G_s|`` etc., ``{stat: {HF weight
    name: [out, in]}}`` in a ``GradStats``) through TransformerLens hooks on a bridge booted
    around ``model`` for the call. Returns ``CollectResult`` (``stats``, ``truncated``,
    ``seconds``, ``tokens_per_s``). ``state``/``start``/``on_batch`` continue and checkpoint."""
    path = model_path or getattr(model.config, "_name_or_path", "") or "model"
    return collect_stats(model, tokenizer, examples, path, batch_size=calib.batch_size, seq_len=calib.seq_len,
                         stats=stats or ("sum_abs",), state=state, start=start, progress=progress, on_batch=on_batch,
                         batch_tokens=calib.batch_tokens, attention=calib.attention, loss=calib.loss,
                         recompute=calib.recompute, objective=calib.objective)


# ---------------------------------------------------------------------------------------------
# Hessians and Q(W)
# ---------------------------------------------------------------------------------------------
def calibration_tokens(examples, tokenizer, calib: CalibConfig):
    """The calibration items as GPTQ's Hessians see them: one item per sequence, right-padded,
    with a mask of the real tokens (``data.calib.Sequences``: ``ids``/``mask`` ``[N, L]``)."""
    return calibration_sequences(examples, tokenizer, calib.seq_len)


def collect_hessians(model, windows: torch.Tensor, qcfg: QuantizeConfig, device=None, progress: bool = True):
    """Every linear input's Hessian from one pass of the unquantized model (shared mode)."""
    return _collect(model, windows, qcfg.batch_size, device, progress)


def write_hessians(model, windows, dest, qcfg: QuantizeConfig, device=None, progress: bool = True):
    """Every linear input's Hessian and GPTQ factor, layer by layer into the directory ``dest``
    (``quant.hessians.write_hessians``; read back with ``HessianFile``)."""
    return _write(model, windows, dest, batch_size=qcfg.batch_size, damp=qcfg.damp, device=device, progress=progress)


def qw_stream(model, qcfg: QuantizeConfig, windows=None, *, hessians=None, need_hinv: bool = False, device=None,
              progress: bool = False):
    """``Q(W)`` one module at a time (``quant.driver.qw_stream``): what ``quantized_weights``
    returns, without holding it."""
    return _stream(model, qcfg, windows, hessians=hessians, need_hinv=need_hinv, device=device, progress=progress)


def qw_config(method: str, qcfg: QuantizeConfig) -> QuantizeConfig:
    """The quantizer whose ``Q(W)`` ``method`` contrasts with: the final quantizer's settings,
    with GPTQ or RTN as the method names it (``tacq-rtn`` -> RTN)."""
    q = saliency_method(method).quantizer
    return replace(qcfg, method=q) if q else qcfg


def quantized_weights(model, qcfg: QuantizeConfig, windows: torch.Tensor | None = None, *, hessians=None,
                      need_hinv: bool = False, device=None, progress: bool = False):
    """``Q(W)`` of every targeted weight (``quant.driver.qw_quantization``): the one
    function ``score``, ``run`` and the API use."""
    return qw_quantization(model, qcfg, windows, hessians=hessians, need_hinv=need_hinv, device=device,
                           progress=progress)


# ---------------------------------------------------------------------------------------------
# scores and masks
# ---------------------------------------------------------------------------------------------
def score_weights(method: str, model, stats=None, quantized=None, seed: int = 0, *,
                  reference=None) -> dict[str, torch.Tensor]:
    """Scores ``{HF weight name: [out, in] float32}`` of every targeted weight of ``model``.

    ``stats``: a ``GradStats`` (or its ``tensors`` dict) with what the method reads;
    ``quantized``: the ``Q(W)`` from ``quantized_weights``, made by the quantizer the method
    names (a GPTQ ``Q(W)`` given to ``tacq-rtn`` is an error, not a silent substitution);
    ``reference=`` is its name before 0.6.2, still accepted."""
    qw = quantized if quantized is not None else reference   # Q(W), whichever name it came by
    m = saliency_method(method)
    if m.quantizer:
        if qw is None:
            raise UsageError(f"method '{method}' needs Q(W) from {m.quantizer}: pass quantized=quantized_weights(...)")
        if qw.config.method != m.quantizer:
            raise UsageError(f"method '{method}' contrasts with {m.quantizer} but the given Q(W) came from "
                             f"{qw.config.method}; build it with qw_config('{method}', ...)")
        if m.hessian and not qw.hinv_diag:
            raise UsageError(f"method '{method}' needs the inverse-Hessian diagonals: quantized_weights(need_hinv=True)")
    tensors = getattr(stats, "tensors", stats) or {}
    weights = {n: model.get_parameter(n).detach() for n in target_shapes(model)}
    ref_w = qw.weights if qw is not None and m.quantizer else None
    hinv = qw.hinv_diag if qw is not None and m.hessian else None
    errors = qw.errors if qw is not None and m.hessian else None
    return compute_scores(method, SaliencyInputs(weights, ref_w, tensors if m.stats else {}, hinv, seed, errors))


def stream_scores(methods, model, stats=None, qw=None, seed: int = 0):
    """Scores of several methods, one weight matrix at a time: yields ``(HF weight name, {method:
    [out, in] float32})``; equal to ``score_weights`` per method. ``qw``: an iterable of
    ``quant.driver.QWModule`` (``qw_stream``: one ``Q(W)`` for every method given, so they
    must share their quantizer) or None when no method needs ``Q(W)``. ``stats``: a ``GradStats``
    or ``{stat: {name: tensor}}`` mapping (read one matrix at a time when lazy). Memory: one
    module's weight, ``Q(W)``, statistics and scores."""
    ms = {m: saliency_method(m) for m in methods}
    quantizers = {m.quantizer for m in ms.values()}
    if len(quantizers) > 1:
        raise UsageError(f"methods {list(methods)} contrast with different quantizers {quantizers}; stream them apart")
    tensors = getattr(stats, "tensors", stats) or {}
    wanted = sorted({s for m in ms.values() for s in m.stats})
    if quantizers != {None}:
        if qw is None:
            raise UsageError(f"methods {list(methods)} need Q(W): pass qw=qw_stream(...)")
        items = ((r.name, r.weight, r.quantized, r.hinv_diag, r.errors) for r in qw)
    else:
        items = ((n, model.get_parameter(n).detach(), None, None, None) for n in target_shapes(model))
    for n, w, q, hinv, err in items:
        st = {s: {n: tensors[s][n]} for s in wanted}
        inp = SaliencyInputs({n: w}, None if q is None else {n: q}, st, None if hinv is None else {n: hinv}, seed,
                             None if err is None else {n: err})
        yield n, {m: compute_scores(m, inp)[n] for m in methods}


def select(scores, mask: MaskConfig = MaskConfig(), bits: int | None = None,
           group_size: int | None = None) -> dict[str, torch.Tensor]:
    """The circuit: bool masks ``{HF weight name: [out, in]}`` of the weights kept in 16-bit.

    ``scores``: one ``{name: [out, in]}`` dict or a list of them (combined by ``mask.combine``).
    ``mask.target_bits`` needs the base ``bits`` and ``group_size`` for the exact accounting."""
    many = scores if isinstance(scores, (list, tuple)) else [scores]
    if len(many) > 1 and mask.combine == "rank-max":
        if mask.target_bits is not None or mask.per_layer:
            raise UsageError("rank-max combines at a global --fraction (no --target-bits or --per-layer)")
        return select_rank_max(list(many), mask.fraction)
    out = []
    for sc in many:
        frac = mask.fraction
        if mask.target_bits is not None:
            if bits is None or group_size is None:
                raise UsageError("target_bits needs the base bits and group size of the quantizer")
            frac = fraction_for_bits(mask.target_bits, bits, group_size, {n: tuple(t.shape) for n, t in sc.items()})
        out.append((select_per_layer if mask.per_layer else select_topk)(sc, frac))
    return out[0] if len(out) == 1 else combine(out, mask.combine)


# ---------------------------------------------------------------------------------------------
# quantize, export
# ---------------------------------------------------------------------------------------------
def quantize(model, qcfg: QuantizeConfig, windows: torch.Tensor | None = None, *, hessians=None, masks=None,
             device=None, progress: bool = True, inplace: bool = False):
    """Mask-aware quantization: ``(quantized model, QuantizeResult)``. ``masks`` keep weights in
    16-bit; ``windows`` (``[N, L]`` token ids) or shared ``hessians`` calibrate GPTQ. The
    original is untouched unless ``inplace``."""
    if not inplace:
        return quantize_copy(model, qcfg, windows, hessians=hessians, masks=masks, device=device, progress=progress)
    return model, quantize_model(model, windows, PrecisionPlan(qcfg.bits), qcfg, masks=masks, device=device,
                                 progress=progress, hessians=hessians)


def export(out, model, tokenizer, result, meta: dict, summary: dict | None = None, *, overwrite: bool = False) -> Path:
    """Write ``out/hf`` (plain HF model), ``out/gptq`` (packed GPTQ, layout ``meta["gptq_format"]``
    auto/v1/v2, default v1, + 16-bit sidecar) and
    ``out/circuitq.json``, atomically."""
    return export_all(out, model, tokenizer, result.qweights, meta, summary or result.summary(), overwrite=overwrite)


class QuantizeOutcome(NamedTuple):
    out: Path
    average_bits: float
    n_16bit: int
    seconds: float
    perplexity: dict


def quantize_and_export(lm, job: QuantizeJob, out, *, masks=None, mask_meta: dict | None = None, plan=None,
                        overwrite: bool = False, device=None, progress: bool = True, say=print) -> QuantizeOutcome:
    """``circuitq quantize`` as a function: calibrate on ``job.task``'s calibration items,
    quantize ``lm.model`` in place with ``masks`` kept 16-bit, measure held-out perplexity on the
    task's evaluation items before and after, and export to ``out``."""
    check_writable(out, overwrite)
    q = job.quantize
    shapes = target_shapes(lm.model)
    check_group_size(lm.model, q)
    if masks is not None:
        missing = validate_masks(masks, shapes)
        if missing:
            say(f"[circuitq] the mask does not mention {len(missing)} targeted weights; they get no 16-bit entries")
        say(f"[circuitq] {mask_fraction(masks):.4%} of the weights the mask covers stay 16-bit")
    task = Task(job.task, job.data, lm.tokenizer)
    calib_items = task.calib_for(job.calib)
    windows = calibration_tokens(calib_items, lm.tokenizer, job.calib) if q.method == "gptq" else None
    held = heldout_windows(task.eval_items(), lm.tokenizer, job.calib.seq_len, job.eval.ppl_windows) \
        if job.eval.ppl_windows else None
    ppl_before = perplexity(lm.model, held, job.eval.batch_size) if held is not None else None
    res = quantize_model(lm.model, windows, plan or PrecisionPlan(q.bits), q, masks=masks, device=device,
                         progress=progress)
    ppl_after = perplexity(lm.model, held, job.eval.batch_size) if held is not None else None

    meta = {"model": lm.name, "model_source": lm.source, "model_note": lm.note, "settings": to_dict(job),
            "method": q.method, "bits": q.bits, "group_size": q.group_size, "sym": q.sym, "mse": q.mse,
            "act_order": q.act_order, "hessian": q.hessian, "damp": q.damp,
            "plan": (plan or PrecisionPlan(q.bits)).to_dict(), "calib": job.task, "samples": len(calib_items),
            "seq_len": job.calib.seq_len, "seed": job.calib.seed, "mask_metadata": mask_meta or {},
            "device": str(device or next(lm.model.parameters()).device), "circuitq_version": __version__,
            "average_bits": res.bits.average_bits, "gptq_format": job.gptq_format}
    ppl = {"original": ppl_before, "quantized": ppl_after, "windows": int(held.shape[0]) if held is not None else 0,
           "source": f"{job.task} evaluation split"}
    path = export(out, lm.model, lm.tokenizer, res, meta, {**res.summary(), "heldout_perplexity": ppl},
                  overwrite=overwrite)
    return QuantizeOutcome(Path(path), res.bits.average_bits, res.bits.nnz, res.seconds, ppl)


# ---------------------------------------------------------------------------------------------
# evaluate, compare
# ---------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, examples, kind: str, *, reference=None, cfg: EvalConfig = EvalConfig(),
             progress: bool = True, logits_out: dict | None = None, reference_logits: dict | None = None):
    """KL(reference ‖ model), top-1 agreement, task NLL, MMLU accuracy and flips on ``examples``
    (``evals.evaluate``), and for MMLU with ``cfg.all_tokens`` the same over every token
    (``kl_all``, ``top1_all``, ``nll_all``); ``cfg.samples`` limits the items."""
    items = list(examples)[: cfg.samples] if cfg.samples else list(examples)
    with allocator.fast():   # the CLI's: activations from the heap, returned after (circuitq/allocator.py)
        return _evaluate(model, tokenizer, items, kind, reference=reference, batch_size=cfg.batch_size,
                         seq_len=cfg.seq_len, progress=progress, logits_out=logits_out,
                         reference_logits=reference_logits, all_tokens=cfg.all_tokens)


def compare(a, b, fraction: float = MaskConfig().fraction, top_n: int = 20, geometry: Geometry | None = None) -> dict:
    """Two circuits at one budget: overlap (IoU, intersection/min, per layer and module type),
    head and neuron maps, Spearman of the head maps. ``a``, ``b``: loaded score files
    (``{"scores", "meta"}``), or plain ``{name: [out, in]}`` score dicts with ``geometry``."""
    def wrap(x, label):
        if "scores" in x and "meta" in x:
            return x
        if geometry is None:
            raise UsageError("plain score dicts need geometry=Geometry.from_config(model.config)")
        return {"scores": x, "meta": {"geometry": geometry.to_dict(), "task": label, "method": "?",
                                      "model_source": "in-memory"}}

    return compare_scores(wrap(a, "a"), wrap(b, "b"), fraction, top_n)


def evaluate_task(lm, job, ref=None, say=print) -> tuple[dict, list[dict]]:
    """``circuitq eval`` as a function: ``lm`` (a ``LoadedModel``) on ``job.task``'s ``job.split``
    items, against ``ref`` when given. Returns the evaluation document and per-item records."""
    if ref is not None:
        check_same_vocab(lm.tokenizer, ref.tokenizer, lm.model, ref.model)
    task = Task(job.task, job.data, lm.tokenizer)
    if job.generate and task.kind != "gsm8k":
        raise UsageError("--generate scores GSM8k final answers; use it with --task gsm8k")
    items = task.split(job.split)
    if job.eval.samples is not None and job.eval.samples > len(items):
        say(f"[circuitq] --limit {job.eval.samples} is larger than the {job.split} split ({len(items)} items); "
            "using all of it")
    res = evaluate(lm.model, lm.tokenizer, items, task.kind, reference=ref.model if ref else None, cfg=job.eval)
    if job.generate:
        gen = generate_exact_match(lm.model, lm.tokenizer, list(items)[: job.eval.samples], job.max_new_tokens,
                                   job.eval.batch_size)
        res.metrics["generation"] = {k: gen[k] for k in ("exact_match", "items", "unparseable")}
        if gen["unparseable"]:
            say(f"[circuitq] {gen['unparseable']} of {gen['items']} generations contain no number (counted as wrong)")
    doc = {"format": "circuitq.eval", "version": __version__, "model": lm.name, "reference": ref.name if ref else None,
           "task": job.task, "split": job.split, "sources": task.sources, "settings": to_dict(job), "split_seed": job.data.split_seed,
           "shots": job.data.shots, "limit": job.eval.samples, "model_note": lm.note or (ref.note if ref else ""),
           "metrics": res.metrics}
    return doc, res.items


def write_eval(out, doc: dict, items: list[dict], overwrite: bool = False) -> None:
    """``OUT`` (the evaluation document, JSON) and ``OUT`` with ``.csv`` (one row per item)."""
    out = Path(out)
    check_writable(out.with_suffix(".csv"), overwrite)   # both refused before either is written
    write_json(out, doc, overwrite=overwrite)
    write_csv(out.with_suffix(".csv"), items, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# faithfulness
# ---------------------------------------------------------------------------------------------


# the scores file; integrated gradients; attribution patching with the unit's sublayer recomputed; attribution
# patching at the model with every unit replaced (the denoising direction); atp-local with the empirical-Fisher
# second-order term (saliency.attribution)
BUILTIN_ESTIMATORS = ("score", "ig", "atp-local", "atp-local2", "atp-local-median", "atp-local-trimmed", "atp-window",
                      "atp-window2", "atp-denoise")
# one shared local_attribution pass; -median / -trimmed: its per-item terms summarised by a robust statistic
LOCAL_ESTIMATORS = ("atp-local", "atp-local2", "atp-local-median", "atp-local-trimmed")
ROBUST_LOCAL = {"atp-local-median": "median", "atp-local-trimmed": "trimmed"}
WINDOW_ESTIMATORS = ("atp-window", "atp-window2")  # one shared local_attribution pass over --window layers
SECOND_ORDER = {"atp-local2": "atp-local", "atp-window2": "atp-window"}   # NLL only


def faithfulness_estimators() -> tuple[str, ...]:
    """What ``--estimators`` accepts: ``score``, ``ig`` and every saliency method that needs no
    GPTQ factors (their ``Q(W)`` is the faithfulness check's replacement)."""
    return BUILTIN_ESTIMATORS + tuple(m for m in METHODS if not saliency_method(m).hessian)


def check_estimators(estimators, objective: str = "nll") -> None:
    """One line naming the allowed values for an unknown estimator, or the objective an estimator
    needs (before any work)."""
    allowed = faithfulness_estimators()
    bad = [e for e in estimators if e not in allowed]
    if bad:
        raise UsageError(f"unknown estimator {', '.join(bad)} for --estimators; choose from {', '.join(allowed)}")
    second = [e for e in estimators if e in SECOND_ORDER]
    if second and objective != "nll":
        raise UsageError(f"--estimators {second[0]} adds the empirical Fisher of the NLL, which --objective "
                         f"{objective} has not: use --objective nll, or {SECOND_ORDER[second[0]]} with the metric")


def faithfulness(lm, scores: dict, job, say=print, progress: bool = True) -> dict:
    """``circuitq faithfulness`` as a function: per unit, the predicted change (the unit sum of each
    of ``job.estimators``: the scores, attribution patching ``ΣG·ΔW``, integrated gradients, any
    saliency method; gradients from the calibration items) against the measured change of the task
    loss on the evaluation items when only that unit is replaced; the circuit-vs-random contrasts;
    with ``job.curve``, faithfulness curves per estimator and a random ordering
    (``circuits.faithfulness``). ``ablation="quantize"`` replaces entries by their round-to-nearest
    value at ``job.quantize``'s bits and group size (elementwise, so a subset can be quantized
    alone; GPTQ's values are a joint solution), and that is the ``Q(W)`` every estimator sees.
    Memory: the model, ``W`` views, the replacement (``4 · P_lin``), one gradient pass's statistics
    (``4 · P_lin`` per statistic), one weight-level estimator's values at a time (``4 · P_lin``, reduced to
    its unit sums as soon as it is made; before 0.8.8 every estimator's were held to the end, ``4 · P_lin`` each;
    ``ig`` adds ``8 · P_lin`` and one gradient pass's activations while it runs; ``16 · P_lin`` before 0.8.6) and the
    units' masks (``P_lin`` bytes per unit kind's cover).
    Additive methods (``SaliencyMethod.additive``: atp, atp-abs, tacq, grad, fisher) are also
    computed on the first half of the calibration items before the statistics carry on over the
    second, for their split-half reliability (``estimator_reliability``): the same gradient pass,
    one more ``4 · P_lin`` temporary per method while its unit sums are taken. The measurement adds
    the layer replay (``4 · (⌈√L⌉ + 1) · T_eval · d``; every layer's ``4 · L · T_eval · d`` before 0.8.6), a contrast's saved weights (``4 · P_lin``) and its
    masks (``P_lin`` bytes each, four) and the circuit's selection (``12 · k``; before 0.8.5 a sort of
    every score, ``~23 · P_lin`` at its peak: 2.5 GB of SmolLM2's 5.1). Measured per stage in the
    report's ``memory``."""
    check_estimators(job.estimators, job.calib.objective)
    task = Task(job.task, job.data, lm.tokenizer)
    check_objective(job.calib.objective, task.kind, job.calib.loss)
    model = lm.model
    names = list(target_shapes(model))
    missing = [n for n in names if n not in scores]
    if missing:
        raise UsageError(f"the scores do not cover {len(missing)} weights of this model (e.g. {missing[0]}): "
                         "score this model first")
    items = task.eval_items(job.eval.samples)
    calib_items = task.calib_for(job.calib)
    weights = {n: model.get_parameter(n).detach() for n in names}
    unit_list = units({n: tuple(w.shape) for n, w in weights.items()}, Geometry.from_config(model.config), job.units)
    if len(unit_list) < 3:
        raise UsageError(f"--units {job.units}: this model has {len(unit_list)} such units and a rank correlation needs "
                         "at least 3; choose finer units (--units sublayers, modules, heads or neurons)")
    methods = [e for e in job.estimators if e not in BUILTIN_ESTIMATORS]
    local = any(e in LOCAL_ESTIMATORS for e in job.estimators)
    windowed = any(e in WINDOW_ESTIMATORS for e in job.estimators)
    passes = evaluation_passes(len(unit_list), all_units=job.all_units, top=job.top, n_random=job.random,
                               curve_points=len(set(job.curve_grid)) if job.curve else 0,
                               orderings=len(job.estimators) + 1, reused=bool(job.measured))
    say(f"[circuitq] faithfulness on {job.task}: up to {passes} evaluation passes of {len(items)} items "
        f"({len(unit_list) if job.all_units else min(len(unit_list), job.top + job.random)} of {len(unit_list)} "
        f"{job.units} units{' measured earlier (--measured)' if job.measured else ''}{', curves' if job.curve else ''}) and "
        f"{1 + (job.ig_steps if 'ig' in job.estimators else 0) + local + windowed + ('atp-denoise' in job.estimators)} "
        f"gradient passes of {len(calib_items)} items"
        + (f", and {len(unit_list)} sublayer reruns per batch of them for "
           f"{'/'.join(e for e in LOCAL_ESTIMATORS if e in job.estimators)}" if local else "")
        + (f", and {len(unit_list)} reruns of {job.window + 1} decoder layers per batch of them for "
           f"{'/'.join(e for e in WINDOW_ESTIMATORS if e in job.estimators)}" if windowed else ""))
    key = {"model_fingerprint": model_fingerprint(model), "task": job.task, "eval_items": examples_digest(items),
           "eval": to_dict(job.eval), "units": job.units, "ablation": job.ablation,
           "bits": job.quantize.bits if job.ablation == "quantize" else None,
           "group_size": job.quantize.group_size if job.ablation == "quantize" else None}
    prior = reusable_measurements(read_json(job.measured, "--measured"), key) if job.measured else None
    meter = PeakMeter()   # the peak resident memory of each stage below, in the report
    quantized = None
    with meter.stage("Q(W) and the replacement"):
        if job.ablation == "quantize":
            # entry by entry: round-to-nearest at the same bits and group size. GPTQ's Q(W) is a joint
            # solution (its updates compensate other entries' errors), so putting GPTQ values into a
            # subset of entries is not the effect of quantizing that subset.
            quantized = quantized_weights(model, replace(job.quantize, method="rtn"), progress=progress).weights
        values = replacement(weights, job.ablation, quantized)
    need = sorted({"sum"} | {s for m in methods for s in saliency_method(m).stats})
    # additive methods (sums over items) are also computed on the first half of the items, and the
    # second half's values are the full's minus the first's: their split-half reliability at no
    # extra gradient pass and no second set of statistics
    additive = [m for m in methods if saliency_method(m).additive]
    first = {}
    with meter.stage("gradient pass"):
        if additive and len(calib_items) >= 2:
            grads = collect_gradients(model, lm.tokenizer, calib_items[0::2], job.calib, tuple(need),
                                      progress=progress)["stats"]
            for m in additive:
                first[m] = unit_values(unit_list, compute_scores(m, SaliencyInputs(weights, values, grads.tensors, None,
                                                                                   job.seed)))
            grads = collect_gradients(model, lm.tokenizer, calib_items[1::2], job.calib, tuple(need), state=grads,
                                      progress=progress)["stats"]
        else:
            grads = collect_gradients(model, lm.tokenizer, calib_items, job.calib, tuple(need), progress=progress)["stats"]
    est: dict[str, dict] = {}
    with meter.stage("unit attribution (atp-local, atp-window)"):
        terms = UnitEstimate(*local_attribution(model, lm.tokenizer, calib_items, unit_list, values, job.calib,
                                                progress=progress, per_item=True)) if local else None
        wterms = UnitEstimate(*local_attribution(model, lm.tokenizer, calib_items, unit_list, values, job.calib,
                                                 progress=progress, per_item=True, window=job.window)) if windowed else None
    with meter.stage("other estimators (ig, atp-denoise, weight-level)"):
        for e in job.estimators:
            if e == "score":
                est[e] = {n: scores[n].float() for n in names}
            elif e == "ig":
                t0 = time.perf_counter()
                est[e], comp = integrated_gradients(model, lm.tokenizer, calib_items, values, job.calib,
                                                    steps=job.ig_steps, model_path=lm.source, progress=progress)
                ig_seconds = time.perf_counter() - t0
            elif e == "atp-denoise":
                est[e] = denoising_attribution(model, lm.tokenizer, calib_items, union([u.entries for u in unit_list]),
                                               values, job.calib, model_path=lm.source, progress=progress)
            elif e == "atp-local":
                est[e] = terms
            elif e == "atp-local2":
                est[e] = UnitEstimate(*second_order(terms.per_item))
            elif e in ROBUST_LOCAL:   # n · the statistic: on the scale of atp-local's sum, ranked by the statistic
                n = len(calib_items)
                est[e] = UnitEstimate({k: n * item_statistic(v, ROBUST_LOCAL[e]) for k, v in terms.per_item.items()})
            elif e == "atp-window":
                est[e] = wterms
            elif e == "atp-window2":
                est[e] = UnitEstimate(*second_order(wterms.per_item))
            else:
                est[e] = compute_scores(e, SaliencyInputs(weights, values, grads.tensors, None, job.seed))
            if not isinstance(est[e], UnitEstimate):
                # only its unit sums are read from here on (predictions, orderings, halves): 4 · P_lin freed now,
                # not held beside the next estimator's passes and through the measurement (0.8.8)
                est[e] = UnitEstimate(unit_values(unit_list, est[e]))
    del grads
    halves = {}
    for m, part in first.items():
        full = est[m].values
        halves[m] = SplitHalves(part, {x: full[x] - part[x] for x in full}, len(calib_items))

    def loss_fn(m):
        res = evaluate(m, lm.tokenizer, items, task.kind, cfg=job.eval, progress=False)
        r = res.metrics

        def nll(recs):
            return sum(x["nll"] * x["tokens"] for x in recs) / max(1, sum(x["tokens"] for x in recs))

        key = r.get("task_metric") or "accuracy"

        def mean_metric(recs):   # the task metric over a half of the items (None when items do not carry it)
            vals = [float(x[key]) for x in recs if x.get(key) is not None]
            return sum(vals) / len(vals) if vals and len(vals) == len(recs) else None

        mh = (mean_metric(res.items[0::2]), mean_metric(res.items[1::2]))
        per_metric = [x.get(key) for x in res.items]
        each = {"loss": [float(x["nll"]) for x in res.items],   # each item's NLL per token, for the robust statistics
                "metric": None if None in per_metric else [float(v) for v in per_metric]}
        return (r["nll_per_token"], r.get(key), (nll(res.items[0::2]), nll(res.items[1::2])),
                mh if None not in mh else None, each)

    base = evaluate(model, lm.tokenizer, items, task.kind, cfg=job.eval, progress=False).metrics
    chance = TASK_KINDS[task.kind].chance
    if chance is not None and base.get("accuracy") is not None and base["accuracy"] <= chance + 0.05:
        say(f"[circuitq] warning: the unquantized model is at chance on {job.task} (accuracy {base['accuracy']:.3f}, "
            f"chance {chance:.2f}); the measured changes are still reported, but a circuit of a task the model "
            "cannot do says little")
    cache = LayerReplay(model.get_submodule(arch_for(model.config.model_type).layers))
    with meter.stage("measurement (units, contrasts)"):
        rep = faithfulness_report(model, loss_fn, {n: scores[n].float() for n in names}, unit_list, values, est,
                                  top=job.top, n_random=job.random, fraction=job.fraction, seed=job.seed,
                                  all_units=job.all_units, cache=cache, prior=prior, progress=progress,
                                  estimator_halves=halves)
    if "ig" in job.estimators:
        tokens = sum(len(x) for x in tokenize_examples(calib_items, lm.tokenizer, job.calib.seq_len,
                                                       loss=job.calib.loss).ids)
        per_step = ig_seconds / (job.ig_steps + 2)
        rep["completeness"] = {"ig": {k: getattr(comp, k) for k in ("attributed", "measured", "gap")},
                               "ig_steps": job.ig_steps, **ig_path_report(comp, job.ig_steps),
                               "note": "Σ attributions vs measured L(Q(W)) − L(W), summed over the calibration items, "
                                       "every targeted weight replaced"}
        rep["ig_cost"] = {"seconds": ig_seconds, "passes": job.ig_steps + 2, "calibration_tokens": tokens,
                          "seconds_per_step": per_step, "tokens_per_second": tokens / per_step if per_step else None,
                          "note": "ig's K gradient passes and its two loss passes (at W and at Q(W)) over the "
                                  "calibration items; seconds_per_step = seconds / (K + 2), an upper bound on one "
                                  "gradient pass"}
    if job.curve:
        orderings = {e: unit_order(unit_list, est[e]) for e in job.estimators}
        orderings["random"] = unit_order(unit_list, None, seed=job.seed)
        with meter.stage("curves"):
            rep["curves"] = faithfulness_curves(model, loss_fn, unit_list, values, orderings, job.curve_grid,
                                                cache=cache, progress=progress)
    cache_span, cache_moves = cache.span, cache.moves
    del cache
    rep.update(format="circuitq.faithfulness", measurement=key, measured_from=job.measured, task=job.task, units_kind=job.units, ablation=job.ablation, items=len(items),
               calib_items=len(calib_items), seed=job.seed, calib_seed=job.calib.seed, estimators=list(job.estimators), objective=job.calib.objective, base_accuracy=base.get("accuracy"),
               metric=base.get("task_metric") or "accuracy", circuitq_version=__version__)
    if windowed:
        rep["window"] = job.window
    rep["timing"] = {"seconds": meter.seconds, "note": "wall time of each stage"}
    rep["replay"] = {"span": cache_span, "moves": cache_moves,
                     "note": "the measurement's layer replay: layers whose outputs it held at once, and how often the "
                             "window moved (each an evaluation of the layers above it)"}
    if meter.peaks:
        rep["memory"] = {"measured_peak_bytes": meter.peaks, "start_bytes": meter.starts,
                         "process_peak_bytes": meter.process_peak(),
                         "note": "peak resident memory of the process during each stage (VmHWM, reset as it starts), "
                                 "and the resident memory as it started"}
    return rep


def ig_path_report(comp, steps: int) -> dict:
    """The report's view of IG's path (0.8.7): the loss and slope at each node and ``path_diagnosis``'s reading
    (``variation``: ∫|dL/dα| by the rule; ``cancellation``: variation / |L(Q(W)) − L(W)|; the worst segment)."""
    if not comp.path:
        return {}
    d = path_diagnosis(comp.loss_w, comp.loss_w + comp.measured, comp.path, gauss_legendre(steps)[1])
    return {"loss_w": comp.loss_w, "path": [p._asdict() for p in comp.path],
            "path_diagnosis": {k: d[k] for k in ("rule", "variation", "cancellation", "worst", "segments")}}

