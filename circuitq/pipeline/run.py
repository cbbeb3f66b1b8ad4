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

import platform
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from circuitq import __version__
from circuitq.artifacts import write_csv, write_json
from circuitq.config import QuantizeConfig, RunConfig, to_dict
from circuitq.pipeline import stages
from circuitq.pipeline.plan import Job, MaskRecipe, plan_jobs
from circuitq.pipeline.store import StepStore, examples_digest, model_fingerprint

RUN_FORMAT = "circuitq.run"
# methods whose scores changed definition since 0.1 (their older steps must not be reused)
REDEFINED = {"spqr": "gptq-scaled-errors-layer-relative"}


def check_run_config(cfg: RunConfig) -> None:
    """What a ``RunConfig`` cannot check alone: the baselines name saliency methods."""
    from circuitq.config import ConfigError
    from circuitq.saliency.methods import METHODS

    bad = [b for b in cfg.baselines if b not in METHODS]
    if bad:
        raise ConfigError(f"unknown baseline method(s) {bad}; choose from {', '.join(METHODS)}")


@dataclass(frozen=True)
class StepKeys:
    """The keys of a run's steps (pure functions of the settings, the model fingerprint ``fp``
    and the items' content digests). Quantizer settings beyond group size, Hessian mode and
    damping enter a key only when they differ from the default, so run directories made before
    those settings existed are still reused."""

    cfg: RunConfig
    fp: str
    calib_digest: dict       # task -> examples_digest of its calibration items
    eval_digest: dict        # task -> examples_digest of its evaluation items

    def calib(self, task: str) -> dict:
        c, d = self.cfg.calib, self.cfg.data
        key = {"model": self.fp, "task": task, "samples": c.samples, "seq_len": c.seq_len, "seed": c.seed,
               "split_seed": d.split_seed, "shots": d.shots, "data": self.calib_digest[task]}
        if c.loss != "answer":   # only when not the default, so older run directories stay readable
            key["loss"] = c.loss
        if c.tokens:
            key["tokens"] = c.tokens
        if d.template != "auto":
            key["template"] = d.template
        return key

    def quantizer(self) -> dict:
        q, base = self.cfg.quantize, QuantizeConfig()
        extra = {f.name: getattr(q, f.name) for f in fields(q)
                 if f.name not in ("bits", "group_size", "hessian", "damp", "batch_size")
                 and getattr(q, f.name) != getattr(base, f.name)}
        # since 0.3 the Hessians see one calibration item per sequence (before: EOS-joined windows)
        return {"group_size": q.group_size, "hessian": q.hessian, "damp": q.damp, "hessian_rows": "one-item-each",
                **extra}

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
        key = {"task": task, "samples": e.samples, "seq_len": e.seq_len, "split_seed": d.split_seed,
               "shots": d.shots, "reference": self.fp, "data": self.eval_digest[task], "all_tokens": e.all_tokens}
        if d.template != "auto":
            key["template"] = d.template
        return key

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


class Runner:
    """The model, the tasks, in-memory caches and the step store of one run. Each method is one
    stage looked up in the store by its key, else computed by ``pipeline.stages`` and stored."""

    def __init__(self, lm, cfg: RunConfig, run_dir: Path, device="cpu", progress=True):
        from circuitq.data.tasks import Task

        self.lm, self.cfg, self.dir, self.device, self.progress = lm, cfg, Path(run_dir), device, progress
        self.store = StepStore(self.dir, self.say)
        self.tasks = {t: Task(t, cfg.data, lm.tokenizer) for t in cfg.tasks}
        self._items = {}
        for t in cfg.tasks:   # fail early on data problems
            self.items(t, "calib")
            self.items(t, "eval")
        self.keys = StepKeys(cfg, model_fingerprint(lm.model),
                             {t: examples_digest(self.items(t, "calib")) for t in cfg.tasks},
                             {t: examples_digest(self.items(t, "eval")) for t in cfg.tasks})
        self.fp = self.keys.fp
        self._hessians: dict = {}
        self._windows: dict = {}
        self._ref_logits: dict = {}
        self._reference: dict = {}
        self.counts = {"reused": 0, "computed": 0}
        self.log: list[str] = []

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

    def _reuse(self, kind: str, key: dict):
        found = self.store.find(kind, key)
        if found:
            self.counts["reused"] += 1
        return found

    # ---- gradients, Hessians, Q(W) --------------------------------------------------------------
    def grad_stats(self, task: str):
        from circuitq.saliency.files import load_stats, save_stats

        key = self.keys.calib(task)
        found = self._reuse("stats", key)
        if found:
            return load_stats(found / "stats.safetensors", self.device)[0]
        self.say(f"{task}: per-sample gradients of {len(self.items(task, 'calib'))} calibration items")
        res = stages.collect_gradients(self.lm.model, self.lm.tokenizer, self.items(task, "calib"), self.cfg.calib,
                                       ("sum_abs",), progress=self.progress, model_path=self.lm.source)
        with self.store.create("stats", key, f"stats-{_slug(task)}") as tmp:
            save_stats(tmp / "stats.safetensors", res["stats"], {**key, "truncated": res["truncated"],
                                                                  "tokens_per_s": res["tokens_per_s"]})
        self.counts["computed"] += 1
        return res["stats"]

    def windows(self, task: str):
        """The task's calibration items as GPTQ sees them (one per sequence, padding masked)."""
        if task not in self._windows:
            w = stages.calibration_tokens(self.items(task, "calib"), self.lm.tokenizer, self.cfg.calib)
            self.say(f"{task}: GPTQ calibration: {w.tokens} tokens in {w.ids.shape[0]} items, one per sequence")
            self._windows[task] = w
        return self._windows[task]

    def hessians(self, task: str):
        if task not in self._hessians:
            w = self.windows(task)
            self.say(f"{task}: Hessians of every linear input (shared by every mask)")
            self._hessians[task] = stages.collect_hessians(self.lm.model, w, self.cfg.quantize, self.device,
                                                           self.progress)
        return self._hessians[task]

    def quantized(self, task: str, qcfg: QuantizeConfig, masks=None):
        """A quantized copy calibrated on ``task`` (shared Hessians collected once per task)."""
        shared = qcfg.hessian == "shared" and qcfg.method == "gptq"
        return stages.quantize(self.lm.model, qcfg, None if shared else self.windows(task),
                               self.hessians(task) if shared else None, masks, self.device, self.progress)

    def reference(self, task: str, bits: int, method: str):
        """``Q(W)`` for ``method`` (its own quantizer: GPTQ, or RTN for ``tacq-rtn``)."""
        qcfg = stages.reference_config(method, self.cfg.quantize_at(bits))
        if (task, qcfg) not in self._reference:
            self.say(f"{task}: mask-free {bits}-bit {qcfg.method.upper()} for Q(W)")
            shared = qcfg.hessian == "shared" and qcfg.method == "gptq"
            self._reference[(task, qcfg)] = stages.quantized_reference(
                self.lm.model, qcfg, None if shared else self.windows(task), self.hessians(task) if shared else None,
                need_hinv=qcfg.method == "gptq", device=self.device, progress=self.progress)
        return self._reference[(task, qcfg)]

    # ---- scores and masks -----------------------------------------------------------------------
    def scores(self, task: str, bits: int, method: str) -> dict:
        """Saliency scores ``{name: [out, in]}``; TaCQ's are kept as a scores directory."""
        from circuitq.saliency.files import load_scores, write_scores_files
        from circuitq.saliency.methods import method as saliency_method

        m = saliency_method(method)
        key = self.keys.score(task, bits, method)
        if method == "tacq":
            found = self._reuse("scores", key)
            if found:
                return load_scores(found)["scores"]
        ref = self.reference(task, bits, method) if m.quantizer else None
        stats = self.grad_stats(task) if m.stats else None
        scores = stages.score_weights(method, self.lm.model, stats, ref, self.cfg.calib.seed)
        if method == "tacq":
            from circuitq.model.arch import Geometry

            meta = {**key, "model": self.lm.name, "model_fingerprint": self.fp, "model_source": self.lm.source,
                    "model_note": self.lm.note, "n_samples": len(self.items(task, "calib")),
                    "settings": to_dict(self.cfg),
                    "geometry": Geometry.from_config(self.lm.model.config).to_dict(), "circuitq_version": __version__}
            with self.store.create("scores", key, f"scores-{_slug(task)}-tacq-{bits}bit") as tmp:
                write_scores_files(tmp, scores, None, meta)
            self.counts["computed"] += 1
        return scores

    def mask(self, recipe: MaskRecipe, bits: int) -> dict | None:
        from circuitq.saliency.masks import load_masks, mask_metadata, save_masks

        if recipe.method == "none":
            return None
        key = self.keys.mask(recipe, bits)
        found = self._reuse("mask", key)
        if found:
            return load_masks(found / "mask.safetensors").masks
        if recipe.source == "union":
            m = stages.select([self.scores(t, bits, "tacq") for t in self.cfg.tasks],
                              replace(self.cfg.mask, combine="rank-max"))
        else:
            m = stages.select(self.scores(recipe.source or self.cfg.tasks[0], bits, recipe.method), self.cfg.mask)
        c = self.cfg
        meta = mask_metadata(m, model=self.lm.name, model_source=self.lm.source, task=recipe.source or "-",
                             method=recipe.method, bits=bits, group_size=c.quantize.group_size,
                             requested_fraction=c.mask.fraction, samples=c.calib.samples, seq_len=c.calib.seq_len,
                             seed=c.calib.seed)
        with self.store.create("mask", key, f"mask-{recipe.method}-{_slug(recipe.source or 'all')}-{bits}bit") as tmp:
            save_masks(tmp / "mask.safetensors", m, meta)
        self.counts["computed"] += 1
        return m

    # ---- evaluation -----------------------------------------------------------------------------
    def reference_eval(self, task: str, need_logits: bool = False) -> dict:
        """Metrics of the unquantized model; with ``need_logits`` its scored logits are kept in
        memory so that quantized models are compared without running it again."""
        import json

        key = {**self.keys.eval(task), "model": "reference"}
        found = self.store.find("eval", key)
        if found and not (need_logits and task not in self._ref_logits):
            self.counts["reused"] += 1
            return json.loads((found / "eval.json").read_text())
        self.say(f"{task}: evaluating the unquantized model on {len(self.items(task, 'eval'))} held-out items")
        cache: dict = {}
        res = stages.evaluate(self.lm.model, self.lm.tokenizer, self.items(task, "eval"), self.tasks[task].kind,
                              None, self.cfg.eval, self.progress, logits_out=cache)
        self._ref_logits[task] = cache
        doc = {"metrics": res.metrics}
        if not found:
            with self.store.create("eval", key, f"eval-reference-{_slug(task)}") as tmp:
                write_json(tmp / "eval.json", doc)
                write_csv(tmp / "items.csv", res.items)
            self.counts["computed"] += 1
        return doc

    def run_job(self, job: Job) -> dict:
        import json

        key = self.keys.job(job)
        found = self._reuse("eval", key)
        if found:
            return json.loads((found / "eval.json").read_text())
        masks = self.mask(job.recipe, job.bits)
        t0 = time.perf_counter()
        twin, qres = self.quantized(job.task, self.cfg.quantize_at(job.bits), masks)
        tq = time.perf_counter() - t0
        if job.task not in self._ref_logits:
            self.reference_eval(job.task, need_logits=True)
        t0 = time.perf_counter()
        res = stages.evaluate(twin, self.lm.tokenizer, self.items(job.task, "eval"), self.tasks[job.task].kind, None,
                              self.cfg.eval, self.progress, reference_logits=self._ref_logits[job.task])
        doc = {"metrics": res.metrics, "average_bits": qres.bits.average_bits, "n_16bit": qres.bits.nnz,
               "quantize_seconds": tq, "eval_seconds": time.perf_counter() - t0,
               "item_kl": [r.get("kl") for r in res.items], "item_tokens": [r.get("tokens") for r in res.items]}
        with self.store.create("eval", key, f"eval-{_slug(job.label)}-{_slug(job.task)}-{job.bits}bit") as tmp:
            write_json(tmp / "eval.json", doc)
            write_csv(tmp / "items.csv", res.items)
        self.counts["computed"] += 1
        return doc


    def faithfulness(self, task: str) -> dict:
        """``circuitq faithfulness`` of ``task``'s TaCQ circuit at the largest bit width (a step)."""
        import json

        from circuitq.saliency.files import load_scores

        job = self.cfg.faithfulness_job(task)
        bits = max(self.cfg.bits)
        key = {"scores": self.keys.score(task, bits, "tacq"), "eval": self.keys.eval(task),
               "units": job.units, "top": job.top, "random": job.random, "ablation": job.ablation,
               "fraction": job.fraction, "seed": job.seed}
        found = self._reuse("faithfulness", key)
        if found:
            return json.loads((found / "faithfulness.json").read_text())
        if not self.store.find("scores", self.keys.score(task, bits, "tacq")):
            self.scores(task, bits, "tacq")
        scores = load_scores(self.store.find("scores", self.keys.score(task, bits, "tacq")))["scores"]
        self.say(f"{task}: faithfulness of the {bits}-bit circuit ({job.units}, {job.top} top + {job.random} random "
                 f"units, {job.ablation})")
        torch.manual_seed(job.seed)
        rep = stages.faithfulness(self.lm, scores, job, say=self.say, progress=self.progress)
        rep.update(model=self.lm.name, model_note=self.lm.note, bits=bits)
        with self.store.create("faithfulness", key, f"faithfulness-{_slug(task)}-{job.units}-{bits}bit") as tmp:
            write_json(tmp / "faithfulness.json", rep)
        self.counts["computed"] += 1
        return rep


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
    from circuitq.pipeline.report import write_run_outputs

    check_run_config(cfg)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    r = Runner(lm, cfg, run_dir, device, progress)
    jobs = plan_jobs(cfg)
    r.say(f"{len(jobs)} quantize+evaluate jobs on {', '.join(cfg.tasks)} at {', '.join(map(str, cfg.bits))} bits "
          f"(model fingerprint {r.fp})")
    rows, item_kl = [], {}
    for task in cfg.tasks:
        ref = r.reference_eval(task)
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
            if not r.store.find("scores", r.keys.score(t, b, "tacq")):
                r.scores(t, b, "tacq")
            score_dirs[(t, b)] = r.store.find("scores", r.keys.score(t, b, "tacq"))
    faith = {}
    if cfg.faithfulness != "off":
        for t in cfg.tasks:
            faith[t] = r.faithfulness(t)
            write_json(run_dir / f"faithfulness-{_slug(t)}-{cfg.faithfulness}.json", faith[t], overwrite=True)
    res = RunResult(rows, transfer_rows(rows), dict(r.counts), item_kl, {k: v for k, v in score_dirs.items() if v},
                    time.perf_counter() - t0, faith)
    doc = {"format": RUN_FORMAT, "circuitq_version": __version__, "command": command, "config": to_dict(cfg),
           "model": lm.name, "model_source": lm.source, "model_note": lm.note, "model_fingerprint": r.fp,
           "device": str(device), "machine": machine_info(device), "seconds": res.seconds, "steps": res.steps,
           "unparseable_eval_rows": r.skipped, "data_sources": {t: task.sources for t, task in r.tasks.items()},
           "score_dirs": {f"{t}@{b}": str(p.relative_to(run_dir)) for (t, b), p in res.score_dirs.items()},
           "log": r.log}
    write_run_outputs(run_dir, doc, res)
    return res


def machine_info(device) -> dict:
    import os

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
