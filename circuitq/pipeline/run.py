"""``circuitq run``, the main job: model + tasks -> task circuits -> quantized models -> evaluation
against the original -> one report.

For every bit width and task: calibrate on the task's calibration split, score every weight with
TaCQ, keep the top ``fraction`` (0.35%) in 16-bit, quantize with mask-aware GPTQ, and evaluate
against the unquantized model on the task's held-out split. At the same budget the run also
evaluates GPTQ with no 16-bit weights, masks from the ``magnitude``, ``spqr``, ``grad`` and
``random`` baselines, and cross-task transfer (each other task's TaCQ circuit, and the union).

Every step writes a self-describing artifact under ``RUN/steps/`` whose ``step.json`` records
the settings it depends on; a step whose settings match an existing one is reused (looked up by
those settings, never by file name), so a rerun, or a resumed interrupted run, only does what is
missing or changed. Quantized weights are not kept (``--save-models`` would be ~0.5 GB each);
scores, masks and evaluation results are.

The plan of jobs is pure (``plan_jobs``); ``run`` is the driver.
"""
from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from circuitq import __version__
from circuitq.artifacts import atomic_dir, write_json
from circuitq.model.loading import DEFAULT_MODEL

RUN_FORMAT = "circuitq.run"
BASELINES = ("magnitude", "spqr", "grad", "random")


@dataclass(frozen=True)
class RunConfig:
    """Settings of a run (CLI defaults come from here). Defaults finish in about 30 minutes on a
    2-core CPU with the default model; scale ``calib_samples``/``eval_samples`` up on a GPU."""

    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] = ("mmlu", "gsm8k")
    bits: tuple[int, ...] = (2, 3)
    fraction: float = 0.0035
    baselines: tuple[str, ...] = BASELINES
    transfer: bool = True
    calib_samples: int = 32
    calib_seq_len: int = 512
    eval_samples: int = 48
    eval_seq_len: int = 1024
    group_size: int = 64
    hessian: str = "shared"
    damp: float = 0.01
    batch_size: int = 8
    seed: int = 0          # calibration sampling
    split_seed: int = 0    # which rows are calibration vs evaluation (fixed across --seed)
    shots: int = 0

    def __post_init__(self) -> None:
        from circuitq.saliency.methods import METHODS

        bad = [b for b in self.baselines if b not in METHODS]
        if bad:
            raise ValueError(f"unknown baseline method(s) {bad}; choose from {', '.join(METHODS)}")
        if not self.tasks:
            raise ValueError("a run needs at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat: {self.tasks}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"--fraction must be in (0, 1), got {self.fraction}")
        for n in ("calib_samples", "eval_samples", "calib_seq_len", "eval_seq_len", "batch_size"):
            if getattr(self, n) < 1:
                raise ValueError(f"--{n.replace('_', '-')} must be at least 1")


# ---------------------------------------------------------------------------------------------
# the plan (pure)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskRecipe:
    """Which weights stay 16-bit: ``method`` (``none``, ``tacq`` or a baseline) scored on
    ``source`` (a task, ``union`` of all tasks' TaCQ circuits, or None for task-free methods)."""

    method: str
    source: str | None = None

    def label(self, eval_task: str) -> str:
        if self.method == "none":
            return "gptq"
        if self.method == "tacq" and self.source not in (None, eval_task):
            return f"tacq[{self.source}]"
        return self.method


@dataclass(frozen=True)
class Job:
    bits: int
    task: str            # evaluated on, and calibrated (Hessian) on
    recipe: MaskRecipe

    @property
    def label(self) -> str:
        return self.recipe.label(self.task)


_TASK_FREE = ("magnitude", "random")


def plan_jobs(cfg: RunConfig) -> list[Job]:
    """Every (bits, task, mask) to quantize and evaluate. Worked example: tasks (mmlu, gsm8k),
    bits (3,), baselines (magnitude,) and transfer give per task: gptq, tacq, magnitude, the other
    task's tacq and the union: 10 jobs."""
    jobs = []
    for bits in cfg.bits:
        for task in cfg.tasks:
            recipes = [MaskRecipe("none"), MaskRecipe("tacq", task)]
            recipes += [MaskRecipe(b, None if b in _TASK_FREE else task) for b in cfg.baselines if b != "tacq"]
            if cfg.transfer and len(cfg.tasks) > 1:
                recipes += [MaskRecipe("tacq", t) for t in cfg.tasks if t != task] + [MaskRecipe("tacq", "union")]
            jobs += [Job(bits, task, r) for r in recipes]
    return jobs


# ---------------------------------------------------------------------------------------------
# steps keyed by their settings
# ---------------------------------------------------------------------------------------------
class StepStore:
    """Artifacts under ``root/steps/NAME/`` with ``step.json`` = ``{"kind", "key", ...}``. Lookup
    compares ``kind`` and ``key`` (the settings the step depends on); names are only for people."""

    def __init__(self, root: Path):
        self.root = Path(root) / "steps"
        self._index: dict[str, Path] | None = None

    @staticmethod
    def _digest(kind: str, key: dict) -> str:
        return hashlib.sha256(json.dumps({"kind": kind, "key": key}, sort_keys=True, default=str).encode()).hexdigest()

    def _scan(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for f in sorted(self.root.glob("*/step.json")):
                try:
                    d = json.loads(f.read_text())
                    self._index[self._digest(d["kind"], d["key"])] = f.parent
                except (OSError, ValueError, KeyError):
                    continue  # a foreign or damaged entry is never reused
        return self._index

    def find(self, kind: str, key: dict) -> Path | None:
        return self._scan().get(self._digest(kind, json.loads(json.dumps(key, default=str))))

    @contextmanager
    def create(self, kind: str, key: dict, name: str):
        """Yield a temporary directory that becomes the step once the block succeeds."""
        key = json.loads(json.dumps(key, default=str))
        digest = self._digest(kind, key)
        out = self.root / f"{name}-{digest[:10]}"
        with atomic_dir(out, overwrite=True) as tmp:
            yield tmp
            (tmp / "step.json").write_text(json.dumps({"kind": kind, "key": key, "circuitq_version": __version__,
                                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
        self._scan()[digest] = out


def examples_digest(examples) -> str:
    """Content hash of task examples: a step is reused only on the very same items."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.prompt.encode() + b"\x00" + e.completion.encode() + b"\x01")
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap content hash: config, parameter names and shapes, and a strided sample of values."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for n, p in model.state_dict().items():
        h.update(f"{n}{tuple(p.shape)}".encode())
        flat = p.detach().flatten()
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    rows: list[dict]                       # one per evaluated model (and the 16-bit reference)
    transfer: list[dict]
    steps: dict = field(default_factory=dict)   # {"reused": n, "computed": n}
    score_dirs: dict = field(default_factory=dict)  # {(task, bits): Path}
    seconds: float = 0.0


class Runner:
    """Holds the model, caches and the step store of one run."""

    def __init__(self, lm, cfg: RunConfig, run_dir: Path, data_dir=None, device="cpu", progress=True):
        self.lm, self.cfg, self.dir, self.data_dir = lm, cfg, Path(run_dir), data_dir
        self.device, self.progress = device, progress
        self.store = StepStore(self.dir)
        self.fp = model_fingerprint(lm.model)
        self._examples: dict = {}
        self._hessians: dict = {}
        self._ref_logits: dict = {}
        self._base: dict = {}
        self.counts = {"reused": 0, "computed": 0}
        self.skipped: dict[str, int] = {}   # evaluation rows left out: answer not parseable
        self.log: list[str] = []

    def say(self, msg: str) -> None:
        line = f"[circuitq run] {msg}"
        self.log.append(line)
        print(line, flush=True)

    # ---- data ---------------------------------------------------------------------------------
    def calib_key(self, task: str) -> dict:
        c = self.cfg
        return {"model": self.fp, "task": task, "samples": c.calib_samples, "seq_len": c.calib_seq_len,
                "seed": c.seed, "split_seed": c.split_seed, "shots": c.shots,
                "data": examples_digest(self.examples(task, "calib"))}

    def examples(self, task: str, split: str):
        from circuitq.data.tasks import _permute, load_examples

        if (task, split) not in self._examples:
            c = self.cfg
            if split == "eval":
                ex = load_examples(task, "eval", None, c.split_seed, c.shots, self.data_dir, self.lm.tokenizer)
                if len(ex) < c.eval_samples:
                    self.say(f"{task}: the evaluation split has {len(ex)} items, fewer than --eval-samples "
                             f"{c.eval_samples}; using all of it")
                self.skipped[task] = getattr(ex, "skipped", 0)
                ex = ex[: c.eval_samples]
            else:
                pool = load_examples(task, "calib", None, c.split_seed, c.shots, self.data_dir, self.lm.tokenizer)
                ex = [pool[i] for i in _permute(len(pool), c.seed)[: c.calib_samples]]
            self._examples[(task, split)] = ex
        return self._examples[(task, split)]

    # ---- statistics, Hessians, scores, masks ---------------------------------------------------
    def grad_stats(self, task: str):
        from circuitq.saliency.capture import collect_stats
        from circuitq.quant.driver import target_shapes  # noqa: F401 (model check)
        from circuitq.saliency.score import _save_stats, load_stats

        key = self.calib_key(task)
        found = self.store.find("stats", key)
        if found:
            self.counts["reused"] += 1
            return load_stats(found / "stats.safetensors", self.device)[0]
        self.say(f"{task}: per-sample gradients of {self.cfg.calib_samples} calibration samples")
        res = collect_stats(self.lm.model, self.lm.tokenizer, self.examples(task, "calib"), self.lm.source,
                            self.cfg.batch_size, self.cfg.calib_seq_len, ("sum_abs",), progress=self.progress)
        st = res["stats"]
        with self.store.create("stats", key, f"stats-{_slug(task)}") as tmp:
            _save_stats(tmp / "stats.safetensors", st, {**key, "truncated": res["truncated"],
                                                         "tokens_per_s": res["tokens_per_s"]})
        self.counts["computed"] += 1
        return st

    def calib_windows(self, task: str) -> torch.Tensor:
        """The calibration examples as consecutive token windows ``[k, L]`` (no padding)."""
        from circuitq.data.calib import consecutive_windows, token_stream

        ex = self.examples(task, "calib")
        stream = token_stream([e.prompt + e.completion for e in ex], self.lm.tokenizer)
        return consecutive_windows(stream, min(self.cfg.calib_seq_len, max(stream.numel() // 2, 8)))

    def hessians(self, task: str):
        from circuitq.quant.driver import collect_hessians

        if task not in self._hessians:
            calib = self.calib_windows(task)
            self.say(f"{task}: Hessians of every linear input from {calib.numel()} calibration tokens")
            self._hessians[task] = collect_hessians(self.lm.model, calib, self.cfg.batch_size, self.device, self.progress)
        return self._hessians[task]

    def quantize_cfg(self, bits: int):
        from circuitq.quant.driver import QuantizeConfig

        c = self.cfg
        return QuantizeConfig(bits=bits, group_size=c.group_size, damp=c.damp, batch_size=c.batch_size, hessian=c.hessian)

    def quantized(self, task: str, bits: int, masks=None, keep_hinv=False):
        """A quantized copy of the model (calibrated on ``task``) and its ``QuantizeResult``:
        shared Hessians are collected once per task and reused; sequential GPTQ runs in full."""
        from circuitq.quant.plan import PrecisionPlan
        from circuitq.quant.driver import quantize_model

        twin = copy.deepcopy(self.lm.model)
        shared = self.cfg.hessian == "shared"
        res = quantize_model(twin, None if shared else self.calib_windows(task), PrecisionPlan(bits),
                             self.quantize_cfg(bits), masks, self.device, progress=self.progress, keep_hinv=keep_hinv,
                             hessians=self.hessians(task) if shared else None)
        return twin, res

    def score_key(self, task: str, bits: int, method: str) -> dict:
        return {**self.calib_key(task), "method": method, "bits": bits, "group_size": self.cfg.group_size,
                "hessian": self.cfg.hessian, "damp": self.cfg.damp}

    def scores(self, task: str, bits: int, method: str) -> dict:
        """Saliency scores ``{name: [out, in]}``; TaCQ's are kept as a scores directory."""
        from circuitq.quant.driver import target_shapes
        from circuitq.saliency.methods import SaliencyInputs, compute_scores, method as saliency_method
        from circuitq.saliency.score import load_scores, write_scores_dir

        m = saliency_method(method)
        key = self.score_key(task, bits, method)
        if method == "tacq":
            found = self.store.find("scores", key)
            if found:
                self.counts["reused"] += 1
                return load_scores(found)["scores"]
        weights = {n: self.lm.model.get_parameter(n).detach() for n in target_shapes(self.lm.model)}
        q = hinv = None
        if m.quantizer:
            q, hinv = self.base(task, bits)
        stats = self.grad_stats(task).tensors if m.stats else {}
        scores = compute_scores(method, SaliencyInputs(weights, q, stats, hinv, self.cfg.seed))
        if method == "tacq":
            from circuitq.circuits.maps import Geometry

            meta = {**key, "model": self.lm.name, "model_fingerprint": self.fp, "model_source": self.lm.source,
                    "model_note": self.lm.note,
                    "n_samples": len(self.examples(task, "calib")),
                    "geometry": Geometry.from_config(self.lm.model.config).to_dict(), "circuitq_version": __version__}
            with self.store.create("scores", key, f"scores-{_slug(task)}-tacq-{bits}bit") as tmp:
                write_scores_dir(tmp / "scores", scores, None, meta)
                for f in (tmp / "scores").iterdir():
                    f.replace(tmp / f.name)
                (tmp / "scores").rmdir()
            self.counts["computed"] += 1
        return scores

    def base(self, task: str, bits: int):
        """``Q(W)`` of mask-free GPTQ (task Hessians) and the inverse-Hessian diagonals."""
        if (task, bits) not in self._base:
            self.say(f"{task}: mask-free {bits}-bit GPTQ for Q(W)")
            twin, res = self.quantized(task, bits, keep_hinv=True)
            q = {n + ".weight": twin.get_submodule(n).weight.detach() for n in res.qweights}
            self._base[(task, bits)] = (q, res.hinv_diag)
            del twin
        return self._base[(task, bits)]

    def mask_key(self, recipe: MaskRecipe, bits: int) -> dict:
        c = self.cfg
        if recipe.source == "union":
            src = [self.score_key(t, bits, "tacq") for t in c.tasks]
        elif recipe.source is None:
            src = {"model": self.fp, "seed": c.seed}
        else:
            src = self.score_key(recipe.source, bits, recipe.method)
        return {"method": recipe.method, "source": recipe.source, "bits": bits, "fraction": c.fraction, "scores": src}

    def mask(self, recipe: MaskRecipe, bits: int) -> dict | None:
        from circuitq.saliency.masks import combine, load_masks, mask_fraction, save_masks, select_topk

        if recipe.method == "none":
            return None
        key = self.mask_key(recipe, bits)
        found = self.store.find("mask", key)
        if found:
            self.counts["reused"] += 1
            return load_masks(found / "mask.safetensors").masks
        if recipe.source == "union":
            m = combine([self.mask(MaskRecipe("tacq", t), bits) for t in self.cfg.tasks], "union")
        else:
            task = recipe.source or self.cfg.tasks[0]
            m = select_topk(self.scores(task, bits, recipe.method), self.cfg.fraction)
        meta = {"model": self.lm.name, "model_source": self.lm.source, "task": recipe.source or "-",
                "method": recipe.method, "bits": bits, "group_size": self.cfg.group_size,
                "fraction": mask_fraction(m), "requested_fraction": self.cfg.fraction,
                "samples": self.cfg.calib_samples, "seq_len": self.cfg.calib_seq_len, "seed": self.cfg.seed,
                "circuitq_version": __version__}
        with self.store.create("mask", key, f"mask-{recipe.method}-{_slug(recipe.source or 'all')}-{bits}bit") as tmp:
            save_masks(tmp / "mask.safetensors", m, meta)
        self.counts["computed"] += 1
        return m

    # ---- evaluation -----------------------------------------------------------------------------
    def eval_key(self, task: str) -> dict:
        c = self.cfg
        return {"task": task, "samples": c.eval_samples, "seq_len": c.eval_seq_len, "split_seed": c.split_seed,
                "shots": c.shots, "reference": self.fp, "data": examples_digest(self.examples(task, "eval"))}

    def reference_eval(self, task: str, need_logits: bool = False) -> dict:
        """Metrics of the unquantized model; with ``need_logits`` its scored logits are kept in
        memory so that quantized models are compared without running it again."""
        from circuitq.evals import evaluate

        key = {**self.eval_key(task), "model": "reference"}
        found = self.store.find("eval", key)
        if found and not (need_logits and task not in self._ref_logits):
            self.counts["reused"] += 1
            return json.loads((found / "eval.json").read_text())
        self.say(f"{task}: evaluating the unquantized model on {len(self.examples(task, 'eval'))} held-out items")
        cache: dict = {}
        res = evaluate(self.lm.model, self.lm.tokenizer, self.examples(task, "eval"), _kind(task), None,
                       self.cfg.batch_size, self.cfg.eval_seq_len, progress=self.progress, logits_out=cache)
        self._ref_logits[task] = cache
        doc = {"metrics": res.metrics}
        if not found:
            with self.store.create("eval", key, f"eval-reference-{_slug(task)}") as tmp:
                write_json(tmp / "eval.json", doc)
                _write_items_csv(tmp / "items.csv", res.items)
            self.counts["computed"] += 1
        return doc

    def job_key(self, job: Job) -> dict:
        return {**self.eval_key(job.task), "model": self.fp, "bits": job.bits, "group_size": self.cfg.group_size,
                "hessian": {**self.calib_key(job.task), "mode": self.cfg.hessian, "damp": self.cfg.damp},
                "mask": None if job.recipe.method == "none" else self.mask_key(job.recipe, job.bits)}

    def run_job(self, job: Job) -> dict:
        from circuitq.evals import evaluate

        key = self.job_key(job)
        found = self.store.find("eval", key)
        if found:
            self.counts["reused"] += 1
            return json.loads((found / "eval.json").read_text())
        masks = self.mask(job.recipe, job.bits)
        t0 = time.perf_counter()
        twin, qres = self.quantized(job.task, job.bits, masks)
        tq = time.perf_counter() - t0
        if job.task not in self._ref_logits:
            self.reference_eval(job.task, need_logits=True)
        t0 = time.perf_counter()
        res = evaluate(twin, self.lm.tokenizer, self.examples(job.task, "eval"), _kind(job.task), None,
                       self.cfg.batch_size, self.cfg.eval_seq_len, progress=self.progress,
                       reference_logits=self._ref_logits[job.task])
        doc = {"metrics": res.metrics, "average_bits": qres.bits.average_bits, "n_16bit": qres.bits.nnz,
               "quantize_seconds": tq, "eval_seconds": time.perf_counter() - t0}
        with self.store.create("eval", key, f"eval-{_slug(job.label)}-{_slug(job.task)}-{job.bits}bit") as tmp:
            write_json(tmp / "eval.json", doc)
            _write_items_csv(tmp / "items.csv", res.items)
        self.counts["computed"] += 1
        return doc


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s).strip("-")[:40]


def _kind(task: str) -> str:
    from circuitq.data.tasks import TaskSpec

    return TaskSpec.parse(task).kind


def _write_items_csv(path: Path, items: list[dict]) -> None:
    import csv

    cols = sorted({k for r in items for k in r})
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(items)


def result_row(job: Job | None, task: str, bits: int, doc: dict) -> dict:
    """One row of the results table from an evaluation document."""
    m = doc["metrics"]
    flips = m.get("flips") or {}
    return {"bits": bits, "task": task, "method": job.label if job else "reference (16-bit)",
            "mask_method": job.recipe.method if job else "-", "circuit_from": (job.recipe.source or "-") if job else "-",
            "average_bits": doc.get("average_bits", 16.0), "n_16bit": doc.get("n_16bit", 0),
            "kl": m.get("kl"), "top1_agreement": m.get("top1_agreement"), "nll_per_token": m.get("nll_per_token"),
            "accuracy": m.get("accuracy"), "flips_lost": flips.get("lost"), "flips_gained": flips.get("gained"),
            "items": m.get("items"), "scored_tokens": m.get("scored_tokens"),
            "quantize_seconds": doc.get("quantize_seconds"), "eval_seconds": doc.get("eval_seconds")}


def transfer_rows(rows: list[dict]) -> list[dict]:
    """The transfer matrix as rows: circuit source × evaluated task (TaCQ masks and GPTQ)."""
    out = []
    for r in rows:
        if r["mask_method"] == "tacq" or r["method"] == "gptq":
            src = "none (gptq)" if r["method"] == "gptq" else r["circuit_from"]
            out.append({"bits": r["bits"], "circuit": src, "evaluated_on": r["task"], "kl": r["kl"],
                        "top1_agreement": r["top1_agreement"], "nll_per_token": r["nll_per_token"],
                        "accuracy": r["accuracy"], "average_bits": r["average_bits"]})
    return out


def run(lm, cfg: RunConfig, run_dir: str | Path, data_dir=None, device="cpu", progress: bool = True,
        command: str = "") -> RunResult:
    """Execute (or resume) a run in ``run_dir`` and write its report. Returns the tables."""
    from circuitq.pipeline.report import write_run_outputs

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    r = Runner(lm, cfg, run_dir, data_dir, device, progress)
    for task in cfg.tasks:       # fail early on data problems
        r.examples(task, "calib")
        r.examples(task, "eval")
    jobs = plan_jobs(cfg)
    r.say(f"{len(jobs)} quantize+evaluate jobs on {', '.join(cfg.tasks)} at {', '.join(map(str, cfg.bits))} bits "
          f"(model fingerprint {r.fp})")
    rows = []
    for task in cfg.tasks:
        ref = r.reference_eval(task)
        for bits in cfg.bits:
            rows.append(result_row(None, task, bits, ref))
    for i, job in enumerate(jobs, 1):
        tj = time.perf_counter()
        doc = r.run_job(job)
        rows.append(result_row(job, job.task, job.bits, doc))
        m = doc["metrics"]
        r.say(f"({i}/{len(jobs)}) {job.bits}-bit {job.label:<14} on {job.task}: KL {m.get('kl', float('nan')):.4f}, "
              f"top-1 {m.get('top1_agreement', float('nan')):.3f}, NLL {m['nll_per_token']:.3f}, "
              f"{doc['average_bits']:.3f} bits ({time.perf_counter() - tj:.0f}s)")
    score_dirs = {(t, b): r.store.find("scores", r.score_key(t, b, "tacq")) for t in cfg.tasks for b in cfg.bits}
    res = RunResult(rows, transfer_rows(rows), dict(r.counts), {k: v for k, v in score_dirs.items() if v},
                    time.perf_counter() - t0)
    doc = {"format": RUN_FORMAT, "circuitq_version": __version__, "command": command, "config": asdict(cfg),
           "model": lm.name, "model_source": lm.source, "model_note": lm.note, "model_fingerprint": r.fp,
           "device": str(device), "machine": machine_info(device), "seconds": res.seconds, "steps": res.steps,
           "unparseable_eval_rows": r.skipped,
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
