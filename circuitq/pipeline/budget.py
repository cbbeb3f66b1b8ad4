"""The memory and disk a run needs, stage by stage, as formulas of the model's own numbers (pure).

Symbols (bytes unless said): ``P`` parameters, ``s`` bytes per parameter of the loaded model (4 for
float32), ``P_lin`` the targeted decoder linear weights, ``V`` vocabulary, ``d`` hidden size,
``L`` layers, ``d_ff`` MLP width, ``S = Σ_g in_g²`` summed over one layer's Hessian groups
(q/k/v: ``d``, o: ``n_h·d_h``, gate/up: ``d``, down: ``d_ff``), ``N`` padded calibration tokens,
``B_t`` padded tokens per gradient batch (``--batch-tokens``), ``b·T_e`` tokens of one evaluation
batch, ``T_ans``/``T_all`` scored / every evaluation token, ``C = evals.CHUNK``, ``E`` the GPTQ
chunk (``quant.driver.gptq_stream``'s ``max_elems``), ``k = fraction · P_lin``.

| stage | host memory beyond the runtime and the model (``s·P``) | disk it leaves |
| --- | --- | --- |
| gradients (Σ\\|G\\|; and Σ G for the attribution maps, a second pass of the same size) | ``4·P_lin`` per statistic ``+ max(B_t·4·(L·(12·d + 4·d_ff) + 3·V), T_long·4·(L·d + 12·d + 4·d_ff + 3·V))`` (activations, logits; an item of ``T_long`` tokens over the budget reruns its layers in the backward pass) | ``4·P_lin`` per task and pass |
| Hessians | ``4·d·N`` (hidden states) ``+ 8·S`` (one layer's H and factors) | ``8·L·S`` per task |
| Q(W) + scores + masks | ``32·E`` (one GPTQ chunk) ``+ 12·k`` per method | ``4·P_lin`` per (task, bits) |
| reference evaluation | ``4·b·T_e·(d + d_ff)`` (activations) ``+ 4·4·C·V`` | ``4·V·T_ans + 2·V·T_all`` per task |
| quantize + evaluate a job | ``32·E + P_lin/L`` (one chunk, one mask) ``+`` the evaluation's | ``4·P_lin`` backup while it runs |
| report | ``2·P_lin`` (two circuits as dense masks) ``+ 24·k + 0.15 GB`` (figures) | — |

The peak is the runtime (Python, torch, transformers, TransformerLens: ``R``, measured about
0.5 GB on this project's CPU machine) plus the model plus the largest stage. Nothing grows with the
number of tasks, bit widths or masks; disk does. ``analyses/bench_memory.py`` measures the peaks
and ``docs/memory.md`` compares them with these formulas on two real models.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from circuitq.data.tasks import tokenize_examples
from circuitq.errors import human_bytes
from circuitq.model.arch import Geometry, target_shapes

GPTQ_CHUNK = 2 ** 23        # quant.driver.gptq_stream's default max_elems
EVAL_CHUNK = 256            # evals.CHUNK
RUNTIME_BYTES = 0.55e9      # Python + torch + transformers + TransformerLens, measured (docs/memory.md)


@dataclass(frozen=True)
class ModelNumbers:
    """What the formulas read from a model: see the module docstring for the symbols."""

    P: int
    P_lin: int
    s: int
    V: int
    d: int
    L: int
    d_ff: int
    S: int          # Σ_g in_g² of one layer

    @classmethod
    def from_model(cls, model) -> "ModelNumbers":
        cfg, g = model.config, Geometry.from_config(model.config)
        p0 = next(model.parameters())
        shapes = target_shapes(model)
        return cls(sum(p.numel() for p in model.parameters()), sum(a * b for a, b in shapes.values()),
                   p0.element_size(), cfg.vocab_size, cfg.hidden_size, g.n_layers, g.d_mlp,
                   2 * cfg.hidden_size ** 2 + (g.n_heads * g.head_dim) ** 2 + g.d_mlp ** 2)

    @classmethod
    def from_config(cls, cfg, s: int = 4) -> "ModelNumbers":
        """From a Hugging Face config alone (a projection for a model not loaded), Llama-shaped."""
        g = Geometry.from_config(cfg)
        d, qd, kvd = cfg.hidden_size, g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
        per_layer = d * qd * 2 + d * kvd * 2 + 3 * d * g.d_mlp
        embed = cfg.vocab_size * d * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
        return cls(per_layer * g.n_layers + embed + d * (2 * g.n_layers + 1), per_layer * g.n_layers, s,
                   cfg.vocab_size, d, g.n_layers, g.d_mlp, 2 * d ** 2 + qd ** 2 + g.d_mlp ** 2)


class Stage(NamedTuple):
    name: str
    host: float     # bytes beyond runtime + model
    disk: float     # bytes it leaves on disk


class Tokens(NamedTuple):
    """Token counts of one task: padded calibration tokens, one evaluation batch's padded tokens,
    scored and every evaluation token."""

    calib: int
    eval_batch: int
    scored: int
    every: int
    calib_longest: int = 0   # the longest calibration item: alone in its gradient batch when over --batch-tokens


def task_tokens(windows, eval_items, tokenizer, cfg) -> Tokens:
    """The token counts of one task in a run (``cfg``: a ``RunConfig``): ``windows`` are its GPTQ
    calibration ``Sequences`` (padded per batch of ``quantize.batch_size``, longest first),
    ``eval_items`` its evaluation items (batched shortest first, as ``evals.evaluate`` does)."""
    bs, m = cfg.quantize.batch_size, windows.mask
    calib = sum(int(m[i:i + bs].sum(1).max()) * len(m[i:i + bs]) for i in range(0, len(m), bs))
    ev = tokenize_examples(eval_items, tokenizer, cfg.eval.seq_len)
    lens = sorted(len(x) for x in ev.ids)
    eb = cfg.eval.batch_size
    batch = max(lens[i:i + eb][-1] * len(lens[i:i + eb]) for i in range(0, len(lens), eb))
    return Tokens(calib, batch, sum(len(x) - s for x, s in zip(ev.ids, ev.scored_from)),
                  sum(len(x) - 1 for x in ev.ids) if cfg.eval.all_tokens else 0, int(m.sum(1).max()))


def gradient_activations(m: ModelNumbers, batch_tokens: int, longest: int, recompute: str = "long") -> float:
    """Bytes of activations the gradient pass keeps for its largest batch: every layer's
    (``4·(L·(12·d + 4·d_ff) + 3·V)`` per token) for a batch within ``batch_tokens``; for a batch that
    reruns its layers in the backward pass (``saliency.capture.LayerRecompute``: the item ``longest``
    over the budget under ``"long"``, every batch under ``"all"``) each layer's input and one layer's
    working set, ``4·(L·d + 12·d + 4·d_ff + 3·V)`` per token. ``"none"``: an item over the budget
    keeps everything."""
    every = 4 * (m.L * (12 * m.d + 4 * m.d_ff) + 3 * m.V)
    rerun = 4 * (m.L * m.d + 12 * m.d + 4 * m.d_ff + 3 * m.V)
    if recompute == "all":
        return max(batch_tokens, longest) * rerun
    if recompute == "none":
        return max(batch_tokens, longest) * every
    return max(batch_tokens * every, longest * rerun if longest > batch_tokens else 0)


def run_stages(m: ModelNumbers, tokens: dict[str, Tokens], n_bits: int, batch_tokens: int, n_methods: int,
               fraction: float, maps: bool = True, recompute: str = "long", n_stats: int = 1) -> list[Stage]:
    """The run's stages for ``tokens`` ``{task: Tokens}`` (module docstring's table). ``maps``: the
    attribution maps' Σ G pass (the gradients stage's memory again, its statistic on disk);
    ``recompute``: the gradient pass's layer checkpointing (``gradient_activations``); ``n_stats``: the
    statistics the gradient pass keeps (``Σ|G_s|``, and ``Σ_s G_s`` for an ``atp`` baseline), ``4·P_lin`` each."""
    k = fraction * m.P_lin
    t = list(tokens.values())
    n_tasks = len(t)
    ev = max(4 * x.eval_batch * (m.d + m.d_ff) for x in t) + 4 * 4 * EVAL_CHUNK * m.V
    longest = max(x.calib_longest for x in t)
    return [
        Stage("gradients", 4 * m.P_lin * n_stats + gradient_activations(m, batch_tokens, longest, recompute),
              4 * m.P_lin * n_tasks * (n_stats + (1 if maps else 0))),
        Stage("Hessians", max(4 * m.d * x.calib for x in t) + 8 * m.S, 8 * m.L * m.S * n_tasks),
        Stage("Q(W), scores and masks", 32 * GPTQ_CHUNK + 12 * k * n_methods, 4 * m.P_lin * n_tasks * n_bits),
        Stage("reference evaluation", ev, sum(4 * m.V * x.scored + 2 * m.V * x.every for x in t)),
        Stage("quantize + evaluate", 32 * GPTQ_CHUNK + m.P_lin / m.L + ev, 4 * m.P_lin),
        Stage("report", 2 * m.P_lin + 24 * k + 0.15e9, 0),   # two circuits' dense masks, figures
    ]


class Estimate(NamedTuple):
    peak: float          # bytes: runtime + model + largest stage
    worst: str           # the stage that sets it
    disk: float          # bytes left on disk at the end (plus the backup while jobs run)


def estimate(m: ModelNumbers, stages: list[Stage]) -> Estimate:
    worst = max(stages, key=lambda x: x.host)
    return Estimate(RUNTIME_BYTES + m.s * m.P + worst.host, worst.name, sum(x.disk for x in stages))


def _proc_kb(path: str, field: str) -> float | None:
    """``field`` of a ``/proc`` file in kB, as bytes; None where it cannot be read (not Linux)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_memory() -> float | None:
    """``MemAvailable`` of this machine (bytes), or None where it cannot be read."""
    return _proc_kb("/proc/meminfo", "MemAvailable")


def free_disk(path) -> float:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return float(shutil.disk_usage(p).free)


def gb(x: float) -> str:
    """Bytes for people: GB with two decimals, or MB / kB below a gigabyte."""
    return human_bytes(x)


class PeakMeter:
    """The measured peak resident memory of this process per stage (Linux: ``VmHWM`` of
    ``/proc/self/status``, reset through ``/proc/self/clear_refs`` when a stage starts). ``peaks``:
    ``{stage: bytes}`` (the largest over the stage's runs); empty where the kernel does not offer it;
    ``starts``: the resident memory as each stage started, so ``peaks − starts`` is what it added.
    Shared by the other threads of the process; what a stage frees stays counted until the next
    reset. ``process_peak()`` is the whole process's peak (the kernel's own figure is reset too).
    ``seconds``: each stage's wall time (summed over its runs), on every platform."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.starts: dict[str, float] = {}   # resident memory as the stage (its last run) started
        self.ok = _hwm() is not None
        self._before = 0.0

    def process_peak(self) -> float | None:
        """The process's peak since it started: resetting ``VmHWM`` also resets what the kernel
        reports as the process's maximum (``ru_maxrss``), so the meter keeps it across resets."""
        now = _hwm() if self.ok else None
        return None if now is None else max(now, self._before, *self.peaks.values())

    def stage(self, name: str):
        @contextmanager
        def cm():
            if self.ok:
                self._before = max(self._before, _hwm() or 0.0)
                self.starts[name] = _proc_kb("/proc/self/status", "VmRSS") or 0.0
                try:
                    with open("/proc/self/clear_refs", "w") as fh:
                        fh.write("5")
                except OSError:
                    self.ok = False
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                peak = _hwm() if self.ok else None
                if peak is not None:
                    self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
        return cm()


def _hwm() -> float | None:
    return _proc_kb("/proc/self/status", "VmHWM")
