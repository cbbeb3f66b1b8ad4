"""The Python API: the pipeline's stages on a model already in memory (a notebook's habit).

```python
import circuitq
from transformers import AutoModelForCausalLM, AutoTokenizer

lm = circuitq.load_model()                       # or a Llama/Qwen/Gemma/OLMo 2 model + tokenizer
task = circuitq.Task("gsm8k", tokenizer=lm.tokenizer)
calib = circuitq.CalibConfig(samples=16, seq_len=256)
items = task.calib_items(calib.samples, calib.seed)

stats = circuitq.collect_gradients(lm.model, lm.tokenizer, items, calib)["stats"]
qcfg = circuitq.QuantizeConfig(bits=3, group_size=64, hessian="shared")
windows = circuitq.calibration_tokens(items, lm.tokenizer, calib)
ref = circuitq.quantized_weights(lm.model, qcfg, windows)          # Q(W)
scores = circuitq.score_weights("tacq", lm.model, stats, ref)            # {HF weight name: [out, in]}
mask = circuitq.select(scores, circuitq.MaskConfig())    # 0.35% (circuitq.DEFAULT_FRACTION)
qmodel, report = circuitq.quantize(lm.model, qcfg, windows, masks=mask)
result = circuitq.evaluate(qmodel, lm.tokenizer, task.eval_items(48), task.kind, reference=lm.model)
result.metrics["kl"], report.bits.average_bits
```

Every name here is the function the CLI, the run driver and the explorer call.
"""
from __future__ import annotations

from circuitq.circuits.maps import aggregate
from circuitq.config import (
    DEFAULT_FRACTION,
    CalibConfig,
    DataConfig,
    EvalConfig,
    MaskConfig,
    QuantizeConfig,
    QuantizeJob,
    RunConfig,
    ScoreConfig,
)
from circuitq.data.tasks import Task
from circuitq.errors import CircuitqError
from circuitq.model.arch import Geometry, target_shapes
from circuitq.model.loading import load_model
from circuitq.pipeline.run import run as _run
from circuitq.pipeline.stages import (
    calibration_tokens,
    collect_gradients,
    collect_hessians,
    compare,
    evaluate,
    export,
    quantize,
    quantized_weights,
    qw_config,
    score_weights,
    select,
)
from circuitq.presets import PRESETS, apply_preset
from circuitq.saliency.attribution import integrated_gradients, path_diagnosis, walk_path
from circuitq.saliency.masks import load_masks, save_masks

# Names before 0.6.2, where "reference" meant Q(W) here and the unquantized model elsewhere:
# "reference" now always means the unquantized model, and Q(W) is "quantized weights".
quantized_reference = quantized_weights
reference_config = qw_config


def run(cfg: RunConfig, out, lm=None, device: str = "cpu", progress: bool = True):
    """The whole main job (``circuitq run``) on ``lm`` (loaded from ``cfg.model`` when None)."""
    lm = lm or load_model(cfg.model, device=device)
    return _run(lm, cfg, out, device, progress)


def circuit_map(values: dict, model_or_geometry):
    """Per layer × module, per attention head and per MLP neuron sums of ``values`` (scores, or
    a mask as 0/1): a ``CircuitMap``. Pass the model (its config gives the geometry) or a
    ``Geometry``."""
    geo = model_or_geometry if isinstance(model_or_geometry, Geometry) else Geometry.from_config(model_or_geometry.config)
    return aggregate({k: v.float() for k, v in values.items()}, geo)


__all__ = ["CalibConfig", "DataConfig", "EvalConfig", "MaskConfig", "QuantizeConfig", "QuantizeJob", "RunConfig",
           "ScoreConfig", "DEFAULT_FRACTION", "Task", "Geometry", "target_shapes", "load_model", "calibration_tokens",
           "collect_gradients", "collect_hessians", "compare", "evaluate", "export", "quantize", "quantized_weights",
           "qw_config", "score_weights", "select", "run", "circuit_map", "apply_preset", "PRESETS", "load_masks",
           "save_masks", "CircuitqError", "quantized_reference", "reference_config", "integrated_gradients",
           "walk_path", "path_diagnosis"]
