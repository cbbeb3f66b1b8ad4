"""The one settings tree: every setting of every stage is declared once, here, in a frozen
dataclass; bigger configs *contain* smaller ones instead of copying their fields.

```
RunConfig                       circuitq run
├── data: DataConfig            where task rows come from and how they are split and prompted
├── calib: CalibConfig          which calibration items, token lengths, batching of the scoring pass
├── mask: MaskConfig            the 16-bit budget (DEFAULT_FRACTION) and how it is selected
├── quantize: QuantizeConfig    the quantizer: bits, group size, GPTQ settings, Hessian mode
└── eval: EvalConfig            held-out items, lengths, batching
ScoreConfig                     circuitq score: task, method, data, calib, quantize (for Q(W))
QuantizeJob                     circuitq quantize: calibration task, data, calib, quantize, eval (perplexity)
```

The CLI flags are generated from these fields (``circuitq.cli``): a flag's default is the
field's default, and a test checks that parsing no flags gives back exactly these configs.
A config whose default differs inside a bigger one says so where it is nested (for example
``RunConfig.quantize`` defaults to shared Hessians, which is what makes a run of 16 masks fit
on a CPU). Construction is by keyword only. This module imports no other circuitq module.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace

from circuitq.errors import CircuitqError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_FRACTION = 0.0035          # TaCQ's budget: 0.35% of the weights stay 16-bit (about +0.1 bit)
SUPPORTED_BITS = (2, 3, 4, 8)
HESSIAN_MODES = ("sequential", "shared")
QUANT_METHODS = ("gptq", "rtn")
ATTENTION_MODES = ("sdpa", "eager", "bridge")
# which tokens' loss the gradients are of: the completion ("answer"), every token ("all"), or every
# token of the task's own text, leaving out a chat template's ("text")
LOSS_SCOPES = ("answer", "all", "text")
OBJECTIVES = ("nll", "metric")   # saliency.objectives
METRIC_KINDS = ("ioi", "greater-than", "capitals")   # tasks whose metric has a gradient (saliency.objectives)
RECOMPUTE_MODES = ("long", "all", "none")   # saliency.capture.LayerRecompute
TEMPLATES = ("auto", "chat", "raw")
EVAL_SPLITS = ("auto", "test", "halves")
COMBINE_MODES = ("union", "intersection", "rank-max")
BASELINES = ("magnitude", "spqr", "grad", "random")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


GPTQ_FORMAT_CHOICES = ("auto", "v1", "v2")
FAITH_UNITS_CHOICES = ("off", "heads", "kv-heads", "neurons", "modules", "sublayers", "layers")


class ConfigError(CircuitqError, ValueError):
    """A setting is out of range; the message names the flag and the fix."""


def _at_least(obj, names: tuple[str, ...], low: int) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and v < low:
            raise ConfigError(f"--{n.replace('_', '-')} must be at least {low}, got {v}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where task rows come from and how each task splits them into calibration and evaluation
    items (disjoint by construction: one seeded permutation, ``calib_fraction`` of it first)."""

    data_dir: str | None = field(default=None, metadata=_help(
        "folder with mmlu/ and gsm8k/ in their public layouts (else $CIRCUITQ_DATA_DIR, else shared/data)"))
    split_seed: int = field(default=0, metadata=_help("which rows are calibration vs evaluation (keep fixed)"))
    shots: int = field(default=0, metadata=_help(
        "few-shot examples in each prompt: MMLU from the subject's dev split, GSM8k from the 8 chain-of-thought "
        "exemplars; -1 = each task's standard (MMLU 5, GSM8k 8)"))
    template: str = field(default="auto", metadata=_help(
        "MMLU prompts: auto = the model's chat template when it has one; raw = plain text, as the official TaCQ "
        "code; chat = the template (an error without one)", choices=TEMPLATES))
    calib_fraction: float = field(default=0.5, metadata=_help("share of a task's rows used for calibration"))
    eval_split: str = field(default="auto", metadata=_help(
        "where evaluation items come from: test = the standard test split (mmlu/test/*_test.csv, "
        "gsm8k/test.jsonl; calibration then uses all of MMLU val / GSM8k train); halves = disjoint halves of "
        "MMLU val / GSM8k train; auto = test when present", choices=EVAL_SPLITS))

    def __post_init__(self) -> None:
        _at_least(self, ("shots",), -1)
        if self.eval_split not in EVAL_SPLITS:
            raise ConfigError(f"eval_split must be one of {EVAL_SPLITS}, got {self.eval_split!r}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if not 0 < self.calib_fraction < 1:
            raise ConfigError(f"calib_fraction must be in (0, 1), got {self.calib_fraction}")


@dataclass(frozen=True, kw_only=True)
class CalibConfig:
    """The calibration items (gradients and Hessians) and how the scoring pass batches them."""

    samples: int = field(default=128, metadata=_help("calibration items drawn from the task's calibration split"))
    seq_len: int = field(default=512, metadata=_help(
        "tokens per item at most (longer ones keep their end); each item is its own sequence, for the gradients "
        "and for the Hessians"))
    tokens: int = field(default=0, metadata=_help(
        "a calibration token budget instead of a count: items are drawn until their tokens would exceed it (the "
        "official TaCQ recipe: 128 x 2048); 0 = exactly --samples items"))
    seed: int = field(default=0, metadata=_help("calibration sampling seed"))
    batch_size: int = field(default=8, metadata=_help("samples per forward/backward (at most)"))
    batch_tokens: int = field(default=256, metadata=_help(
        "padded tokens per forward/backward (at most; 0 = no limit): bounds memory (the default model's gradient "
        "pass: 256 tokens peak 1.97 GB, 512 about 0.3 GB more, 5-10%% faster; docs/memory.md)"))
    loss: str = field(default="answer", metadata=_help(
        "answer: the gradients are of the loss on each item's completion (the answer letter, the solution); "
        "all: of the loss on every token of the item, as the official TaCQ code computes it; text: every token but "
        "those a chat template adds (its system prompt and role markers; the same as all without a template)",
        choices=LOSS_SCOPES))
    objective: str = field(default="nll", metadata=_help(
        "what each item's gradient is of: nll (the loss on its scored tokens) or metric (minus a circuit task's own "
        "metric at the first completion position: ioi's logit difference, greater-than's probability difference, "
        "capitals' logit margin)", choices=OBJECTIVES))
    attention: str = field(default="sdpa", metadata=_help(
        "sdpa: HF's fused attention inside the TransformerLens bridge (less memory); bridge: TransformerLens's "
        "step-by-step attention. Same scores", choices=ATTENTION_MODES))
    recompute: str = field(default="long", metadata=_help(
        "layer checkpointing in the gradient pass: long: a batch over --batch-tokens (an item longer than the "
        "budget runs alone) reruns each decoder layer in the backward pass instead of keeping its activations, so "
        "no batch keeps more than the budget's (about 25%% slower for that batch; the whole default pass: no measurable change); all: every batch; none: never. "
        "The same statistics bit for bit", choices=RECOMPUTE_MODES))

    def __post_init__(self) -> None:
        _at_least(self, ("samples", "seq_len", "batch_size"), 1)
        _at_least(self, ("batch_tokens", "tokens"), 0)
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2 tokens (one prediction), got {self.seq_len}")
        if self.loss not in LOSS_SCOPES:
            raise ConfigError(f"loss must be one of {LOSS_SCOPES}, got {self.loss!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "metric" and self.loss != "answer":
            raise ConfigError(f"--objective metric reads the first completion position: it needs --loss answer, "
                              f"not {self.loss}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """The quantizer, for the final model and for the ``Q(W)`` a saliency method contrasts with."""

    bits: int = field(default=3, metadata=_help("bits of the quantized weights", choices=SUPPORTED_BITS))
    group_size: int = field(default=64, metadata=_help(
        "-1 = one scale per output channel; else input columns per group (must divide every input dimension)"))
    sym: bool = field(default=False, metadata=_help("symmetric grid (default asymmetric)"))
    mse: bool = field(default=False, metadata=_help("MSE clipping search for the scales"))
    method: str = field(default="gptq", metadata=_help("gptq or round-to-nearest", choices=QUANT_METHODS))
    block_size: int = field(default=128, metadata=_help("GPTQ's lazy-batch block of columns"))
    damp: float = field(default=0.01, metadata=_help("GPTQ damping, a fraction of mean(diag H)"))
    act_order: bool = field(default=False, metadata=_help("quantize columns by decreasing Hessian diagonal"))
    hessian: str = field(default="sequential", metadata=_help(
        "sequential: GPTQ's layer-by-layer recipe on the partly quantized model; shared: one pass of the original "
        "model, reused for every mask, all modules batched (several times faster, slightly lower quality)",
        choices=HESSIAN_MODES))
    batch_size: int = field(default=8, metadata=_help("windows per forward pass when collecting Hessians"))

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"unsupported bits={self.bits}: circuitq quantizes to one of {SUPPORTED_BITS} bits")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"--group-size must be -1 (per output channel) or a positive number of input "
                              f"columns, got {self.group_size}")
        if self.hessian not in HESSIAN_MODES:
            raise ConfigError(f"hessian must be one of {HESSIAN_MODES}, got {self.hessian!r}")
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"quantization method must be one of {QUANT_METHODS}, got {self.method!r}")
        if not self.damp > 0:
            raise ConfigError(f"--damp must be positive, got {self.damp}")
        _at_least(self, ("block_size", "batch_size"), 1)


@dataclass(frozen=True, kw_only=True)
class MaskConfig:
    """The circuit's budget: the global top ``fraction`` of weights (or the fraction that reaches
    ``target_bits``), optionally the same fraction in every layer; several score sets combine."""

    fraction: float = field(default=DEFAULT_FRACTION, metadata=_help("share of the weights kept in 16-bit"))
    target_bits: float | None = field(default=None, metadata=_help("average bits to reach instead (exact accounting)"))
    per_layer: bool = field(default=False, metadata=_help("the same fraction in every decoder layer"))
    combine: str = field(default="union", metadata=_help(
        "how several score sets combine: union or intersection of their circuits, or rank-max (the top fraction of "
        "the max of rank-normalised scores: the same budget as one task)", choices=COMBINE_MODES))

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ConfigError(f"--fraction must be in (0, 1), got {self.fraction}")
        if self.combine not in COMBINE_MODES:
            raise ConfigError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation on the task's held-out split."""

    samples: int | None = field(default=None, metadata=_help("at most this many held-out items (default: all)"))
    seq_len: int = field(default=1024, metadata=_help("tokens per item (longer ones keep their end)"))
    batch_size: int = field(default=8, metadata=_help("items per forward pass"))
    ppl_windows: int = field(default=16, metadata=_help("held-out windows for perplexity after quantizing (0 = skip)"))
    all_tokens: bool = field(default=True, metadata=_help(
        "MMLU: also compare with the reference at every token of each item (kl_all, top1_all, nll_all), not only at "
        "the answer letter, so the evaluation does not favour masks taken at that one position"))

    def __post_init__(self) -> None:
        _at_least(self, ("samples", "seq_len", "batch_size"), 1)
        _at_least(self, ("ppl_windows",), 0)


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """``circuitq score``: one task's scores. ``quantize`` gives the ``Q(W)`` of the methods that
    contrast with it (the same function and settings the run uses)."""

    model: str = field(default=DEFAULT_MODEL, metadata=_help("alias, a local HF directory or a hub id"))
    task: str = field(default="mmlu", metadata=_help("mmlu, mmlu:CATEGORY, mmlu:SUBJECT, gsm8k, ioi, greater-than, induction (ioi:N etc.: N items per split, default 400, 200 for induction), capitals, text:PATH, jsonl:PATH"))
    method: str = field(default="tacq", metadata=_help(
        "saliency method, or ig (integrated gradients between W and Q(W), --ig-steps passes)"))
    data: DataConfig = field(default_factory=DataConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    checkpoint_every: int = field(default=0, metadata=_help("samples between checkpoints (0 = none)"))
    ig_steps: int = field(default=16, metadata=_help(
        "method ig: Gauss-Legendre nodes on the path W -> Q(W), one gradient pass each (16: complete to 10%% at 3 "
        "bits on every task and seed measured, and on the densely measured path at every K >= 16 but not reliably "
        "below; analyses/results/ig_path)"))

    def __post_init__(self) -> None:
        _at_least(self, ("checkpoint_every",), 0)
        _at_least(self, ("ig_steps",), 1)


@dataclass(frozen=True, kw_only=True)
class QuantizeJob:
    """``circuitq quantize``: calibrate on ``task``'s calibration split, quantize, measure held-out
    perplexity on its evaluation split, export."""

    model: str = field(default=DEFAULT_MODEL, metadata=_help("alias, a local HF directory or a hub id"))
    task: str = field(default="gsm8k", metadata=_help("calibration task: gsm8k, mmlu, text:PATH, jsonl:PATH"))
    data: DataConfig = field(default_factory=DataConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gptq_format: str = field(default="auto", metadata=_help(
        "layout of the packed gptq/ checkpoint: v1 (checkpoint_format gptq: AutoGPTQ, optimum, servers), v2 "
        "(gptq_v2: gptqmodel's native format), auto = v2 for asymmetric grids (gptqmodel loads no foreign "
        "asymmetric v1 file), v1 for symmetric ones", choices=GPTQ_FORMAT_CHOICES))

    def __post_init__(self) -> None:
        if self.gptq_format not in GPTQ_FORMAT_CHOICES:
            raise ConfigError(f"--gptq-format must be one of {', '.join(GPTQ_FORMAT_CHOICES)}, got {self.gptq_format!r}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """``circuitq run``. Defaults finished in 35.8 minutes on a 2-core CPU with the default model
    in 0.6.2; 0.7's attribution maps add about 1.5 (128 calibration and 48 held-out items per task,
    shared Hessians, group size 64; the choice and its measurements: ``analyses/RUN_DEFAULTS.md``);
    scale ``eval.samples`` up on a GPU.
    ``quantize.bits`` is replaced by each of ``bits`` in turn."""

    model: str = field(default=DEFAULT_MODEL, metadata=_help("alias, a local HF directory or a hub id"))
    tasks: tuple[str, ...] = field(default=("mmlu", "gsm8k"), metadata=_help("tasks as in `circuitq score --task`"))
    bits: tuple[int, ...] = field(default=(2, 3), metadata=_help("bit widths", choices=SUPPORTED_BITS))
    baselines: tuple[str, ...] = field(default=BASELINES, metadata=_help("mask methods compared with tacq"))
    transfer: bool = field(default=True, metadata=_help("also cross-task and union circuits"))
    faithfulness: str = field(default="off", metadata=_help(
        "also check each task's circuit (at the largest bit width) against real ablation: the 10 top and 10 "
        "random units of this kind are quantized one at a time, and the circuit vs a random set of its size "
        "(`circuitq faithfulness`); costs about 24 evaluation passes per task", choices=FAITH_UNITS_CHOICES))
    head_maps: str = field(default="atp", metadata=_help(
        "what the report's head and neuron maps show beside the TaCQ selection mass: atp = attribution "
        "patching, the predicted change of the task loss when a head's weights go to Q(W) at the largest bit "
        "width (signed; one Σ G gradient pass of the calibration items per task); atp-metric = the same with the "
        "gradient of minus the task's own metric (ioi's logit difference, greater-than's probability difference, "
        "capitals' margin; other tasks keep atp): the predicted change of that metric; off = the selection mass only",
        choices=("atp", "atp-metric", "off")))
    map_samples: int = field(default=32, metadata=_help(
        "calibration items (the first N of each task's) for the attribution maps' Σ G pass; 32 is what the "
        "measured faithfulness used (docs/circuits.md), and the pass costs about as much per item as the "
        "per-sample gradient pass"))
    data: DataConfig = field(default_factory=DataConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)   # 128 items (analyses/RUN_DEFAULTS.md)
    mask: MaskConfig = field(default_factory=MaskConfig)
    quantize: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(hessian="shared"))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(samples=48))

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("a run needs at least one task")
        _at_least(self, ("map_samples",), 1)
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks repeat: {self.tasks}")
        if not self.bits:
            raise ConfigError("a run needs at least one bit width")
        for b in self.bits:
            if b not in SUPPORTED_BITS:
                raise ConfigError(f"unsupported bits={b}: use one of {SUPPORTED_BITS}")
        if self.faithfulness not in FAITH_UNITS_CHOICES:
            raise ConfigError(f"--faithfulness must be one of {', '.join(FAITH_UNITS_CHOICES)}, got {self.faithfulness!r}")

    def faithfulness_job(self, task: str) -> "FaithfulnessJob":
        """The ``circuitq faithfulness`` settings a run uses for ``task``'s circuit at ``max(bits)``."""
        return FaithfulnessJob(task=task, units=self.faithfulness, fraction=self.mask.fraction, seed=self.calib.seed,
                               data=self.data, calib=replace(self.calib, objective=self.map_objective(task)),
                               quantize=self.quantize_at(max(self.bits)),
                               eval=replace(self.eval, all_tokens=False))

    def map_objective(self, task: str) -> str:
        """What ``task``'s attribution map (and the run's faithfulness check of it) differentiates:
        ``metric`` under ``--head-maps atp-metric`` for a task with a differentiable metric
        (``saliency.objectives.METRIC_KINDS``), else ``nll``."""
        kind = task.split(":", 1)[0]
        return "metric" if self.head_maps == "atp-metric" and kind in METRIC_KINDS else "nll"

    def quantize_at(self, bits: int) -> QuantizeConfig:
        return replace(self.quantize, bits=bits)


@dataclass(frozen=True, kw_only=True)
class FaithfulnessJob:
    """``circuitq faithfulness``: replace units of the model one at a time (and the circuit as a
    whole) and compare the measured change of the task loss with the predicted one."""

    task: str | None = field(default=None, metadata=_help("task (default: the scores' task)"))
    units: str = field(default="heads", metadata=_help(
        "heads, kv-heads, neurons (blocks of 64), modules (layer x module), sublayers (each layer's attention and "
        "MLP blocks) or layers (whole decoder layers)", choices=FAITH_UNITS_CHOICES[1:]))
    top: int = field(default=10, metadata=_help("units with the highest summed score"))
    random: int = field(default=10, metadata=_help("further units drawn at random"))
    ablation: str = field(default="quantize", metadata=_help(
        "what a replaced weight becomes: quantize = round-to-nearest at --bits and --group-size (entry by "
        "entry), zero, or mean = its row's mean",
        choices=("quantize", "zero", "mean")))
    all_units: bool = field(default=False, metadata=_help(
        "measure every unit of --units (e.g. all query heads) instead of --top + --random"))
    estimators: tuple[str, ...] = field(default=("score", "atp"), metadata=_help(
        "what predicts each unit's change: score (the scores file), atp (attribution patching ΣG·ΔW), atp-local "
        "(atp with the unit's own attention/MLP block recomputed exactly: one more gradient pass and a block "
        "forward per unit), atp-local2 (atp-local plus the empirical-Fisher second-order term ½Σt_i² of each item's "
        "NLL: no pass beyond atp-local's; --objective nll), atp-local-median / atp-local-trimmed (atp-local's per-item terms "
        "summarised by their median / 10%%-trimmed mean over the calibration items instead of their sum: robust to a few "
        "heavy items, no extra pass), atp-window (atp with the unit's decoder layer and the --window "
        "layers after it recomputed exactly: one more gradient pass and window + 1 layer forwards per unit), atp-window2 "
        "(atp-window plus the same second-order term; --objective nll), atp-denoise (atp with the gradient taken where every unit is replaced: what restoring "
        "one unit saves, the keep-top curve's direction; one more gradient pass), ig (integrated gradients, --ig-steps passes), or any saliency method (tacq, grad, fisher, magnitude, ...); "
        "ΔW is the replacement of --ablation"))
    ig_steps: int = field(default=16, metadata=_help(
        "estimator ig: Gauss-Legendre nodes, one gradient pass each (16: complete to 10%% at 3 "
        "bits on every task and seed measured, and on the densely measured path at every K >= 16 but not reliably "
        "below; analyses/results/ig_path)"))
    window: int = field(default=2, metadata=_help(
        "estimators atp-window/atp-window2: decoder layers after the unit's own recomputed exactly before "
        "linearising (0 = the unit's layer alone)"))
    curve: bool = field(default=False, metadata=_help(
        "also faithfulness curves: units ordered by each estimator and at random; keep the top k in 16-bit and "
        "replace the rest (and the converse) for k along --curve-grid"))
    curve_grid: tuple[float, ...] = field(default=(0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0), metadata=_help(
        "fractions of the units kept (or replaced) along a faithfulness curve"))
    fraction: float = field(default=DEFAULT_FRACTION, metadata=_help("the circuit for the circuit-vs-random contrasts"))
    measured: str | None = field(default=None, metadata=_help(
        "an earlier faithfulness JSON whose per-unit measurements are reused instead of measured again (checked: the "
        "same model, task, evaluation items, units, ablation, bits and group size, and the base loss reproduces): "
        "other estimators or calibration seeds against the same measurements"))
    seed: int = field(default=0, metadata=_help("random units, random sets, the random ordering; with --seed also the calibration items"))
    data: DataConfig = field(default_factory=DataConfig)
    calib: CalibConfig = field(default_factory=lambda: CalibConfig(samples=128))
    quantize: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(hessian="shared"))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(samples=192, all_tokens=False))

    def __post_init__(self) -> None:
        _at_least(self, ("top", "random"), 0)
        _at_least(self, ("ig_steps",), 1)
        _at_least(self, ("window",), 0)
        if not self.estimators or len(set(self.estimators)) != len(self.estimators):
            raise ConfigError(f"--estimators needs distinct names, got {' '.join(self.estimators) or 'none'}")
        if not self.curve_grid or any(not 0 <= f <= 1 for f in self.curve_grid):
            raise ConfigError(f"--curve-grid takes fractions in [0, 1], got {' '.join(map(str, self.curve_grid))}")
        if not self.all_units and self.top + self.random < 3:
            raise ConfigError("--top plus --random must be at least 3 units (a rank correlation needs them)")
        if not 0 < self.fraction < 1:
            raise ConfigError(f"--fraction must be in (0, 1), got {self.fraction}")


def to_dict(cfg) -> dict:
    """A config as nested plain data (JSON-ready)."""
    return asdict(cfg)


def from_dict(cls, d: dict):
    """Rebuild a (nested) config from ``to_dict``'s output; unknown keys are an error."""
    kw = {}
    names = {f.name: f for f in fields(cls)}
    for k, v in d.items():
        if k not in names:
            raise ConfigError(f"{cls.__name__} has no setting {k!r}")
        sub = _nested_type(cls, k)
        kw[k] = from_dict(sub, v) if sub is not None and isinstance(v, dict) else (tuple(v) if isinstance(v, list) else v)
    return cls(**kw)


def _nested_type(cls, name: str):
    default = getattr(cls(), name)
    return type(default) if is_dataclass(default) else None


@dataclass(frozen=True, kw_only=True)
class EvalJob:
    """``circuitq eval``: one model (and a reference) on one task's split."""

    task: str = field(default="mmlu", metadata=_help("mmlu, mmlu:CATEGORY, mmlu:SUBJECT, gsm8k, ioi, greater-than, induction (ioi:N etc.: N items per split, default 400, 200 for induction), capitals, text:PATH, jsonl:PATH"))
    split: str = field(default="eval", metadata=_help("the task's evaluation or calibration items",
                                                      choices=("eval", "calib")))
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: bool = field(default=False, metadata=_help(
        "gsm8k: also generate greedily and score the final number by exact match (slow on CPU)"))
    max_new_tokens: int = field(default=256, metadata=_help("generation length with --generate"))
