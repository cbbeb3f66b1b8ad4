"""Circuit maps and cross-task comparison (pure: tensors in, tensors and dicts out).

Aggregation of per-weight values (scores, or masks as 0/1) for a Llama-like layer with ``H``
query heads, ``KV`` key/value heads and head size ``d``:

* per layer × module type: the sum over each weight matrix;
* per attention head: ``q_proj`` rows ``[h·d, (h+1)·d)`` and ``o_proj`` columns of the same range
  belong to query head ``h``; ``k_proj``/``v_proj`` rows of KV head ``g`` are shared by the query
  heads ``h`` with ``h // (H/KV) = g`` (GQA) and their mass is split equally among them, so the
  head map sums to the attention total;
* per MLP neuron ``j``: ``gate_proj`` and ``up_proj`` row ``j`` plus ``down_proj`` column ``j``.

Worked example (GQA, H = 4, KV = 2, d = 1): k row 0 with mass 2 adds 1 to heads 0 and 1.

Comparison of two masks: IoU ``|A∩B| / |A∪B|`` and intersection-over-minimum ``|A∩B| / min(|A|,
|B|)`` globally, per layer and per module type; shared top-N heads and neurons; Spearman rank
correlation of the head maps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from circuitq.errors import UsageError
from circuitq.model.arch import MODULE_TYPES, Geometry, arch_for, module_parts, parse_name  # noqa: F401 (re-exported)


@dataclass
class CircuitMap:
    """``layer_module``: ``[L, 7]`` (``MODULE_TYPES`` order); ``head``: ``[L, H]``;
    ``neuron``: ``[L, d_mlp]``; ``total``: sum over all weights."""

    layer_module: torch.Tensor
    head: torch.Tensor
    neuron: torch.Tensor
    total: float


class MapAccumulator:
    """Circuit maps built one weight matrix at a time (``add``), so a caller that streams scores or
    attributions never holds more than one module. ``result()`` is the ``CircuitMap``. Memory: the
    maps, ``8 · L · (7 + H + d_mlp)`` bytes."""

    def __init__(self, geo: Geometry):
        self.geo, self.spec = geo, arch_for(geo.model_type)   # its rows/cols say which axis is a head or a neuron
        L = geo.n_layers
        self.lm = torch.zeros(L, len(MODULE_TYPES), dtype=torch.float64)
        self.head = torch.zeros(L, geo.n_heads, dtype=torch.float64)
        self.neuron = torch.zeros(L, geo.d_mlp, dtype=torch.float64)

    def add(self, name: str, v: torch.Tensor) -> None:
        H, KV, d = self.geo.n_heads, self.geo.n_kv_heads, self.geo.head_dim
        parts = module_parts(name, self.geo, self.spec)   # one module, or a fused module's segments
        if not parts:
            raise UsageError(f"cannot place '{name}' in a circuit map (expected model.layers.N.(self_attn|mlp).X.weight)")
        v = v.detach().double().cpu()
        for i, kind, rows, cols, sl in parts:
            w = v[sl]
            self.lm[i, MODULE_TYPES.index(kind)] += w.sum()
            if rows == "q_heads":
                self.head[i] += w.reshape(H, d, -1).sum((1, 2))
            elif cols == "q_heads":
                self.head[i] += w.reshape(-1, H, d).sum((0, 2))
            elif rows == "kv_heads":
                self.head[i] += w.reshape(KV, d, -1).sum((1, 2)).repeat_interleave(H // KV) / (H // KV)
            elif rows == "neurons":
                self.neuron[i] += w.sum(1)
            elif cols == "neurons":
                self.neuron[i] += w.sum(0)

    def result(self) -> CircuitMap:
        return CircuitMap(self.lm.clone(), self.head.clone(), self.neuron.clone(), float(self.lm.sum()))


def signed(m: CircuitMap) -> bool:
    """Whether a circuit map holds a signed attribution (some unit below zero) rather than a
    non-negative selection score."""
    return bool((m.head < 0).any() or (m.neuron < 0).any() or (m.layer_module < 0).any())


def aggregate(values: dict[str, torch.Tensor], geo: Geometry) -> CircuitMap:
    """Sum per-weight ``values`` (``{HF weight name: [out, in]}``) into the circuit maps."""
    acc = MapAccumulator(geo)
    for name, v in values.items():
        acc.add(name, v)
    return acc.result()


MAP_FORMAT = "circuitq.circuit-map"


def write_map(path: Path, cmap: CircuitMap, meta: dict) -> None:
    """A circuit map as safetensors (``layer_module``, ``head``, ``neuron`` float64) with ``meta``
    (what the values are: estimator, bits, task, sign convention) as JSON in its metadata."""
    save_file({"layer_module": cmap.layer_module.contiguous(), "head": cmap.head.contiguous(),
               "neuron": cmap.neuron.contiguous()}, str(path),
              metadata={"format": MAP_FORMAT, "meta": json.dumps(meta, default=str)})


def read_map(path: Path) -> tuple[CircuitMap, dict]:
    """``(CircuitMap, meta)`` of a file written by ``write_map``."""
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        if md.get("format") != MAP_FORMAT:
            raise UsageError(f"{path} is not a circuit map ({MAP_FORMAT})")
        t = {k: f.get_tensor(k) for k in ("layer_module", "head", "neuron")}
    return CircuitMap(t["layer_module"], t["head"], t["neuron"], float(t["layer_module"].sum())), json.loads(md["meta"])


def overlap(a: torch.Tensor, b: torch.Tensor) -> dict:
    """IoU and intersection-over-minimum of two bool tensors (any shape)."""
    inter = int((a & b).sum())
    union = int((a | b).sum())
    na, nb = int(a.sum()), int(b.sum())
    return {"intersection": inter, "union": union, "a": na, "b": nb,
            "iou": inter / union if union else float("nan"),
            "iom": inter / min(na, nb) if min(na, nb) else float("nan")}


def compare_masks(ma: dict[str, torch.Tensor], mb: dict[str, torch.Tensor], geometry: Geometry | None = None) -> dict:
    """Overlap globally, per layer and per module type (a fused module's segments apart when
    ``geometry`` is given). Masks must name the same weights."""
    if set(ma) != set(mb):
        raise UsageError("the two circuits cover different weights (different models?)")
    for n in ma:
        if ma[n].shape != mb[n].shape:
            raise UsageError(f"{n}: shapes differ between the circuits (different models?)")
    per_layer: dict[int, list] = {}
    per_type: dict[str, list] = {}
    counts = {}   # one matrix (or a fused matrix's block of rows) at a time, never the concatenation of every mask
    for n in ma:
        parts = module_parts(n, geometry) if geometry is not None else []
        parts = parts or [(*parse_name(n), None, None, slice(None))]
        for i, mod, _, _, sl in parts:
            key = (n, mod)
            a, b = ma[n][sl], mb[n][sl]
            counts[key] = (int((a & b).sum()), int((a | b).sum()), int(a.sum()), int(b.sum()))
            per_layer.setdefault(i, []).append(key)
            per_type.setdefault(mod, []).append(key)

    def ov(keys):
        inter, union, na, nb = (sum(counts[k][j] for k in keys) for j in range(4))
        return {"intersection": inter, "union": union, "a": na, "b": nb,
                "iou": inter / union if union else float("nan"),
                "iom": inter / min(na, nb) if min(na, nb) else float("nan")}

    return {"global": ov(list(counts)), "per_layer": {i: ov(v) for i, v in sorted(per_layer.items())},
            "per_module_type": {m: ov(per_type[m]) for m in MODULE_TYPES if m in per_type}}


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (average ranks for ties)."""
    def ranks(v):
        v = v.flatten().double()
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(v.numel(), dtype=torch.float64)
        # average ranks over ties
        uniq, inv = torch.unique(v, return_inverse=True)
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, r)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        return (sums / counts)[inv]

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.norm() * ry.norm())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def top_units(m: torch.Tensor, n: int) -> list[tuple[int, int, float]]:
    """The ``n`` largest entries of a ``[L, U]`` map as ``(layer, unit, value)``."""
    flat = m.flatten()
    k = min(n, flat.numel())
    vals, idx = torch.topk(flat, k)
    return [(int(i) // m.shape[1], int(i) % m.shape[1], float(v)) for v, i in zip(vals, idx)]


def compare_circuits(ca: CircuitMap, cb: CircuitMap, top_n: int = 20) -> dict:
    """Shared top-N heads and neurons and the rank correlation of the head maps."""
    ha, hb = {(l, u) for l, u, _ in top_units(ca.head, top_n)}, {(l, u) for l, u, _ in top_units(cb.head, top_n)}
    na, nb = ({(l, u) for l, u, _ in top_units(c.neuron, top_n)} for c in (ca, cb))
    return {"top_n": top_n, "shared_heads": sorted(ha & hb), "shared_neurons": sorted(na & nb),
            "n_shared_heads": len(ha & hb), "n_shared_neurons": len(na & nb),
            "head_spearman": spearman(ca.head, cb.head), "neuron_spearman": spearman(ca.neuron, cb.neuron)}
