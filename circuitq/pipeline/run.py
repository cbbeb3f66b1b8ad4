"""``circuitq run``, the main job: model + tasks -> task circuits -> quantized models -> evaluation
against the original -> one report.

For every bit width and task: calibrate on the task's calibration split, score every weight with
TaCQ, keep the top ``mask.fraction`` (0.35%) in 16-bit, quantize with mask-aware GPTQ, and
evaluate against the unquantized model on the task's held-out split. At the same budget the run
also evaluates GPTQ with no 16-bit weights, masks from the baselines, and cross-task transfer
(each other task's TaCQ circuit, and the union).

This module only sequences: the plan is ``pipeline.plan``, every computation is a stage function
of ``pipeline.stages`` (the same ones ``circuitq score``/``quantize``/``eval`` and the API call),
and every result is a step of ``pipeline.store`` looked up by a key that is a pure function of
the settings (``StepKeys``). Quantized weights are not kept; scores, masks and evaluations are.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from circuitq import __version__
from circuitq.artifacts import exclusive, write_csv, write_json
from circuitq.circuits.maps import MapAccumulator, write_map
from circuitq.config import ConfigError, QuantizeConfig, RunConfig, to_dict
from circuitq.data.tasks import Task
from circuitq.model.arch import Geometry, target_shapes
from circuitq.pipeline import budget, stages
from circuitq.pipeline.plan import Job, MaskRecipe, plan_jobs
from circuitq.pipeline.report import write_run_outputs
from circuitq.pipeline.store import StepStore, examples_digest, model_fingerprint
from circuitq.quant.driver import quantize_model
from circuitq.quant.hessians import HessianFile
from circuitq.quant.plan import PrecisionPlan
from circuitq.saliency.capture import STATS
from circuitq.saliency.files import SCORES_FORMAT, load_scores, open_stats, save_stats
from circuitq.saliency.masks import (
    TopK,
    mask_metadata,
    open_masks,
    save_masks,
    select_rank_max_stream,
    select_topk_stream,
)
from circuitq.saliency.methods import METHODS
from circuitq.saliency.methods import method as saliency_method
from circuitq.storage import LazyTensors, ParameterBackup, TensorWriter

RUN_FORMAT = "circuitq.run"
# methods whose scores changed definition since 0.1 (their older steps must not be reused)
REDEFINED = {"spqr": "gptq-scaled-errors-layer-relative"}


def _tap(qw, seen: dict):
    """``qw`` (``QWModule``s) passed through, keeping each module's ``(W, Q(W))`` in ``seen`` until
    the caller takes it (one module at a time)."""
    for r in qw:
        seen[r.name] = (r.weight.float(), r.quantized)
        yield r


def check_run_config(cfg: RunConfig) -> None:
    """What a ``RunConfig`` cannot check alone: the baselines name saliency methods."""
    bad = [b for b in cfg.baselines if b not in METHODS]
    if bad:
        raise ConfigError(f"unknown baseline method(s) {bad}; choose from {', '.join(METHODS)}")


# Settings that change only float rounding are left out of keys: batch sizes and token budgets
# (the same sums in another order) and the attention kernel. Every other setting a step depends on
# is in its key (key format 2). Format 1 (circuitq <= 0.6.1) wrote these only when they differed
# from the default; their defaults never changed in those versions, so an old key is completed
# with them (``migrate_key``).
# (a score key's "method" is the saliency method, so the quantizer's is "quant_method")
QUANT_IN_KEY = {"sym": "sym", "mse": "mse", "method": "quant_method", "block_size": "block_size",
                "act_order": "act_order"}
LEGACY_DEFAULTS = {"calib": {"loss": "answer", "tokens": 0, "template": "auto"},
                   "eval": {"template": "auto"},
                   "quantizer": {k: getattr(QuantizeConfig(), f) for f, k in QUANT_IN_KEY.items()}}
_CALIB_SIGNATURE = {"model", "task", "samples", "seq_len", "seed", "split_seed", "shots", "data"}


def migrate_key(key):
    """A format-1 step key (and the keys nested in it) in format 2: the fields format 1 left out
    at their default get that default. Pure; the input is not changed."""
    if isinstance(key, list):
        return [migrate_key(k) for k in key]
    if not isinstance(key, dict):
        return key
    out = {k: migrate_key(v) for k, v in key.items()}
    if _CALIB_SIGNATURE <= set(out):                       # calibration items (stats, scores, Hessians)
        out = {**out, **{k: v for k, v in LEGACY_DEFAULTS["calib"].items() if k not in out}}
    if "all_tokens" in out and "reference" in out:          # evaluation items (eval steps, jobs)
        out.setdefault("template", LEGACY_DEFAULTS["eval"]["template"])
    if "mask" in out and isinstance(out.get("hessian"), dict) and "method" in out:   # a job's quantizer method
        out["quant_method"] = out.pop("method")
    if "hessian_rows" in out or ("mask" in out and isinstance(out.get("hessian"), dict)):   # scores, jobs
        out = {**out, **{k: v for k, v in LEGACY_DEFAULTS["quantizer"].items() if k not in out}}
    return out


@dataclass(frozen=True)
class StepKeys:
    """The keys of a run's steps (pure functions of the settings, the model fingerprint ``fp``
    and the items' content digests): every setting a step depends on, whatever its default."""

    cfg: RunConfig
    fp: str
    calib_digest: dict       # task -> examples_digest of its calibration items
    eval_digest: dict        # task -> examples_digest of its evaluation items

    def calib(self, task: str) -> dict:
        c, d = self.cfg.calib, self.cfg.data
        return {"model": self.fp, "task": task, "samples": c.samples, "seq_len": c.seq_len, "seed": c.seed,
                "split_seed": d.split_seed, "shots": d.shots, "data": self.calib_digest[task], "loss": c.loss,
                "tokens": c.tokens, "template": d.template}

    def quantizer(self) -> dict:
        q = self.cfg.quantize
        # since 0.3 the Hessians see one calibration item per sequence (before: EOS-joined windows)
        return {"group_size": q.group_size, "hessian": q.hessian, "damp": q.damp, "hessian_rows": "one-item-each",
                **{k: getattr(q, f) for f, k in QUANT_IN_KEY.items()}}

    def score(self, task: str, bits: int, method: str) -> dict:
        key = {**self.calib(task), "method": method, "bits": bits, **self.quantizer()}
        if method in REDEFINED:   # a method whose definition changed is never reused from an older run
            key["definition"] = REDEFINED[method]
        return key

    def mask(self, recipe: MaskRecipe, bits: int) -> dict:
        if recipe.source == "union":
            src = [self.score(t, bits, "tacq") for t in self.cfg.tasks]
        elif recipe.source is None:
            src = {"model": self.fp, "seed": self.cfg.calib.seed}
        else:
            src = self.score(recipe.source, bits, recipe.method)
        key = {"method": recipe.method, "source": recipe.source, "bits": bits, "fraction": self.cfg.mask.fraction,
               "scores": src}
        if recipe.source == "union":   # re-selected at the same k (older runs: a union of the task masks)
            key["combine"] = "rank-max"
        return key

    def eval(self, task: str) -> dict:
        e, d = self.cfg.eval, self.cfg.data
        return {"task": task, "samples": e.samples, "seq_len": e.seq_len, "split_seed": d.split_seed,
                "shots": d.shots, "reference": self.fp, "data": self.eval_digest[task], "all_tokens": e.all_tokens,
                "template": d.template}

    def job(self, job: Job) -> dict:
        q = self.quantizer()
        return {**self.eval(job.task), "model": self.fp, "bits": job.bits, "group_size": q.pop("group_size"),
                "hessian": {**self.calib(job.task), "mode": q.pop("hessian"), "damp": q.pop("damp")}, **q,
                "mask": None if job.recipe.method == "none" else self.mask(job.recipe, job.bits)}


@dataclass
class RunResult:
    rows: list[dict]                       # one per evaluated model (and the 16-bit reference)
    transfer: list[dict]
    steps: dict = field(default_factory=dict)   # {"reused": n, "computed": n}
    item_kl: dict = field(default_factory=dict)  # (bits, method label, task) -> (per-item KL, per-item tokens)
    score_dirs: dict = field(default_factory=dict)  # {(task, bits): Path}
    seconds: float = 0.0
    faithfulness: dict = field(default_factory=dict)  # {task: circuitq.faithfulness report}
    maps: dict = field(default_factory=dict)          # {task: attribution map step directory}


class Runner:
    """The model, the tasks and the step store of one run. Each method is one stage looked up in
    the store by its key, else computed by ``pipeline.stages`` and stored. Nothing large is held
    across steps: statistics, Hessians, scores and the reference's logits live in the steps' files
    and are read one tensor at a time; each job quantizes the model in place and restores it from
    a disk backup (``storage.ParameterBackup``). The memory of each stage: ``docs/memory.md``."""

    def __init__(self, lm, cfg: RunConfig, run_dir: Path, device="cpu", progress=True):
        self.log: list[str] = []
        self.lm, self.cfg, self.dir, self.device, self.progress = lm, cfg, Path(run_dir), device, progress
        self.store = StepStore(self.dir, self.say, migrate=migrate_key)
        self.tasks = {t: Task(t, cfg.data, lm.tokenizer) for t in cfg.tasks}
        self._items = {}
        for t in cfg.tasks:   # fail early on data problems
            self.items(t, "calib")
            self.items(t, "eval")
        self.keys = StepKeys(cfg, model_fingerprint(lm.model),
                             {t: examples_digest(self.items(t, "calib")) for t in cfg.tasks},
                             {t: examples_digest(self.items(t, "eval")) for t in cfg.tasks})
        self.fp = self.keys.fp
        self._sequences: dict = {}
        self._backup = None
        self.meter = budget.PeakMeter()
        self.estimate: dict = {}

    def preflight(self) -> None:
        """Estimate the run's peak memory and disk (``pipeline.budget``) before any work; refuse a
        run that will not fit, in one line with the figures and the flags that lower them."""
        c = self.cfg
        tokens = {t: budget.task_tokens(self.calib_sequences(t), self.items(t, "eval"), self.lm.tokenizer, c) for t in c.tasks}
        nums = budget.ModelNumbers.from_model(self.lm.model)
        stages_ = budget.run_stages(nums, tokens, len(c.bits), c.calib.batch_tokens, 2 + len(c.baselines),
                                    c.mask.fraction, maps=c.head_maps != "off", recompute=c.calib.recompute,
                                    n_stats=len(self.stats_wanted))
        est = budget.estimate(nums, stages_)
        self.estimate = {"peak_bytes": est.peak, "at": est.worst, "disk_bytes": est.disk,
                         "tokens": {t: x._asdict() for t, x in tokens.items()},
                         "stages": {x.name: {"host_bytes": x.host + budget.RUNTIME_BYTES + nums.s * nums.P,
                                             "disk_bytes": x.disk} for x in stages_}}
        have = budget.available_memory()
        steps = sum(f.stat().st_size for f in (self.dir / "steps").rglob("*") if f.is_file()) \
            if (self.dir / "steps").is_dir() else 0
        room = budget.free_disk(self.dir) + steps
        self.say(f"memory estimate: peak {budget.gb(est.peak)} (at {est.worst}), disk {budget.gb(est.disk)}; "
                 f"available {budget.gb(have) if have else '?'} memory, {budget.gb(room)} disk")
        if have is not None and est.peak > have and str(self.device) == "cpu":
            raise ConfigError(f"this run needs about {budget.gb(est.peak)} of memory at its {est.worst} stage but "
                              f"{budget.gb(have)} is available; lower --batch-tokens, use --recompute all or a lower --eval-seq-len, "
                              "or use a machine with more memory")
        if est.disk > room:
            raise ConfigError(f"this run writes about {budget.gb(est.disk)} to {self.dir} but {budget.gb(room)} is free "
                              "there; choose an --out on a larger disk, or fewer --tasks/--bits, or lower --eval-samples")

    def say(self, msg: str) -> None:
        line = f"[circuitq run] {msg}"
        self.log.append(line)
        print(line, flush=True)

    @property
    def skipped(self) -> dict[str, int]:
        """Evaluation rows left out per task because their answer could not be parsed."""
        return {t: task.skipped.get("eval", 0) for t, task in self.tasks.items()}

    def items(self, task: str, split: str):
        if (task, split) not in self._items:
            c = self.cfg
            if split == "eval":
                ex = self.tasks[task].eval_items()
                if len(ex) < c.eval.samples:
                    self.say(f"{task}: the evaluation split has {len(ex)} items, fewer than --eval-samples "
                             f"{c.eval.samples}; using all of it")
                ex = ex[: c.eval.samples]
            else:
                ex = self.tasks[task].calib_for(c.calib)
            self._items[(task, split)] = ex
        return self._items[(task, split)]

    @property
    def counts(self) -> dict:
        """``{"reused": n, "computed": n}`` steps so far."""
        return self.store.counts

    # ---- gradients, Hessians --------------------------------------------------------------------
    @property
    def stats_wanted(self) -> tuple[str, ...]:
        """The gradient statistics the run's methods read: ``Σ|G_s|`` (TaCQ, grad) and, for a
        baseline that reads others (``atp``: ``Σ_s G_s``), those too, in one pass."""
        want = {"sum_abs"}.union(*(stages.needed_stats(m) for m in self.cfg.baselines))
        return tuple(s for s in STATS if s in want)

    def grad_stats(self, task: str):
        """The per-sample gradient statistics (``stats_wanted``) of the task's calibration items,
        read from its step one matrix at a time."""
        wanted = self.stats_wanted
        key = self.keys.calib(task)
        if wanted != ("sum_abs",):   # the default run's key is unchanged
            key = {**key, "stats": list(wanted)}

        def compute(tmp):
            self.say(f"{task}: per-sample gradients of {len(self.items(task, 'calib'))} calibration items")
            with self.meter.stage("gradients"):
                    res = stages.collect_gradients(self.lm.model, self.lm.tokenizer, self.items(task, "calib"),
                                               self.cfg.calib, wanted, progress=self.progress,
                                               model_path=self.lm.source)
                    save_stats(tmp / "stats.safetensors", res["stats"], {**key, "truncated": res["truncated"],
                                                                      "tokens_per_s": res["tokens_per_s"]})
        return open_stats(self.store.step("stats", key, f"stats-{_slug(task)}", compute) / "stats.safetensors")

    def grad_sum(self, task: str):
        """``Σ_s G_s`` (signed: the gradient of the summed loss) of the task's calibration items,
        for attribution patching; one matmul per module and batch (no per-sample matrices)."""
        items = self.items(task, "calib")[:self.cfg.map_samples]
        obj = self.cfg.map_objective(task)
        key = {**self.keys.calib(task), "stat": "sum", "first": len(items), **({"objective": obj} if obj != "nll" else {})}

        def compute(tmp):
            self.say(f"{task}: Σ G of {len(items)} calibration items (for the attribution maps"
                     + (", of minus the task's metric)" if obj != "nll" else ")"))
            with self.meter.stage("gradients"):
                res = stages.collect_gradients(self.lm.model, self.lm.tokenizer, items,
                                               replace(self.cfg.calib, objective=obj), ("sum",), progress=self.progress,
                                               model_path=self.lm.source)
                save_stats(tmp / "stats.safetensors", res["stats"], {**key, "truncated": res["truncated"],
                                                                      "tokens_per_s": res["tokens_per_s"]})
        return open_stats(self.store.step("stats", key, f"stats-sum-{_slug(task)}", compute) / "stats.safetensors")

    def map_key(self, task: str, bits: int) -> dict:
        """The attribution map's key: the TaCQ scores' (same calibration items, same Q(W)) + Σ G."""
        obj = self.cfg.map_objective(task)
        return {**self.keys.score(task, bits, "tacq"), "estimator": "atp" if obj == "nll" else "atp-metric", "stat": "sum",
                "first": self.cfg.map_samples}

    def attribution_map(self, task: str, bits: int) -> Path:
        """The step directory of ``task``'s attribution-patching map at ``bits`` (``map.safetensors``:
        per layer × module, head and neuron, the summed ``ΣG · (Q(W) − W)``), computed when missing."""
        found = self.store.find("maps", self.map_key(task, bits))
        if found:
            return found
        self._stream_masks(task, bits, self._qw_methods(task, bits, "tacq"), maps=True)
        return self.store.find("maps", self.map_key(task, bits))

    def calib_sequences(self, task: str):
        """The task's calibration items as GPTQ sees them (one per sequence, padding masked)."""
        if task not in self._sequences:
            w = stages.calibration_tokens(self.items(task, "calib"), self.lm.tokenizer, self.cfg.calib)
            self.say(f"{task}: GPTQ calibration: {w.tokens} tokens in {w.ids.shape[0]} items, one per sequence")
            self._sequences[task] = w
        return self._sequences[task]

    def hessians(self, task: str):
        """The task's shared Hessians and their GPTQ factors, on disk (``quant.hessians``)."""
        q = self.cfg.quantize
        key = {**self.keys.calib(task), "mode": "shared", "damp": q.damp, "batch_size": q.batch_size,
               "hessian_rows": "one-item-each"}

        def compute(tmp):
            self.say(f"{task}: Hessians of every linear input, layer by layer to disk (shared by every mask)")
            with self.meter.stage("Hessians"):
                stages.write_hessians(self.lm.model, self.calib_sequences(task), tmp, q, self.device, self.progress)
        return HessianFile(self.store.step("hessians", key, f"hessians-{_slug(task)}", compute))

    def _shared(self, qcfg: QuantizeConfig) -> bool:
        return qcfg.hessian == "shared" and qcfg.method == "gptq"

    def backup(self):
        """The unquantized values of every targeted weight, on disk, made once per run."""
        if self._backup is None:
            self._backup = ParameterBackup(self.lm.model, target_shapes(self.lm.model),
                                           self.dir / "steps" / f".originals-{os.getpid()}.safetensors")
        return self._backup

    def close(self) -> None:
        if self._backup is not None:
            self._backup.close()
            self._backup = None

    # ---- scores and masks -----------------------------------------------------------------------
    def _qw_methods(self, task: str, bits: int, method: str) -> list[str]:
        """The run's mask methods that contrast with the same ``Q(W)`` as ``method`` on ``task``."""
        mine = stages.qw_config(method, self.cfg.quantize_at(bits))
        wanted = ["tacq", *self.cfg.baselines]
        return [m for m in dict.fromkeys(wanted) if saliency_method(m).quantizer
                and stages.qw_config(m, self.cfg.quantize_at(bits)) == mine]

    def _score_meta(self, task: str, key: dict) -> dict:
        return {**key, "model": self.lm.name, "model_fingerprint": self.fp, "model_source": self.lm.source,
                "model_note": self.lm.note, "n_samples": len(self.items(task, "calib")), "settings": to_dict(self.cfg),
                "geometry": Geometry.from_config(self.lm.model.config).to_dict(), "circuitq_version": __version__}

    def _stream_masks(self, task: str | None, bits: int, methods: list[str], maps: bool = False) -> None:
        src = task or self.cfg.tasks[0]   # the steps it reads are made first, each measured as its own stage
        maps = self._wants_map(task, bits, methods) or maps
        if any(saliency_method(m).stats for m in methods):
            self.grad_stats(src)
        if maps:
            self.grad_sum(src)
        if saliency_method(methods[0]).quantizer and self._shared(
                stages.qw_config(methods[0], self.cfg.quantize_at(bits))):
            self.hessians(src)
        with self.meter.stage("Q(W), scores and masks"):
            self._stream_masks_once(task, bits, methods, maps)

    def _wants_map(self, task: str | None, bits: int, methods: list[str]) -> bool:
        """The attribution map rides along the pass that makes the TaCQ scores it shares Q(W) with."""
        return (self.cfg.head_maps != "off" and task is not None and "tacq" in methods and bits == max(self.cfg.bits)
                and not self.store.find("maps", self.map_key(task, bits)))

    def _stream_masks_once(self, task: str | None, bits: int, methods: list[str], maps: bool = False) -> None:
        """One pass over the modules that scores ``methods`` (all sharing one ``Q(W)``, or none),
        selects each one's mask with a running top-k and stores the masks; ``tacq``'s scores are
        written to their step file as they come; with ``maps``, attribution patching ``ΣG · (Q(W) −
        W)`` is summed into the circuit maps on the way (``circuits.maps.MapAccumulator``) and
        stored as a ``maps`` step. Memory: one module (``stages.stream_scores``) plus the maps."""
        m0 = saliency_method(methods[0])
        shapes = target_shapes(self.lm.model)
        src = task or self.cfg.tasks[0]
        qw = None
        if m0.quantizer:
            qcfg = stages.qw_config(methods[0], self.cfg.quantize_at(bits))
            self.say(f"{src}: mask-free {bits}-bit {qcfg.method.upper()} for Q(W), streamed into {', '.join(methods)}")
            shared = self._shared(qcfg)
            qw = stages.qw_stream(self.lm.model, qcfg, None if shared else self.calib_sequences(src),
                                          hessians=self.hessians(src) if shared else None,
                                          need_hinv=any(saliency_method(m).hessian for m in methods),
                                          device=self.device, progress=self.progress)
        stats = self.grad_stats(src) if any(saliency_method(m).stats for m in methods) else None
        acc = map_sum = None
        seen: dict = {}
        if maps:   # ΣG·(Q(W) − W) of the maps' own Σ G (first --map-samples items), beside any atp baseline's
            map_sum = self.grad_sum(src).tensors["sum"]
            acc = MapAccumulator(Geometry.from_config(self.lm.model.config))
            qw = _tap(qw, seen)
        sel = {m: TopK(shapes, self.cfg.mask.fraction) for m in methods}
        skey = self.keys.score(src, bits, "tacq")
        tacq_step = "tacq" in methods and task is not None and not self.store.find("scores", skey)
        ctx = self.store.create("scores", skey, f"scores-{_slug(src)}-tacq-{bits}bit") if tacq_step else None
        tmp = ctx.__enter__() if ctx else None
        try:
            writer = TensorWriter(tmp / "scores.safetensors") if tmp else None
            for name, sc in stages.stream_scores(list(methods), self.lm.model, stats, qw, self.cfg.calib.seed):
                if acc is not None:
                    w, q = seen.pop(name)
                    acc.add(name, map_sum[name] * (q.float() - w))
                for m, s in sc.items():
                    sel[m].add(name, s)
                if writer is not None:
                    writer[name] = sc["tacq"]
            if writer is not None:
                meta = self._score_meta(src, skey)
                writer.close({"format": SCORES_FORMAT, **{k: json.dumps(v, default=str) for k, v in meta.items()}})
                (tmp / "score.json").write_text(json.dumps({"format": SCORES_FORMAT, **meta}, indent=2, default=str) + "\n")
        except BaseException:
            if ctx:
                ctx.__exit__(*sys.exc_info())
            raise
        if ctx:
            ctx.__exit__(None, None, None)
        if acc is not None:
            obj = self.cfg.map_objective(src)
            meta = {"estimator": "atp", "objective": obj, "task": src, "bits": bits,
                    "quantizer": qcfg.method if qw is not None else None,
                    "values": "Σ over the calibration items of G · (Q(W) − W), summed per unit: the first-order "
                              "change of the summed task loss when the unit's weights go to Q(W); positive = "
                              "quantizing it is predicted to raise the loss" if obj == "nll" else
                              "Σ over the calibration items of G · (Q(W) − W), summed per unit, G the gradient of "
                              "minus the task's metric: the first-order change of the metric when the unit's "
                              "weights go to Q(W), sign flipped; positive = quantizing it is predicted to lower "
                              "the metric",
                    "calib_items": min(len(self.items(src, "calib")), self.cfg.map_samples), "model": self.lm.name,
                    "model_note": self.lm.note,
                    "geometry": Geometry.from_config(self.lm.model.config).to_dict(), "circuitq_version": __version__}
            self.store.step("maps", self.map_key(src, bits), f"map-atp-{_slug(src)}-{bits}bit",
                            lambda tmp: write_map(tmp / "map.safetensors", acc.result(), meta))
        for m in methods:
            recipe = MaskRecipe(m, None if task is None else task)
            self._save_mask(recipe, bits, sel.pop(m).masks())

    def _save_mask(self, recipe: MaskRecipe, bits: int, masks: dict) -> None:
        key = self.keys.mask(recipe, bits)
        if self.store.find("mask", key):
            return
        c = self.cfg
        meta = mask_metadata(masks, model=self.lm.name, model_source=self.lm.source, task=recipe.source or "-",
                             method=recipe.method, bits=bits, group_size=c.quantize.group_size,
                             requested_fraction=c.mask.fraction, samples=c.calib.samples, seq_len=c.calib.seq_len,
                             seed=c.calib.seed)
        self.store.step("mask", key, f"mask-{recipe.method}-{_slug(recipe.source or 'all')}-{bits}bit",
                        lambda tmp: save_masks(tmp / "mask.safetensors", masks, meta))

    def tacq_scores(self, task: str, bits: int) -> Path:
        """The step directory of ``task``'s TaCQ scores at ``bits`` (computed when missing)."""
        key = self.keys.score(task, bits, "tacq")
        found = self.store.find("scores", key)
        if found:
            return found
        self._stream_masks(task, bits, self._qw_methods(task, bits, "tacq"))
        return self.store.find("scores", key)

    def mask(self, recipe: MaskRecipe, bits: int) -> dict | None:
        if recipe.method == "none":
            return None
        key = self.keys.mask(recipe, bits)
        found = self.store.reuse("mask", key)
        if found:
            return open_masks(found / "mask.safetensors")
        if recipe.source == "union":
            sources = [LazyTensors(self.tacq_scores(t, bits) / "scores.safetensors") for t in self.cfg.tasks]
            self._save_mask(recipe, bits, select_rank_max_stream(sources, self.cfg.mask.fraction))
        elif recipe.method == "tacq" and self.store.find("scores", self.keys.score(recipe.source, bits, "tacq")):
            sc = LazyTensors(self.tacq_scores(recipe.source, bits) / "scores.safetensors")
            self._save_mask(recipe, bits, select_topk_stream(((n, sc[n]) for n in sc),
                                                             {n: sc.shape(n) for n in sc}, self.cfg.mask.fraction))
        elif saliency_method(recipe.method).quantizer:
            self._stream_masks(recipe.source, bits, self._qw_methods(recipe.source, bits, recipe.method))
        else:
            self._stream_masks(recipe.source, bits, [recipe.method])
        return open_masks(self.store.find("mask", key) / "mask.safetensors")

    # ---- evaluation -----------------------------------------------------------------------------
    def _original_step(self, task: str) -> Path:
        """The unquantized model's evaluation step, with its logits at the scored tokens on disk
        (float32 at the task's positions, float16 at every MMLU token) for comparing every job."""
        key = {**self.keys.eval(task), "model": "reference"}

        def compute(tmp):
            self.say(f"{task}: evaluating the unquantized model on {len(self.items(task, 'eval'))} held-out items")
            with self.meter.stage("reference evaluation"), TensorWriter(tmp / "logits.safetensors") as sink:
                res = stages.evaluate(self.lm.model, self.lm.tokenizer, self.items(task, "eval"),
                                      self.tasks[task].kind, cfg=self.cfg.eval, progress=self.progress,
                                      logits_out=sink)
                sink.close({"format": "circuitq.reference-logits"})
            write_json(tmp / "eval.json", {"metrics": res.metrics})
            write_csv(tmp / "items.csv", res.items)
        # a step from before 0.6 kept its logits in memory only: it is made again, with them
        return self.store.step("eval", key, f"eval-reference-{_slug(task)}", compute,
                               valid=lambda p: (p / "logits.safetensors").is_file())

    def original_eval(self, task: str) -> dict:
        """Metrics of the unquantized model."""
        return json.loads((self._original_step(task) / "eval.json").read_text())

    def run_job(self, job: Job) -> dict:
        """The evaluation document of ``job`` (a step: quantize, evaluate, restore)."""
        return json.loads((self.store.step("eval", self.keys.job(job), f"eval-{_slug(job.label)}-{_slug(job.task)}-"
                                           f"{job.bits}bit", lambda tmp: self._job(job, tmp)) / "eval.json").read_text())

    def _job(self, job: Job, tmp: Path) -> None:
        """Quantize the model in place with ``job``'s mask, evaluate it, restore it; the result
        into the step directory ``tmp``."""
        masks = self.mask(job.recipe, job.bits)
        ref_logits = LazyTensors(self._original_step(job.task) / "logits.safetensors")
        qcfg = self.cfg.quantize_at(job.bits)
        shared = self._shared(qcfg)
        hessians = self.hessians(job.task) if shared else None
        backup = self.backup()
        with self.meter.stage("quantize + evaluate"):
            try:
                t0 = time.perf_counter()
                qres = quantize_model(self.lm.model, None if shared else self.calib_sequences(job.task),
                                      PrecisionPlan(qcfg.bits), qcfg, masks=masks, device=self.device,
                                      progress=self.progress, hessians=hessians, output_error=False, pack=False)
                tq = time.perf_counter() - t0
                del masks
                t0 = time.perf_counter()
                res = stages.evaluate(self.lm.model, self.lm.tokenizer, self.items(job.task, "eval"),
                                      self.tasks[job.task].kind, cfg=self.cfg.eval, progress=self.progress,
                                      reference_logits=ref_logits)
            finally:
                backup.restore()
        doc = {"metrics": res.metrics, "average_bits": qres.bits.average_bits, "n_16bit": qres.bits.nnz,
               "quantize_seconds": tq, "eval_seconds": time.perf_counter() - t0,
               "item_kl": [r.get("kl") for r in res.items], "item_tokens": [r.get("tokens") for r in res.items]}
        write_json(tmp / "eval.json", doc)
        write_csv(tmp / "items.csv", res.items)

    def faithfulness(self, task: str) -> dict:
        """``circuitq faithfulness`` of ``task``'s TaCQ circuit at the largest bit width (a step)."""
        job = self.cfg.faithfulness_job(task)
        bits = max(self.cfg.bits)
        key = {"scores": self.keys.score(task, bits, "tacq"), "eval": self.keys.eval(task),
               "units": job.units, "top": job.top, "random": job.random, "ablation": job.ablation,
               "fraction": job.fraction, "seed": job.seed, "estimators": list(job.estimators),
               "all_units": job.all_units, "curve": job.curve, "report": 2,   # 2: estimators named atp (0.7)
               **({"objective": job.calib.objective} if job.calib.objective != "nll" else {})}
        def compute(tmp):
            scores = load_scores(self.tacq_scores(task, bits))["scores"]
            self.say(f"{task}: faithfulness of the {bits}-bit circuit ({job.units}, {job.top} top + {job.random} "
                     f"random units, {job.ablation})")
            torch.manual_seed(job.seed)
            rep = stages.faithfulness(self.lm, scores, job, say=self.say, progress=self.progress)
            rep.update(model=self.lm.name, model_note=self.lm.note, bits=bits)
            write_json(tmp / "faithfulness.json", rep, compact_lists=True)
        step = self.store.step("faithfulness", key, f"faithfulness-{_slug(task)}-{job.units}-{bits}bit", compute)
        return json.loads((step / "faithfulness.json").read_text())


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s).strip("-")[:40]


def result_row(job: Job | None, task: str, bits: int, doc: dict) -> dict:
    """One row of the results table from an evaluation document."""
    m = doc["metrics"]
    flips = m.get("flips") or {}
    return {"bits": bits, "task": task, "method": job.label if job else "reference (16-bit)",
            "mask_method": job.recipe.method if job else "-", "circuit_from": (job.recipe.source or "-") if job else "-",
            "average_bits": doc.get("average_bits", 16.0), "n_16bit": doc.get("n_16bit", 0),
            "kl": m.get("kl"), "top1_agreement": m.get("top1_agreement"), "nll_per_token": m.get("nll_per_token"),
            "accuracy": m.get("accuracy"), "flips_lost": flips.get("lost"), "flips_gained": flips.get("gained"),
            "kl_all": m.get("kl_all"), "top1_all": m.get("top1_all"), "nll_all": m.get("nll_all"),
            "task_metric": m.get("task_metric"), "task_metric_value": m.get(m.get("task_metric") or "-"),
            "items": m.get("items"), "scored_tokens": m.get("scored_tokens"),
            "quantize_seconds": doc.get("quantize_seconds"), "eval_seconds": doc.get("eval_seconds")}


def transfer_rows(rows: list[dict]) -> list[dict]:
    """The transfer matrix as rows: circuit source × evaluated task (TaCQ masks and GPTQ)."""
    out = []
    for r in rows:
        if r["mask_method"] == "tacq" or r["method"] == "gptq":
            src = "none (gptq)" if r["method"] == "gptq" else r["circuit_from"]
            out.append({"bits": r["bits"], "circuit": src, "evaluated_on": r["task"], "kl": r["kl"], "kl_all": r["kl_all"],
                        "top1_agreement": r["top1_agreement"], "nll_per_token": r["nll_per_token"],
                        "accuracy": r["accuracy"], "average_bits": r["average_bits"]})
    return out


def run(lm, cfg: RunConfig, run_dir: str | Path, device="cpu", progress: bool = True, command: str = "") -> RunResult:
    """Execute (or resume) a run in ``run_dir`` and write its report. Returns the tables."""
    check_run_config(cfg)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    with exclusive(run_dir, "run"):   # writable, and no second process on the same run
        r = Runner(lm, cfg, run_dir, device, progress)
        r.preflight()
        jobs = plan_jobs(cfg)
        r.say(f"{len(jobs)} quantize+evaluate jobs on {', '.join(cfg.tasks)} at {', '.join(map(str, cfg.bits))} bits "
              f"(model fingerprint {r.fp})")
        try:
            return _run_jobs(r, jobs, cfg=cfg, run_dir=run_dir, lm=lm, device=device, command=command, t0=t0)
        finally:
            r.close()


def _run_jobs(r: Runner, jobs, *, cfg: RunConfig, run_dir: Path, lm, device, command: str, t0: float) -> RunResult:
    rows, item_kl = [], {}
    for task in cfg.tasks:
        ref = r.original_eval(task)
        rows += [result_row(None, task, bits, ref) for bits in cfg.bits]
    for i, job in enumerate(jobs, 1):
        tj = time.perf_counter()
        doc = r.run_job(job)
        rows.append(result_row(job, job.task, job.bits, doc))
        if doc.get("item_kl"):
            item_kl[(job.bits, job.label, job.task)] = (doc["item_kl"], doc["item_tokens"])
        m = doc["metrics"]
        r.say(f"({i}/{len(jobs)}) {job.bits}-bit {job.label:<14} on {job.task}: KL {m.get('kl', float('nan')):.4f}, "
              f"top-1 {m.get('top1_agreement', float('nan')):.3f}, NLL {m['nll_per_token']:.3f}, "
              f"{doc['average_bits']:.3f} bits ({time.perf_counter() - tj:.0f}s)")
    score_dirs = {}
    for t in cfg.tasks:   # the report's circuit maps need every task's scores, even when all masks were reused
        for b in cfg.bits:
            score_dirs[(t, b)] = r.tacq_scores(t, b)
    maps = {t: r.attribution_map(t, max(cfg.bits)) for t in cfg.tasks} if cfg.head_maps != "off" else {}
    faith = {}
    if cfg.faithfulness != "off":
        for t in cfg.tasks:
            faith[t] = r.faithfulness(t)
            write_json(run_dir / f"faithfulness-{_slug(t)}-{cfg.faithfulness}.json", faith[t], overwrite=True, compact_lists=True)
    res = RunResult(rows, transfer_rows(rows), dict(r.counts), item_kl, {k: v for k, v in score_dirs.items() if v},
                    time.perf_counter() - t0, faith, maps)
    doc = {"format": RUN_FORMAT, "circuitq_version": __version__, "command": command, "config": to_dict(cfg),
           "model": lm.name, "model_source": lm.source, "model_note": lm.note, "model_fingerprint": r.fp,
           "device": str(device), "machine": machine_info(device), "seconds": res.seconds, "steps": res.steps,
           "unparseable_eval_rows": r.skipped, "data_sources": {t: task.sources for t, task in r.tasks.items()},
           "score_dirs": {f"{t}@{b}": str(p.relative_to(run_dir)) for (t, b), p in res.score_dirs.items()},
           "maps": {t: str(p.relative_to(run_dir)) for t, p in res.maps.items()},
           "memory": {"measured_peak_bytes": r.meter.peaks, "process_peak_bytes": r.meter.process_peak(),
                      "estimate": r.estimate}, "log": r.log}
    with r.meter.stage("report"):
        write_run_outputs(run_dir, doc, res)
    doc["memory"].update(measured_peak_bytes=r.meter.peaks, process_peak_bytes=r.meter.process_peak())
    write_json(run_dir / "run.json", doc, overwrite=True)   # with the report's own peak
    return res


def machine_info(device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
