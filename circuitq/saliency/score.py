"""Scoring driver: task examples -> per-sample gradient statistics -> saliency scores, written
as a self-describing directory. Shards over ``torchrun`` processes and resumes from checkpoints.

A scores directory holds ``scores.safetensors`` (``{HF weight name: [out, in] float32}``),
``stats.safetensors`` (the accumulators) and ``score.json``; the safetensors metadata repeats the
run's settings (model, task, method, bits, samples, seq-len, seed, version).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from circuitq import __version__
from circuitq.artifacts import atomic_dir, check_writable
from circuitq.saliency.capture import DEFAULT_BATCH_TOKENS, STATS, GradStats, collect_stats
from circuitq.saliency.methods import SaliencyInputs, compute_scores, method as saliency_method

SCORES_FORMAT = "circuitq.scores"


@dataclass(frozen=True)
class ScoreConfig:
    task: str = "mmlu"
    method: str = "tacq"
    bits: int = 3
    group_size: int = -1
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    shots: int = 0
    checkpoint_every: int = 0   # samples between checkpoints (0 = none)
    batch_tokens: int = DEFAULT_BATCH_TOKENS   # padded tokens per forward/backward (0 = only --batch-size)
    attention: str = "sdpa"     # "sdpa": HF fused attention inside the bridge; "bridge": TransformerLens's own


class ScoreFile(dict):
    """``{"scores": {name: tensor}, "meta": dict}``."""


def _dist():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist
    return None


def _save_stats(path: Path, st: GradStats, meta: dict) -> None:
    tensors = {f"{s}/{n}": t.detach().cpu().contiguous() for s, d in st.tensors.items() for n, t in d.items()}
    m = {**{k: json.dumps(v) for k, v in meta.items()}, "n_samples": str(st.n_samples),
         "n_tokens": str(st.n_tokens), "n_skipped": str(st.n_skipped)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=m)
    os.replace(tmp, path)


def load_stats(path: Path, device="cpu") -> tuple[GradStats, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        t: dict[str, dict[str, torch.Tensor]] = {}
        for k in f.keys():
            s, n = k.split("/", 1)
            t.setdefault(s, {})[n] = f.get_tensor(k).to(device)
    st = GradStats(t, int(meta.pop("n_samples")), int(meta.pop("n_tokens")), int(meta.pop("n_skipped")))
    return st, {k: json.loads(v) for k, v in meta.items()}


def _quantized_weights(model, tokenizer, examples, cfg: ScoreConfig, quantizer: str, hessian: bool):
    """``Q(W)`` of every targeted weight (mask-free GPTQ on windows of the calibration examples,
    or RTN), plus the inverse-Hessian diagonals when asked."""
    from circuitq.data.calib import consecutive_windows, token_stream
    from circuitq.quant.plan import PrecisionPlan
    from circuitq.quant.driver import QuantizeConfig, quantize_model

    twin = copy.deepcopy(model)
    calib = None
    if quantizer == "gptq":
        stream = token_stream([e.prompt + e.completion for e in examples], tokenizer)
        seq = min(cfg.seq_len, max(stream.numel() // 2, 8))
        calib = consecutive_windows(stream, seq, cfg.samples)
    res = quantize_model(twin, calib, PrecisionPlan(cfg.bits), QuantizeConfig(bits=cfg.bits, group_size=cfg.group_size,
                         method=quantizer, batch_size=cfg.batch_size), progress=False, keep_hinv=hessian)
    q = {n + ".weight": twin.get_submodule(n).weight.detach() for n in res.qweights}
    return q, res.hinv_diag


def run_score(lm, cfg: ScoreConfig, out: str | Path, data_dir=None, resume: bool = False,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Score ``lm`` (a ``LoadedModel``) on ``cfg.task`` and write the scores directory ``out``."""
    from circuitq.quant.driver import target_shapes
    from circuitq.data.tasks import load_examples

    out = Path(out)
    m = saliency_method(cfg.method)
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    if rank == 0 and not resume:
        check_writable(out, overwrite)
    examples = load_examples(cfg.task, "calib", cfg.samples, cfg.seed, cfg.shots, data_dir, lm.tokenizer)
    mine = examples[rank::world]
    from circuitq.circuits.maps import Geometry

    meta = {"model": lm.name, "model_source": lm.source, "model_note": lm.note, **asdict(cfg),
            "geometry": Geometry.from_config(lm.model.config).to_dict(),
            "n_examples": len(examples), "world_size": world, "circuitq_version": __version__,
            "sample_order": "longest-first"}
    ckpt = out.parent / f".{out.name}.ckpt-rank{rank}.safetensors"
    state, start = None, 0
    if resume and ckpt.exists():
        state, cmeta = load_stats(ckpt, next(lm.model.parameters()).device)
        same = ("task", "seed", "samples", "seq_len", "shots", "world_size", "sample_order")
        if {k: cmeta.get(k) for k in same} != {k: meta[k] for k in same}:
            raise ValueError(f"checkpoint {ckpt} was made with other settings; drop --resume or delete it")
        start = cmeta["done"]
        print(f"[circuitq] resuming from {ckpt} after {start} samples")
    every = cfg.checkpoint_every

    last = [start]

    def on_batch(st, done):
        if every and done // every > last[0] // every:
            _save_stats(ckpt, st, {**meta, "done": done})
            last[0] = done

    t0 = time.perf_counter()
    needed = tuple(s for s in STATS if s in m.stats) or ("sum_abs",)  # only what the method reads
    res = collect_stats(lm.model, lm.tokenizer, mine, lm.source, cfg.batch_size, cfg.seq_len, needed,
                        state, start, progress=progress and rank == 0, on_batch=on_batch,
                        batch_tokens=cfg.batch_tokens, attention=cfg.attention)
    st = res["stats"]
    if dist:
        for d in st.tensors.values():
            for t in d.values():
                dist.all_reduce(t)
        counts = torch.tensor([st.n_samples, st.n_tokens, st.n_skipped, res["truncated"]], dtype=torch.float64)
        dist.all_reduce(counts)
        st.n_samples, st.n_tokens, st.n_skipped, truncated = (int(c) for c in counts.tolist())
    else:
        truncated = res["truncated"]
    if rank == 0:
        weights = {n: lm.model.get_parameter(n).detach() for n in target_shapes(lm.model)}
        q, hinv = (None, None)
        if m.quantizer:
            q, hinv = _quantized_weights(lm.model, lm.tokenizer, examples, cfg, m.quantizer, m.hessian)
        scores = compute_scores(cfg.method, SaliencyInputs(weights, q, st.tensors, hinv, cfg.seed))
        meta.update(n_samples=st.n_samples, n_tokens=st.n_tokens, n_skipped=st.n_skipped, truncated=truncated,
                    seconds=time.perf_counter() - t0, tokens_per_s=res["tokens_per_s"] * world)
        if truncated:
            print(f"[circuitq] warning: {truncated} examples were longer than --seq-len {cfg.seq_len} and were truncated")
        write_scores_dir(out, scores, st, meta, overwrite=overwrite or resume)
        if ckpt.exists():
            ckpt.unlink()
    if dist:
        dist.barrier()
        for r in range(world):
            p = out.parent / f".{out.name}.ckpt-rank{r}.safetensors"
            if rank == 0 and p.exists():
                p.unlink()
    return out


def write_scores_dir(out: str | Path, scores: dict[str, torch.Tensor], stats: GradStats | None, meta: dict,
                     overwrite: bool = False) -> Path:
    """Write a scores directory atomically: ``scores.safetensors`` (+ ``stats.safetensors``) and
    ``score.json``, the metadata repeated inside the safetensors files."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        smeta = {"format": SCORES_FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
        save_file({n: s.float().cpu().contiguous() for n, s in scores.items()}, str(tmp / "scores.safetensors"),
                  metadata=smeta)
        if stats is not None:
            _save_stats(tmp / "stats.safetensors", stats, meta)
        (tmp / "score.json").write_text(json.dumps({"format": SCORES_FORMAT, **meta}, indent=2, default=str) + "\n")
    return Path(out)


def load_scores(path: str | Path) -> ScoreFile:
    """Read a scores directory (or its ``scores.safetensors``)."""
    from circuitq.saliency.masks import MaskError

    p = Path(path)
    f = p / "scores.safetensors" if p.is_dir() else p
    if not f.exists():
        raise MaskError(f"no scores found at {p} (expected a directory written by `circuitq score`)")
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != SCORES_FORMAT:
                raise MaskError(f"{f} is not a circuitq scores file (format {meta.get('format')!r})")
            scores = {k: fh.get_tensor(k) for k in fh.keys()}
    except MaskError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MaskError(f"{f} cannot be read as safetensors ({e})") from None
    return ScoreFile(scores=scores, meta={k: json.loads(v) for k, v in meta.items() if k != "format"})
