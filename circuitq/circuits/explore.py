"""Pure helpers behind the explorer: circuits at any budget from one ranking, mask density by
tile, the top weights of one matrix with the head or neuron each belongs to.

``TopIndex`` ranks the top ``max_fraction`` of all weights once (``[k]`` flat indices, best
first); the circuit at any smaller budget is then a prefix of it, so a budget slider costs a
slice, not a new top-k over every weight. Worked example: scores ``{a: [[3, 1]], b: [[2]]}``
rank as flat indices ``[0, 2, 1]``; the top 2/3 keep ``a[0, 0]`` and ``b[0, 0]``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from circuitq.config import DEFAULT_FRACTION
from circuitq.errors import UsageError
from circuitq.model.arch import MODULE_TYPES, Geometry, arch_for, module_parts, parse_name, row_in
from circuitq.quant.plan import PrecisionPlan, bit_report


@dataclass
class TopIndex:
    names: list[str]
    shapes: list[tuple[int, int]]
    offsets: torch.Tensor      # [len(names) + 1] int64: start of each weight in the flat order
    order: torch.Tensor        # [k] int64 flat indices, best first
    scores: torch.Tensor       # [k] float32 their scores
    total: int                 # number of weights ranked over
    model_type: str            # its architecture row (model.arch) says which modules are attention

    def count(self, fraction: float) -> int:
        k = int(fraction * self.total)
        if k > self.order.numel():
            raise UsageError(f"budget {fraction:.4%} exceeds the ranked {self.order.numel() / self.total:.4%}")
        return k


def top_index(scores: dict[str, torch.Tensor], model_type: str, max_fraction: float = 0.02) -> TopIndex:
    """Rank the top ``max_fraction`` of all weights of ``scores`` (``{name: [out, in]}``) of a model of
    ``model_type`` (its row in ``model.arch`` names the attention and MLP modules)."""
    names = list(scores)
    sizes = torch.tensor([0] + [scores[n].numel() for n in names], dtype=torch.int64)
    flat = torch.cat([scores[n].detach().float().flatten() for n in names])
    k = max(1, int(max_fraction * flat.numel()))
    vals, idx = torch.topk(flat, k, sorted=True)
    return TopIndex(names, [tuple(scores[n].shape) for n in names], torch.cumsum(sizes, 0), idx, vals, flat.numel(),
                    model_type)


def _split(ti: TopIndex, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner weight index, offset inside it) of the first ``k`` ranked entries."""
    idx = ti.order[:k]
    owner = torch.searchsorted(ti.offsets, idx, right=True) - 1
    return owner, idx - ti.offsets[owner]


def mask_at(ti: TopIndex, fraction: float) -> dict[str, torch.Tensor]:
    """Bool masks ``{name: [out, in]}`` of the top ``fraction`` (exactly ``floor(fraction · N)``)."""
    owner, local = _split(ti, ti.count(fraction))
    out = {}
    for i, (n, shape) in enumerate(zip(ti.names, ti.shapes)):
        m = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
        m[local[owner == i]] = True
        out[n] = m.view(shape)
    return out


def mask_for(ti: TopIndex, fraction: float, name: str) -> torch.Tensor:
    """The ``[out, in]`` bool mask of one weight at ``fraction`` (same entries as ``mask_at``)."""
    i = ti.names.index(name)
    owner, local = _split(ti, ti.count(fraction))
    shape = ti.shapes[i]
    m = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    m[local[owner == i]] = True
    return m.view(shape)


def layer_module_counts(ti: TopIndex, fraction: float, n_layers: int, geometry: Geometry | None = None) -> torch.Tensor:
    """``[L, 7]`` number of kept weights per layer and module type at ``fraction`` (a fused
    module's blocks of rows counted under their modules when ``geometry`` is given)."""
    owner, local = _split(ti, ti.count(fraction))
    out = torch.zeros(n_layers, len(MODULE_TYPES), dtype=torch.int64)
    for i, (n, shape) in enumerate(zip(ti.names, ti.shapes)):
        parts = module_parts(n, geometry) if geometry is not None else []
        if not parts:
            p = parse_name(n)
            parts = [(p[0], p[1], None, None, slice(None))] if p and p[1] in MODULE_TYPES else []
        rows = local[owner == i] // shape[1] if len(parts) > 1 else None
        for layer, mod, _, _, sl in parts:
            if rows is None:
                out[layer, MODULE_TYPES.index(mod)] += int((owner == i).sum())
            else:   # the kept weights whose row lies in this module's block (stacked or interleaved)
                out[layer, MODULE_TYPES.index(mod)] += int(torch.isin(rows, torch.arange(shape[0])[sl]).sum())
    return out


def budget_table(ti: TopIndex, fractions: list[float], bits: int, group_size: int, reference: float = DEFAULT_FRACTION) -> list[dict]:
    """Per budget: weights kept, exact average bits, share in attention, overlap with the
    circuit at ``reference`` (the paper's 0.35%): a nested prefix, so IoU = min/max of sizes."""
    shapes = dict(zip(ti.names, ti.shapes))
    spec = arch_for(ti.model_type)
    attn = torch.tensor([bool(p) and spec.linear(p[1]).attention for p in (parse_name(n, spec) for n in ti.names)])
    k_ref = min(ti.count(min(reference, ti.order.numel() / ti.total)), ti.order.numel())
    rows = []
    for f in fractions:
        k = ti.count(f)
        owner, _ = _split(ti, k)
        rep = bit_report(shapes, PrecisionPlan(bits), group_size, _nnz(ti, owner))
        rows.append({"fraction": f, "n_16bit": k, "average_bits": rep.average_bits,
                     "attention_share": float(attn[owner].float().mean()) if k else 0.0,
                     "iou_with_0.35%": (min(k, k_ref) / max(k, k_ref)) if max(k, k_ref) else float("nan")})
    return rows


def _nnz(ti: TopIndex, owner: torch.Tensor) -> dict[str, int]:
    counts = torch.bincount(owner, minlength=len(ti.names)).tolist()
    return {n: c for n, c in zip(ti.names, counts)}


def predicted_bits(shapes: dict[str, tuple[int, int]], bits: int, group_size: int, nnz: dict[str, int]) -> float:
    """Average bits per weight of a mask (exact accounting of ``plan.bit_report``)."""
    return bit_report(shapes, PrecisionPlan(bits), group_size, nnz).average_bits


def tile_density(mask: torch.Tensor, tile: int = 32) -> torch.Tensor:
    """Share of kept weights per ``tile × tile`` block: ``[ceil(out/t), ceil(in/t)]`` float32."""
    out_f, in_f = mask.shape
    ro, ri = -out_f % tile, -in_f % tile
    m = torch.nn.functional.pad(mask.float(), (0, ri, 0, ro))
    s = m.view(m.shape[0] // tile, tile, m.shape[1] // tile, tile).sum((1, 3))
    ones = torch.nn.functional.pad(torch.ones(out_f, in_f), (0, ri, 0, ro))
    n = ones.view(s.shape[0], tile, s.shape[1], tile).sum((1, 3))
    return s / n


def unit_of(name: str, row: int, col: int, geo: Geometry) -> str:
    """The attention head(s) or MLP neuron that weight ``[row, col]`` of ``name`` belongs to."""
    # which axis indexes heads or neurons, as the architecture row says (a fused module: the block holding the row)
    parts = [(*p, at) for p in module_parts(name, geo) if (at := row_in(p[4], row)) is not None]
    if not parts:
        return "-"
    layer, _, rows, cols, sl, local_row = parts[0]
    d, per_kv = geo.head_dim, geo.n_heads // geo.n_kv_heads
    axis, i = (rows, local_row) if rows else (cols, col)
    if axis == "q_heads":
        return f"L{layer}.H{i // d}"
    if axis == "kv_heads":
        g = i // d
        return f"L{layer}.KV{g} (H{g * per_kv}-H{(g + 1) * per_kv - 1})"
    if axis == "neurons":
        return f"L{layer}.N{i}"
    return "-"


def top_weights(name: str, scores: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor | None,
                geo: Geometry, n: int = 50) -> list[dict]:
    """The ``n`` highest-scoring entries of one ``[out, in]`` matrix with their value,
    quantization error ``w − Q(w)`` (when ``quantized`` is given) and head or neuron."""
    k = min(n, scores.numel())
    vals, idx = torch.topk(scores.flatten().float(), k)
    cols = scores.shape[1]
    rows = []
    for rank, (v, i) in enumerate(zip(vals.tolist(), idx.tolist()), 1):
        r, c = divmod(i, cols)
        w = float(weight[r, c])
        rows.append({"rank": rank, "row": r, "col": c, "score": v, "value": w,
                     "quant_error": (w - float(quantized[r, c])) if quantized is not None else None,
                     "unit": unit_of(name, r, c, geo)})
    return rows


def load_weight(model_dir: str | Path, name: str) -> torch.Tensor:
    """One tensor from a Hugging Face model directory's safetensors files (no model load), as
    circuitq lays it out: ``[out, in]`` (a GPT-2 Conv1D weight, stored ``[in, out]``, transposed)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    files = [d / json.loads(index.read_text())["weight_map"][name]] if index.exists() else sorted(d.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            if name in fh.keys():
                t = fh.get_tensor(name)
                return t.T.contiguous() if _stored_transposed(d, name) else t
    raise KeyError(f"{name} is not in the safetensors files of {d}")


def _stored_transposed(model_dir: Path, name: str) -> bool:
    """Whether the family of ``model_dir`` (its config.json) stores weight ``name`` transposed."""
    try:
        spec = arch_for(json.loads((model_dir / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return False
    hit = spec.parse(name)
    return bool(hit and hit[1].transposed)
