"""circuitq: Task-Circuit Quantization (TaCQ, arXiv 2504.07389) and tools around it.

The package is laid out by pipeline stage (each folder a stage, pure cores beside thin drivers):

* ``config``: the one settings tree (frozen dataclasses, one home per setting);
* ``model/``: per-architecture facts (``arch``) and loading (``loading``);
* ``data/``: task data readers, ``Task`` (disjoint calibration/evaluation items), calibration windows;
* ``saliency/``: per-sample gradient capture through TransformerLens hooks, saliency methods,
  score files, masks (selection and files);
* ``quant/``: uniform quantizer, mask-aware GPTQ core, precision plans and bit accounting, the
  whole-model driver (and ``Q(W)``), exports;
* ``circuits/``: circuit maps per layer/head/neuron, comparison, explorer helpers, plots;
* ``evals``: KL, top-1 agreement, task NLL, accuracy, flips;
* ``pipeline/``: the stage functions every entry point calls (``stages``), the run's plan, step
  store, driver and report, the score driver;
* ``app/``: the explorer (Streamlit), its runs catalog and background jobs; ``cli/``: the CLI.

The public API (``circuitq.collect_gradients``, ``saliency``, ``select``, ``quantize``,
``evaluate``, ``compare``, ...) is ``circuitq.api``, loaded on first use. Importing circuitq
changes no global state.
"""
__version__ = "0.8.9"

_API = ("CalibConfig", "DataConfig", "EvalConfig", "MaskConfig", "QuantizeConfig", "QuantizeJob", "RunConfig",
        "ScoreConfig", "DEFAULT_FRACTION", "Task", "Geometry", "target_shapes", "load_model", "calibration_tokens",
        "collect_gradients", "collect_hessians", "compare", "evaluate", "export", "quantize", "quantized_weights",
        "qw_config", "score_weights", "select", "run", "circuit_map", "apply_preset", "PRESETS", "load_masks",
        "save_masks", "CircuitqError", "quantized_reference", "reference_config", "integrated_gradients",
        "walk_path", "path_diagnosis")


def __getattr__(name):
    if name in _API:
        from circuitq import api

        return getattr(api, name)
    raise AttributeError(f"module 'circuitq' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
