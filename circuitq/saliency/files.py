"""Score and statistics files: self-describing safetensors artifacts (pure I/O, no model).

A scores directory holds ``scores.safetensors`` (``{HF weight name: [out, in] float32}``),
``stats.safetensors`` (the gradient accumulators, ``STAT/NAME`` keys) and ``score.json``; the
safetensors metadata repeats the settings that made them (model, task, method, bits, samples,
seq-len, seed, version), so a file read alone says what it is.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from circuitq.artifacts import atomic_dir
from circuitq.saliency.capture import GradStats
from circuitq.saliency.masks import MaskError
from circuitq.storage import LazyTensors, TensorWriter

SCORES_FORMAT = "circuitq.scores"


class ScoreFile(dict):
    """``{"scores": {name: tensor}, "meta": dict}``."""


def save_stats(path: Path, st: GradStats, meta: dict) -> None:
    """Write the statistics one tensor at a time (``storage.TensorWriter``; safetensors'
    ``save_file`` would first copy all of them, ``4 · P_lin`` bytes per statistic, into memory)."""
    m = {**{k: json.dumps(v) for k, v in meta.items()}, "n_samples": str(st.n_samples),
         "n_tokens": str(st.n_tokens), "n_skipped": str(st.n_skipped)}
    tmp = path.with_name(path.name + ".tmp")
    with TensorWriter(tmp) as w:
        for s, d in st.tensors.items():
            for n, t in d.items():
                w[f"{s}/{n}"] = t
        w.close(m)
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


def open_stats(path: Path, device=None) -> GradStats:
    """A stats file as a ``GradStats`` whose tensors are read from disk one at a time when
    indexed (``storage.LazyTensors``): memory is what the caller holds, not ``4 · P_lin`` per stat."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        stats = sorted({k.split("/", 1)[0] for k in f.keys()})
    t = {s: LazyTensors(path, prefix=s, device=device) for s in stats}
    return GradStats(t, int(meta["n_samples"]), int(meta["n_tokens"]), int(meta["n_skipped"]))


def write_scores_files(dest: Path, scores, stats: GradStats | None, meta: dict) -> None:
    """Write ``scores.safetensors`` (+ ``stats.safetensors``) and ``score.json`` into the existing
    directory ``dest`` (the caller makes it atomic). ``scores``: ``{name: [out, in]}`` or an
    iterable of ``(name, [out, in])`` pairs, written as they come."""
    smeta = {"format": SCORES_FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    with TensorWriter(dest / "scores.safetensors") as w:   # one matrix in memory at a time when streamed
        for n, s in (scores.items() if isinstance(scores, dict) else scores):
            w[n] = s.float()
        w.close(smeta)
    if stats is not None:
        save_stats(dest / "stats.safetensors", stats, meta)
    (dest / "score.json").write_text(json.dumps({"format": SCORES_FORMAT, **meta}, indent=2, default=str) + "\n")


def write_scores_dir(out: str | Path, scores, stats: GradStats | None, meta: dict,
                     overwrite: bool = False) -> Path:
    """Write a scores directory atomically (``write_scores_files`` into a temporary sibling)."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_scores_files(tmp, scores, stats, meta)
    return Path(out)


def load_scores(path: str | Path, lazy: bool = False) -> ScoreFile:
    """Read a scores directory (or its ``scores.safetensors``). ``lazy``: the scores are a
    ``storage.LazyTensors`` read one matrix at a time (memory: what the caller holds)."""
    p = Path(path)
    f = p / "scores.safetensors" if p.is_dir() else p
    if not f.exists():
        raise MaskError(f"no scores found at {p} (expected a directory written by `circuitq score`)")
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != SCORES_FORMAT:
                raise MaskError(f"{f} is not a circuitq scores file (format {meta.get('format')!r})")
            scores = LazyTensors(f) if lazy else {k: fh.get_tensor(k) for k in fh.keys()}
    except MaskError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MaskError(f"{f} cannot be read as safetensors ({e})") from None
    return ScoreFile(scores=scores, meta={k: json.loads(v) for k, v in meta.items() if k != "format"})
