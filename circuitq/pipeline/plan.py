"""The plan of a run (pure): which (bits, task, mask recipe) jobs to quantize and evaluate."""
from __future__ import annotations

from dataclasses import dataclass

from circuitq.config import RunConfig
from circuitq.saliency.methods import method


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


def plan_jobs(cfg: RunConfig) -> list[Job]:
    """Every (bits, task, mask) to quantize and evaluate. Worked example: tasks (mmlu, gsm8k),
    bits (3,), baselines (magnitude,) and transfer give per task: gptq, tacq, magnitude, the other
    task's tacq and the union: 10 jobs."""
    jobs = []
    for bits in cfg.bits:
        for task in cfg.tasks:
            recipes = [MaskRecipe("none"), MaskRecipe("tacq", task)]
            recipes += [MaskRecipe(b, None if method(b).task_free else task) for b in cfg.baselines if b != "tacq"]
            if cfg.transfer and len(cfg.tasks) > 1:
                recipes += [MaskRecipe("tacq", t) for t in cfg.tasks if t != task] + [MaskRecipe("tacq", "union")]
            jobs += [Job(bits, task, r) for r in recipes]
    return jobs
