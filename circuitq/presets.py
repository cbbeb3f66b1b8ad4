"""Named recipes, as data: a preset sets leaf settings of the settings tree (``circuitq.config``).

``tacq-paper`` is TaCQ as the official code computes it (arXiv 2504.07389; github
The-Inscrutable-X/TACQ: ``utils/gradient_attributors.py``, ``datasets_directory/*_utils.py``,
``gptq/llama.py``):

=========================  ==========================================  ===========================
setting                    official TaCQ                               circuitq default
=========================  ==========================================  ===========================
gradient loss              every token of the calibration text         the completion only
MMLU prompt                5-shot from dev, raw text, no chat template 0-shot, chat template
GSM8k prompt               8-shot chain of thought, "The answer is N." 0-shot
calibration                128 x 2048 tokens, whole items, one each    ``--samples`` items, one each
Q(W) and final quantizer   sequential GPTQ, per channel, MSE scales,   group 64, no MSE (``run``:
                           asymmetric, damping 0.01                    shared Hessians)
=========================  ==========================================  ===========================

A preset has two parts. ``recipe`` entries define the method: giving a flag that contradicts
one is an error that names both. ``scale`` entries are the official sizes (128 x 2048 tokens):
they apply unless the flag is given, so a slower machine can keep the recipe at a smaller
budget (the output says which sizes were changed).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace

from circuitq.config import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    doc: str
    recipe: dict      # dotted path -> value (paths relative to a command's config)
    scale: dict


PRESETS = {
    "tacq-paper": Preset(
        "tacq-paper", "TaCQ as the official code computes it",
        recipe={"calib.loss": "all", "data.shots": -1, "data.template": "raw",
                "quantize.method": "gptq", "quantize.hessian": "sequential", "quantize.group_size": -1,
                "quantize.mse": True, "quantize.sym": False, "quantize.damp": 0.01, "quantize.act_order": False},
        scale={"calib.tokens": 128 * 2048, "calib.seq_len": 2048}),
}


def _has(cfg, path: str) -> bool:
    obj = cfg
    for part in path.split("."):
        if not is_dataclass(obj) or part not in {f.name for f in fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def _set(cfg, path: str, value):
    head, _, rest = path.partition(".")
    if not rest:
        return replace(cfg, **{head: value})
    return replace(cfg, **{head: _set(getattr(cfg, head), rest, value)})


def _get(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_preset(cfg, name: str, given: dict | None = None):
    """``cfg`` with preset ``name`` applied (only the paths ``cfg`` has: ``quantize`` has no
    loss). ``given``: ``{path: flag}`` of settings the user set explicitly; one that contradicts
    a recipe entry raises ``ConfigError`` naming the preset and the flag; a given scale entry
    wins over the preset's. Returns the new config."""
    p = get_preset(name)
    given = given or {}
    for path, value in p.recipe.items():
        if not _has(cfg, path):
            continue
        if path in given and _get(cfg, path) != value:
            raise ConfigError(f"--preset {name} sets {path.split('.')[-1]}={value!r} but {given[path]} asks for "
                              f"{_get(cfg, path)!r}; drop {given[path]} or the preset")
        cfg = _set(cfg, path, value)
    for path, value in p.scale.items():
        if _has(cfg, path) and path not in given:
            cfg = _set(cfg, path, value)
    return cfg
