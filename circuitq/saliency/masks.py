"""Masks of weights kept in 16-bit: ``{HF parameter name: bool tensor of the weight's shape}``.

Files: safetensors (the circuitq format; metadata in ``__metadata__``; a sparse mask is stored as
the sorted flat ``int32`` indices of its true entries with ``encoding: indices`` and the shapes in
the metadata, a dense one as ``bool`` tensors), or the official TaCQ
repository's torch-saved dict of bool tensors, read with ``torch.load(weights_only=True)`` (never
unpickled). TaCQ keys may name modules (``...q_proj``) instead of parameters; ``.weight`` is added.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from circuitq.artifacts import atomic_file

MASK_FORMAT = "circuitq.mask"


class MaskError(ValueError):
    pass


class MaskFile(NamedTuple):
    masks: dict[str, torch.Tensor]
    metadata: dict[str, str]


def _normalize(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    name = name.replace("._original_component", "")
    return name if name.endswith(".weight") else name + ".weight"


def mask_metadata(masks: dict[str, torch.Tensor], **facts) -> dict:
    """The one description a mask file carries: ``model``, ``model_source``, ``task``, ``method``,
    ``bits``, ``group_size``, ``requested_fraction``, ``samples``, ``seq_len``, ``seed`` (and any
    other facts given), plus the measured ``fraction`` and the circuitq version. Missing facts are
    recorded as None, so every mask has the same keys."""
    from circuitq import __version__

    keys = ("model", "model_source", "task", "method", "bits", "group_size", "requested_fraction", "samples",
            "seq_len", "seed")
    return {**{k: facts.pop(k, None) for k in keys}, **facts, "fraction": mask_fraction(masks),
            "circuitq_version": __version__}


def save_masks(path: str | Path, masks: dict[str, torch.Tensor], metadata: dict, overwrite: bool = False,
               encoding: str = "auto") -> None:
    """Write masks as safetensors with ``metadata`` (values stringified). ``encoding``: ``dense``
    (bool tensors), ``indices`` (flat int32 indices of the true entries), or ``auto`` (indices
    when under 20% of the entries are true: 4 bytes per kept weight instead of 1 per weight)."""
    if encoding not in ("auto", "dense", "indices"):
        raise MaskError(f"mask encoding must be auto, dense or indices, got {encoding!r}")
    if encoding == "auto":
        encoding = "indices" if mask_fraction(masks) < 0.2 else "dense"
    meta = {"format": MASK_FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    if encoding == "indices":
        meta.update(encoding="indices", shapes=json.dumps({k: list(v.shape) for k, v in masks.items()}))
        tensors = {k: v.flatten().nonzero().flatten().to(torch.int32).contiguous().cpu() for k, v in masks.items()}
    else:
        tensors = {k: v.to(torch.bool).contiguous().cpu() for k, v in masks.items()}
    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_masks(path: str | Path) -> MaskFile:
    """Read a circuitq safetensors mask or a TaCQ torch-saved dict; names normalised."""
    p = Path(path)
    if not p.exists():
        raise MaskError(f"mask file not found: {p}")
    with p.open("rb") as fh:
        head = fh.read(9)
    meta: dict[str, str] = {}
    safetensors_like = len(head) == 9 and head[8:9] == b"{"   # u64 header length, then the JSON header
    if not safetensors_like and (head[:2] == b"PK" or head[:1] == b"\x80"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any load failure becomes one clear error
            # torch's own message suggests weights_only=False, which would run the file's code: never quoted
            raise MaskError(f"{p} is not a plain torch-saved dict of tensors ({e.__class__.__name__}); it may hold "
                            "code, and circuitq never unpickles such files: save the mask as a dict of bool tensors "
                            "or as safetensors (circuitq mask)") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise MaskError(f"{p} does not hold a dict of tensors (got {type(obj).__name__})")
        raw = obj
        meta = {"format": "tacq-torch"}
    else:
        try:
            with safe_open(str(p), framework="pt") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}
                meta = dict(f.metadata() or {})
        except Exception as e:  # noqa: BLE001
            raise MaskError(f"{p} is neither safetensors nor a torch-saved mask ({e})") from None
        if meta.get("encoding") == "indices":
            raw = _decode_indices(p, raw, meta)
    masks = {}
    for k, v in raw.items():
        if v.dtype != torch.bool:
            if not ((v == 0) | (v == 1)).all():
                raise MaskError(f"mask entry {k} has dtype {v.dtype} with values other than 0/1")
            v = v.bool()
        masks[_normalize(k)] = v
    return MaskFile(masks, meta)


def _decode_indices(p: Path, raw: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    try:
        shapes = json.loads(meta["shapes"])
    except (KeyError, ValueError):
        raise MaskError(f"{p} says encoding=indices but has no readable 'shapes' metadata") from None
    out = {}
    for k, idx in raw.items():
        if k not in shapes:
            raise MaskError(f"{p}: no shape recorded for {k}")
        shape = shapes[k]
        if not (isinstance(shape, list) and 1 <= len(shape) <= 4
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 2 ** 20 for d in shape)):
            raise MaskError(f"{p}: the recorded shape of {k} ({shape!r}) is not a list of 1-4 positive sizes "
                            "(each at most 2^20); the file is damaged: write it again with circuitq mask")
        n = 1
        for d in shape:
            n *= d
        if n > 2 ** 32:
            raise MaskError(f"{p}: the recorded shape of {k} ({shape}) has {n} entries, more than any weight "
                            "circuitq handles; the file is damaged: write it again with circuitq mask")
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise MaskError(f"{p}: indices of {k} fall outside its shape {shapes[k]}")
        m = torch.zeros(n, dtype=torch.bool)
        m[idx] = True
        out[k] = m.view(*shapes[k])
    return out


def validate_masks(masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], show: int = 5) -> list[str]:
    """Check names and shapes against the model's targeted weights.

    Raises ``MaskError`` listing the first mismatches (unknown names, wrong shapes). Returns the
    targeted names the mask does not mention (treated as all-false; the caller reports them).
    """
    unknown = [k for k in masks if k not in shapes]
    wrong = [f"{k}: mask {tuple(v.shape)} vs weight {tuple(shapes[k])}" for k, v in masks.items()
             if k in shapes and tuple(v.shape) != tuple(shapes[k])]
    if unknown or wrong:
        lines = []
        if unknown:
            lines.append(f"{len(unknown)} mask names are not targeted weights of this model, e.g. "
                         + ", ".join(unknown[:show]) + f" (expected names like {next(iter(shapes))})")
        if wrong:
            lines.append(f"{len(wrong)} shapes differ: " + "; ".join(wrong[:show]))
        raise MaskError("the mask does not match the model: " + " | ".join(lines))
    return [k for k in shapes if k not in masks]


def mask_fraction(masks: dict[str, torch.Tensor]) -> float:
    n = sum(v.numel() for v in masks.values())
    return sum(int(v.sum()) for v in masks.values()) / max(n, 1)


# ---------------------------------------------------------------------------------------------
# selection (pure): scores -> masks
# ---------------------------------------------------------------------------------------------
def select_topk(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Global top ``fraction`` of all weights by score (exactly ``floor(fraction · N)`` entries;
    ties broken by position). ``scores``: ``{name: [out, in]}`` -> bool masks of the same shapes."""
    if not 0 <= fraction <= 1:
        raise MaskError(f"fraction must be in [0, 1], got {fraction}")
    names = list(scores)
    flat = torch.cat([scores[n].detach().float().flatten().cpu() for n in names])
    k = int(fraction * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if k:
        chosen[torch.topk(flat, k, sorted=False).indices] = True
    out, off = {}, 0
    for n in names:
        m = scores[n].numel()
        out[n] = chosen[off:off + m].view(scores[n].shape)
        off += m
    return out


def select_per_layer(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """The same ``fraction`` inside every decoder layer (names ``...layers.{i}...``)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for n, s in scores.items():
        parts = n.split(".")
        key = ".".join(parts[: parts.index("layers") + 2]) if "layers" in parts else n
        groups.setdefault(key, {})[n] = s
    out = {}
    for g in groups.values():
        out.update(select_topk(g, fraction))
    return out


def fraction_for_bits(target_bits: float, bits: int, group_size: int, shapes: dict[str, tuple[int, int]]) -> float:
    """The 16-bit fraction whose exact bit accounting reaches ``target_bits`` on average.

    Each 16-bit weight replaces ``bits`` with 32 bits (value + index), so
    ``avg = base + f · (32 − bits)``.
    """
    from circuitq.quant.plan import PrecisionPlan, bit_report

    base = bit_report(shapes, PrecisionPlan(bits), group_size).average_bits
    f = (target_bits - base) / (32 - bits)
    if f < 0:
        raise MaskError(f"target {target_bits} bits is below the {base:.4f} bits that {bits}-bit "
                        f"quantization with group size {group_size} costs without any 16-bit weight")
    return min(f, 1.0)


def rank_normalize(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each score replaced by its global rank over all weights, scaled to ``[0, 1)`` (the
    smallest 0, the largest ``(N-1)/N``; ties by position): scores of different tasks become
    comparable whatever their units. ``{name: [out, in]}`` -> the same shapes, float32."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().float().flatten().cpu() for n in names])
    ranks = torch.empty_like(flat)
    ranks[torch.argsort(flat, stable=True)] = torch.arange(flat.numel(), dtype=torch.float32) / flat.numel()
    out, off = {}, 0
    for n in names:
        out[n] = ranks[off:off + scores[n].numel()].view(scores[n].shape)
        off += scores[n].numel()
    return out


def select_rank_max(scores: list[dict[str, torch.Tensor]], fraction: float) -> dict[str, torch.Tensor]:
    """A multi-task circuit at the *same* budget as a single-task one: the global top ``fraction``
    of the elementwise max of the tasks' rank-normalised scores (exactly ``floor(fraction · N)``
    weights, where a union of per-task masks would keep up to twice as many)."""
    ranked = [rank_normalize(s) for s in scores]
    names = set(ranked[0])
    if any(set(r) != names for r in ranked[1:]):
        raise MaskError("score sets to combine name different weights (different models?)")
    best = {n: torch.stack([r[n] for r in ranked]).amax(0) for n in ranked[0]}
    return select_topk(best, fraction)


def combine(masks: list[dict[str, torch.Tensor]], how: str) -> dict[str, torch.Tensor]:
    """Union (``"union"``) or intersection (``"intersection"``) of masks over the same names."""
    if how not in ("union", "intersection"):
        raise MaskError(f"combine how must be union or intersection, got {how}")
    names = set(masks[0])
    for m in masks[1:]:
        if set(m) != names:
            raise MaskError("masks to combine name different weights (different models?)")
    op = torch.logical_or if how == "union" else torch.logical_and
    out = {}
    for n in masks[0]:
        acc = masks[0][n]
        for m in masks[1:]:
            if m[n].shape != acc.shape:
                raise MaskError(f"{n}: shapes differ between masks")
            acc = op(acc, m[n])
        out[n] = acc
    return out
