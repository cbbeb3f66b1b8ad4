"""Masks of weights kept in 16-bit: ``{HF parameter name: bool tensor of the weight's shape}``.

Files: safetensors (the circuitq format; metadata in ``__metadata__``; a sparse mask is stored as
the sorted flat ``int32`` indices of its true entries with ``encoding: indices`` and the shapes in
the metadata, a dense one as ``bool`` tensors), or the official TaCQ
repository's torch-saved dict of bool tensors, read with ``torch.load(weights_only=True)`` (never
unpickled). TaCQ keys may name modules (``...q_proj``) instead of parameters; ``.weight`` is added.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from circuitq import __version__
from circuitq.artifacts import atomic_file
from circuitq.errors import CircuitqError
from circuitq.model.arch import parse_name
from circuitq.quant.plan import PrecisionPlan, bit_report
from circuitq.storage import LazyTensors

MASK_FORMAT = "circuitq.mask"


class MaskError(CircuitqError, ValueError):
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


class LazyMasks(Mapping):
    """A circuitq mask file as ``{name: [out, in] bool}``, each mask decoded from its stored
    indices when indexed (memory: one dense mask, not ``P_lin`` bytes). Only for files that
    ``load_masks`` has accepted (``open_masks`` checks)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self._raw = Path(path), LazyTensors(path)
        self._names = {_normalize(k): k for k in self._raw}
        self._meta = meta

    def __getitem__(self, name: str) -> torch.Tensor:
        k = self._names[name]
        return _decode_indices(self.path, {k: self._raw[k]}, self._meta)[k]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def open_masks(path: str | Path) -> Mapping:
    """``load_masks(path).masks``, but an indices-encoded circuitq mask is decoded one matrix at a
    time (``LazyMasks``); other files are loaded whole."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - not safetensors: load_masks says what it is
        meta = {}
    if meta.get("format") == MASK_FORMAT and meta.get("encoding") == "indices":
        if "shapes" not in meta:
            raise MaskError(f"{path} says encoding=indices but has no readable 'shapes' metadata")
        return LazyMasks(Path(path), meta)
    return load_masks(path).masks


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
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool or idx.dim() != 1:
            raise MaskError(f"{p}: indices of {k} are stored as {str(idx.dtype).replace('torch.', '')} "
                            f"{list(idx.shape)}; they must be one integer list (int32 or int64): write the file "
                            "again with circuitq mask")
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
    wrong = [f"{k}: mask {tuple(v.shape)} vs weight {tuple(shapes[k])}"
             + (" (the transpose: circuitq's masks are [out, in], also for GPT-2's Conv1D weights stored [in, out];"
                " transpose it)" if tuple(v.shape)[::-1] == tuple(shapes[k]) else "")
             for k, v in masks.items() if k in shapes and tuple(v.shape) != tuple(shapes[k])]
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
    """The same ``fraction`` inside every decoder layer (``model.arch.parse_name`` gives the layer;
    a name it cannot place is a group of its own)."""
    groups: dict[object, dict[str, torch.Tensor]] = {}
    for n, s in scores.items():
        p = parse_name(n)
        groups.setdefault(p[0] if p else n, {})[n] = s
    out = {}
    for g in groups.values():
        out.update(select_topk(g, fraction))
    return out


def fraction_for_bits(target_bits: float, bits: int, group_size: int, shapes: dict[str, tuple[int, int]]) -> float:
    """The 16-bit fraction whose exact bit accounting reaches ``target_bits`` on average.

    Each 16-bit weight replaces ``bits`` with 32 bits (value + index), so
    ``avg = base + f · (32 − bits)``.
    """
    base = bit_report(shapes, PrecisionPlan(bits), group_size).average_bits
    if not base <= target_bits <= 16:   # also refuses NaN
        raise MaskError(f"--target-bits must be between {base:.4f} (what {bits}-bit quantization with group size "
                        f"{group_size} costs without any 16-bit weight) and 16 (the unquantized model), got "
                        f"{target_bits}")
    return (target_bits - base) / (32 - bits)


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


class TopK:
    """The global top ``k`` of scores that arrive one weight matrix at a time (``add(name, [out,
    in])``), holding only ``k`` candidates: the top ``k`` of a union is the top ``k`` of the parts'
    top ``k``s, so ``masks()`` equals ``select_topk`` over all scores at once (ties at the k-th
    value aside, which ``torch.topk`` leaves unspecified in both). ``shapes`` fixes the names, their
    order (flat positions) and ``k = floor(fraction · N)``. Memory: ``12 · k`` bytes plus one
    matrix; ``rank=True`` keeps ``(value, position)`` pairs sorted for ``ranks()``."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], fraction: float):
        if not 0 <= fraction <= 1:
            raise MaskError(f"fraction must be in [0, 1], got {fraction}")
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.offsets, off = {}, 0
        for n, s in self.shapes.items():
            self.offsets[n] = off
            off += _numel(s)
        self.total = off
        self.k = int(fraction * off)
        self.values = torch.empty(0)
        self.ids = torch.empty(0, dtype=torch.long)
        self.seen: set[str] = set()

    def add(self, name: str, scores: torch.Tensor) -> None:
        if name not in self.shapes or tuple(scores.shape) != self.shapes[name]:
            raise MaskError(f"scores of {name} {tuple(scores.shape)} do not match the expected weights")
        if name in self.seen:
            raise MaskError(f"scores of {name} given twice")
        self.seen.add(name)
        if not self.k:
            return
        flat = scores.detach().float().flatten().cpu()
        v, i = _top(flat, torch.arange(flat.numel()) + self.offsets[name], self.k)
        self.values, self.ids = _top(torch.cat([self.values, v]), torch.cat([self.ids, i]), self.k)

    def _check(self) -> None:
        missing = [n for n in self.shapes if n not in self.seen]
        if missing:
            raise MaskError(f"no scores were given for {len(missing)} weights, e.g. {missing[0]}")

    def masks(self) -> dict[str, torch.Tensor]:
        """Bool masks ``{name: shape}`` with exactly ``k`` true entries."""
        self._check()
        return _masks_from_ids(self.shapes, self.offsets, self.ids)

    def ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, ranks)`` of the kept entries: each one's rank among *all* ``N`` scores as
        ``rank_normalize`` gives it (ascending, ties by position, scaled by ``1/N``)."""
        self._check()
        by_pos = torch.argsort(self.ids, descending=True, stable=True)
        order = by_pos[torch.argsort(self.values[by_pos], descending=True, stable=True)]
        ranks = (self.total - 1 - torch.arange(self.ids.numel(), dtype=torch.float64)) / self.total
        return self.ids[order], ranks.float()


def _top(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``values`` (and their ``ids``), ties at the k-th value going to the
    larger id: the entries ``rank_normalize`` ranks highest, exactly."""
    if values.numel() <= k:
        return values, ids
    kth = torch.topk(values, k, sorted=False).values.min()
    above = values > kth
    tie = (values == kth).nonzero().flatten()
    need = k - int(above.sum())
    tie = tie[torch.topk(ids[tie], need, sorted=False).indices]
    keep = torch.cat([above.nonzero().flatten(), tie])
    return values[keep], ids[keep]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _masks_from_ids(shapes: dict, offsets: dict, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    ids = torch.sort(ids).values
    out = {}
    for n, shape in shapes.items():
        lo, hi = offsets[n], offsets[n] + _numel(shape)
        a, b = int(torch.searchsorted(ids, lo)), int(torch.searchsorted(ids, hi))
        m = torch.zeros(_numel(shape), dtype=torch.bool)
        m[ids[a:b] - lo] = True
        out[n] = m.view(shape)
    return out


def select_topk_stream(items, shapes: dict[str, tuple[int, ...]], fraction: float) -> dict[str, torch.Tensor]:
    """``select_topk`` over ``(name, scores)`` pairs that arrive one at a time (``TopK``)."""
    sel = TopK(shapes, fraction)
    for name, sc in items:
        sel.add(name, sc)
    return sel.masks()


def select_rank_max_stream(sources: list, fraction: float) -> dict[str, torch.Tensor]:
    """``select_rank_max`` without ranking all weights: ``sources`` are ``{name: [out, in]}``
    mappings read one matrix at a time (``storage.LazyTensors`` over score files). A weight's best
    rank over the tasks reaches the top ``k`` only if it is in some task's top ``k`` (every other
    weight ranks below all of those), so each task's top ``k`` with exact ranks is enough.
    Memory: ``O(T · k)`` plus one matrix."""
    shapes = {n: tuple(sources[0][n].shape) if not hasattr(sources[0], "shape") else sources[0].shape(n)
              for n in sources[0]}
    if any(set(s) != set(shapes) for s in sources[1:]):
        raise MaskError("score sets to combine name different weights (different models?)")
    best: dict[int, float] = {}
    ids_all, ranks_all = [], []
    for src in sources:
        sel = TopK(shapes, fraction)
        for n in shapes:
            sel.add(n, src[n])
        ids, ranks = sel.ranks()
        ids_all.append(ids)
        ranks_all.append(ranks)
    del best
    ids, ranks = torch.cat(ids_all), torch.cat(ranks_all)
    uniq, inv = torch.unique(ids, return_inverse=True)
    top = torch.full((uniq.numel(),), -1.0).scatter_reduce(0, inv, ranks, reduce="amax")
    k = int(fraction * sum(_numel(s) for s in shapes.values()))
    chosen = uniq[torch.topk(top, k, sorted=False).indices] if k else uniq[:0]
    sel = TopK(shapes, fraction)
    return _masks_from_ids(sel.shapes, sel.offsets, chosen)


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
