"""``circuitq score`` as a driver: task items -> gradients -> Q(W) -> scores, written as a
self-describing scores directory (``saliency.files``). Shards over ``torchrun`` processes
(all-reducing the sums) and resumes from checkpoints. The stages are ``pipeline.stages``, the
same functions ``circuitq run`` calls, so equal settings give equal scores.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from circuitq import __version__
from circuitq.artifacts import check_writable
from circuitq.config import ScoreConfig, to_dict
from circuitq.data.tasks import Task, TaskSpec
from circuitq.errors import UsageError
from circuitq.model.arch import Geometry
from circuitq.pipeline import stages
from circuitq.pipeline.store import model_fingerprint
from circuitq.saliency.attribution import describe_path, integrated_gradients
from circuitq.saliency.files import load_stats, save_stats, write_scores_dir
from circuitq.saliency.methods import method as saliency_method
from circuitq.saliency.objectives import check_objective

# the settings a checkpoint must share with the run that resumes it
RESUME_KEYS = ("model_fingerprint", "task", "method", "loss", "objective", "seed", "split_seed", "samples", "seq_len", "shots",
               "template", "calib_tokens", "world_size", "sample_order")


def _dist():
    """``torch.distributed`` when started by ``torchrun`` (its group made on first use), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist
    return None


def _close(dist) -> None:
    """Destroy the process group before the interpreter exits: a gloo group left to the
    interpreter's teardown can abort a rank ("terminate called without an active exception")
    after its work is done, failing a run that succeeded."""
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def score_metadata(lm, cfg: ScoreConfig, fingerprint: str, n_examples: int, world: int) -> dict:
    """The metadata a scores directory carries: flat keys readers use, plus the settings tree."""
    q, c, d = cfg.quantize, cfg.calib, cfg.data
    return {"model": lm.name, "model_source": lm.source, "model_note": lm.note, "model_fingerprint": fingerprint,
            "task": cfg.task, "method": cfg.method, "bits": q.bits, "group_size": q.group_size, "hessian": q.hessian,
            "damp": q.damp, "loss": c.loss, "objective": c.objective, "samples": c.samples, "seq_len": c.seq_len, "seed": c.seed, "split_seed": d.split_seed,
            "shots": d.shots, "template": d.template, "calib_tokens": c.tokens, "mse": q.mse, "settings": to_dict(cfg), "geometry": Geometry.from_config(lm.model.config).to_dict(),
            "n_examples": n_examples, "world_size": world, "circuitq_version": __version__,
            "sample_order": "longest-first"}


def _reduce(dist, st, truncated: int) -> int:
    for d in st.tensors.values():
        for t in d.values():
            dist.all_reduce(t)
    counts = torch.tensor([st.n_samples, st.n_tokens, st.n_skipped, truncated], dtype=torch.float64)
    dist.all_reduce(counts)
    st.n_samples, st.n_tokens, st.n_skipped, truncated = (int(c) for c in counts.tolist())
    return truncated


def _resume_state(ckpt: Path, meta: dict, device):
    state, cmeta = load_stats(ckpt, device)
    diff = [k for k in RESUME_KEYS if cmeta.get(k) != meta.get(k)]
    if diff:
        raise UsageError(f"checkpoint {ckpt} was made with other settings ({', '.join(diff)} differ); "
                         "drop --resume or delete the checkpoint")
    print(f"[circuitq] resuming from {ckpt} after {cmeta['done']} samples")
    return state, cmeta["done"]


def run_score(lm, cfg: ScoreConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              progress: bool = True, device=None) -> Path:
    """Score ``lm`` (a ``LoadedModel``) on ``cfg.task`` and write the scores directory ``out``."""
    out = Path(out)
    check_objective(cfg.calib.objective, TaskSpec.parse(cfg.task).kind, cfg.calib.loss)   # before any work
    if cfg.method == "ig":
        return run_ig(lm, cfg, out, overwrite, progress, device)
    stages.needed_stats(cfg.method)  # an unknown method fails before any work
    dist = _dist()
    try:
        return _score(lm, cfg, out, dist, resume, overwrite, progress, device)
    finally:
        _close(dist)


def _score(lm, cfg: ScoreConfig, out: Path, dist, resume: bool, overwrite: bool, progress: bool, device) -> Path:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    if rank == 0:   # --resume continues a checkpoint; it never replaces a finished --out
        check_writable(out, overwrite)
    examples = Task(cfg.task, cfg.data, lm.tokenizer).calib_for(cfg.calib)
    meta = score_metadata(lm, cfg, model_fingerprint(lm.model), len(examples), world)
    ckpt = out.parent / f".{out.name}.ckpt-rank{rank}.safetensors"
    state, start = (None, 0)
    if resume and ckpt.exists():
        state, start = _resume_state(ckpt, meta, next(lm.model.parameters()).device)
    every, last = cfg.checkpoint_every, [start]

    def on_batch(st, done):
        if every and done // every > last[0] // every:
            save_stats(ckpt, st, {**meta, "done": done})
            last[0] = done

    t0 = time.perf_counter()
    res = stages.collect_gradients(lm.model, lm.tokenizer, examples[rank::world], cfg.calib,
                                   stages.needed_stats(cfg.method), state=state, start=start,
                                   progress=progress and rank == 0, on_batch=on_batch, model_path=lm.source)
    st = res["stats"]
    truncated = _reduce(dist, st, res["truncated"]) if dist else res["truncated"]
    if rank == 0:
        scores = stream_examples(lm.model, lm.tokenizer, examples, cfg, st, device=device, progress=progress)
        meta.update(n_samples=st.n_samples, n_tokens=st.n_tokens, n_skipped=st.n_skipped, truncated=truncated,
                    seconds=time.perf_counter() - t0, tokens_per_s=res["tokens_per_s"] * world)
        if truncated:
            print(f"[circuitq] warning: {truncated} examples were longer than --seq-len {cfg.calib.seq_len} "
                  "and were truncated")
        write_scores_dir(out, scores, st, meta, overwrite=overwrite)   # scores arrive one module at a time
        if ckpt.exists():
            ckpt.unlink()
    if dist:
        dist.barrier()
        for r in range(world):
            p = out.parent / f".{out.name}.ckpt-rank{r}.safetensors"
            if rank == 0 and p.exists():
                p.unlink()
    return out


def run_ig(lm, cfg: ScoreConfig, out: Path, overwrite: bool = False, progress: bool = True, device=None) -> Path:
    """``circuitq score --method ig``: integrated gradients between ``W`` and ``Q(W)`` (the final
    quantizer's, GPTQ made on the task's calibration items) as a scores directory, signed, with
    their completeness in ``score.json`` (``saliency.attribution``; ``--ig-steps`` gradient passes)."""
    if _dist() is not None:
        raise UsageError("--method ig runs in one process; start it without torchrun")
    check_writable(out, overwrite)
    examples = Task(cfg.task, cfg.data, lm.tokenizer).calib_for(cfg.calib)
    meta = score_metadata(lm, cfg, model_fingerprint(lm.model), len(examples), 1)
    qcfg = cfg.quantize
    windows = stages.calibration_tokens(examples, lm.tokenizer, cfg.calib) if qcfg.method == "gptq" else None
    t0 = time.perf_counter()
    qw = stages.quantized_weights(lm.model, qcfg, windows, device=device, progress=progress).weights
    print(f"[circuitq] integrated gradients over {cfg.ig_steps} points of the path W -> Q(W) "
          f"({cfg.ig_steps} gradient passes over {len(examples)} items)")
    attr, comp = integrated_gradients(lm.model, lm.tokenizer, examples, qw, cfg.calib, steps=cfg.ig_steps,
                                      model_path=lm.source, progress=progress)
    del qw
    meta.update(ig_steps=cfg.ig_steps, quadrature="gauss-legendre", signed=True,
                completeness={"attributed": comp.attributed, "measured": comp.measured, "gap": comp.gap,
                              **stages.ig_path_report(comp, cfg.ig_steps)},
                seconds=time.perf_counter() - t0, n_samples=len(examples))
    print(f"[circuitq] completeness: attributions sum to {comp.attributed:.4f}, L(Q(W)) - L(W) = "
          f"{comp.measured:.4f} (gap {comp.gap:.1%})")
    if meta["completeness"].get("path_diagnosis"):
        print(f"[circuitq] ig path: {describe_path(meta['completeness']['path_diagnosis'], comp.gap)}")
    write_scores_dir(out, attr, None, meta, overwrite=overwrite)
    return out


def stream_examples(model, tokenizer, examples, cfg: ScoreConfig, stats, *, device=None, progress: bool = False):
    """``(name, [out, in] scores)`` one module at a time: ``score_examples`` without holding
    ``Q(W)`` or the scores (``stages.stream_scores``)."""
    m = saliency_method(cfg.method)
    qw = None
    if m.quantizer:
        qcfg = stages.qw_config(cfg.method, cfg.quantize)
        windows = stages.calibration_tokens(examples, tokenizer, cfg.calib) if qcfg.method == "gptq" else None
        qw = stages.qw_stream(model, qcfg, windows, hessians=None, need_hinv=m.hessian, device=device,
                              progress=progress)
    for name, sc in stages.stream_scores([cfg.method], model, stats, qw, cfg.calib.seed):
        yield name, sc[cfg.method]


def score_examples(model, tokenizer, examples, cfg: ScoreConfig, stats, *, device=None, progress: bool = False):
    """Q(W) (when the method needs it) and the scores, from already collected ``stats``: the
    ``{name: [out, in]}`` dict of ``stream_examples``."""
    return dict(stream_examples(model, tokenizer, examples, cfg, stats, device=device, progress=progress))
