"""Faithfulness of a circuit: does the attribution predict what really happens when a part of
the model is quantized (or ablated), and does removing the circuit hurt more than removing a
random set of the same size?

Units (pure, ``units``): a query head (its rows of ``q_proj`` and columns of ``o_proj``), a KV
head (its rows of ``k_proj`` and ``v_proj``; GQA-aware: one KV head serves
``n_heads / n_kv_heads`` query heads), a block of MLP neurons (rows of ``gate_proj``/``up_proj``
and columns of ``down_proj``), one layer × module, one layer's attention or MLP block
(``sublayers``: every linear weight of it), or a whole decoder layer (``layers``). A unit is
``{HF weight name: [out, in] bool}``.

For each unit the *predicted* change is the sum of an estimator over its entries (the TaCQ
selection score, attribution patching ``Σ_s G_s · ΔW``, integrated gradients, any saliency method);
the *measured* change is the task loss (mean NLL of the completion tokens) with only that unit's
weights replaced (by ``Q(W)``, zero, or each row's mean), everything else at 16 bits. Reported:
the Spearman correlation of predicted and measured changes over the units (every unit of the kind,
or the top-k by score plus random ones), and circuit-vs-random contrasts: replacing only the circuit
vs only a random set of the same size, and everything but the circuit vs everything but a random set.

Faithfulness curves (``faithfulness_curves``), the standard test of a circuit: order the units by
an estimator; keep the top ``k`` in 16-bit and replace every other unit of the kind (``keep-top``),
or replace only the top ``k`` (``replace-top``); measure the task metric for ``k`` along a grid of
fractions. Recovery at ``k`` is ``(m_k − m_none) / (m_full − m_none)`` for ``keep-top`` (1 = the
16-bit model's metric with only the kept units; 0 = every unit replaced) and
``(m_full − m_k) / (m_full − m_none)`` for ``replace-top`` (the share of the whole effect that the
top ``k`` carry). The area is the trapezoid mean of recovery over the grid's fractions.

Cost: one evaluation pass of the task's items per unit measured, four for the contrasts, and
``2 · len(grid) · orderings`` for the curves (``evaluation_passes``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from circuitq.data.circuit_tasks import SIZED_TASKS
from circuitq.errors import UsageError
from circuitq.model.arch import Geometry, module_parts, parse_name
from circuitq.saliency.masks import select_topk_stream
from circuitq.storage import replaced  # noqa: F401  (re-exported: units are replaced with it)

UNIT_KINDS = ("heads", "kv-heads", "neurons", "modules", "sublayers", "layers")
ABLATIONS = ("quantize", "zero", "mean")


class Unit(NamedTuple):
    label: str                        # "L3.H5", "L3.KV1", "L3.N128-191", "L3.down_proj", "L3.attn", "L3"
    entries: dict                     # {HF weight name: [out, in] bool}


def units(shapes: dict[str, tuple[int, int]], geometry: Geometry, kind: str, block: int = 64,
          spec=None) -> list[Unit]:
    """Every unit of ``kind`` (``UNIT_KINDS``) of a model with these weight ``shapes``.
    Worked example: 2 query heads of dim 4 in one layer give units ``L0.H0`` (q rows 0-3, o
    columns 0-3) and ``L0.H1`` (q rows 4-7, o columns 4-7); ``sublayers`` gives ``L0.attn`` (every row of
    q, k, v, o: a module belongs to attention when one of its axes indexes heads) and ``L0.mlp`` (the
    rest), ``layers`` ``L0`` (both). Fused weights (``qkv_proj``, ``gate_up_proj``) are OR-ed by rows."""
    if kind not in UNIT_KINDS:
        raise UsageError(f"unknown unit kind '{kind}'; choose one of {', '.join(UNIT_KINDS)}")
    geo = geometry
    by_layer: dict[int, dict[str, tuple[str, slice]]] = {}   # layer -> module kind -> (weight, its rows there)
    attention: set[str] = set()                               # module kinds with an axis of heads
    for name in shapes:
        for layer, mod, rows_mean, cols_mean, rows in module_parts(name, geo, spec):
            by_layer.setdefault(layer, {})[mod] = (name, rows)
            if "heads" in f"{rows_mean}{cols_mean}":
                attention.add(mod)
    hd, out = geometry.head_dim, []

    def part(mod, rows=None, cols=None):
        name, sl = mod   # sl: the module's rows in the stored weight (a slice, or an index when interleaved)
        m = torch.zeros(shapes[name], dtype=torch.bool)
        if rows is not None:
            m[torch.arange(shapes[name][0])[sl][rows]] = True
        else:
            m[sl, cols] = True
        return m

    need = {"heads": ("q_proj", "o_proj"), "kv-heads": ("k_proj", "v_proj"),
            "neurons": ("up_proj", "down_proj")}.get(kind, ())   # gate_proj too where the MLP has one
    for layer in sorted(by_layer):
        mods = by_layer[layer]
        lacking = [m for m in need if m not in mods]
        if lacking:
            raise UsageError(f"--units {kind} needs {', '.join(need)} in every layer, but layer {layer} has no "
                             f"{', '.join(lacking)}; choose another --units ({', '.join(UNIT_KINDS)})")
        if kind in ("modules", "sublayers", "layers"):   # a fused module: one part per module it holds (its rows)
            groups: dict[str, list] = {}
            for t, (n, sl) in mods.items():
                m = torch.zeros(shapes[n], dtype=torch.bool)
                m[sl] = True
                g = {"modules": f".{t}", "layers": ""}.get(kind, ".attn" if t in attention else ".mlp")
                groups.setdefault(g, []).append((n, m))
            for g in sorted(groups, key=lambda g: (g == ".mlp", g)) if kind != "modules" else groups:
                out.append(Unit(f"L{layer}{g}", _merge(*groups[g])))
        elif kind == "heads":
            for h in range(geometry.n_heads):
                s = slice(h * hd, (h + 1) * hd)
                out.append(Unit(f"L{layer}.H{h}", _merge((mods["q_proj"][0], part(mods["q_proj"], rows=s)),
                                                         (mods["o_proj"][0], part(mods["o_proj"], cols=s)))))
        elif kind == "kv-heads":
            for h in range(geometry.n_kv_heads):
                s = slice(h * hd, (h + 1) * hd)
                out.append(Unit(f"L{layer}.KV{h}", _merge((mods["k_proj"][0], part(mods["k_proj"], rows=s)),
                                                          (mods["v_proj"][0], part(mods["v_proj"], rows=s)))))
        else:
            for b in range(0, geometry.d_mlp, block):
                s = slice(b, min(b + block, geometry.d_mlp))
                rows_in = [(mods[t][0], part(mods[t], rows=s)) for t in ("gate_proj", "up_proj") if t in mods]
                out.append(Unit(f"L{layer}.N{b}-{s.stop - 1}",
                                _merge(*rows_in, (mods["down_proj"][0], part(mods["down_proj"], cols=s)))))
    return out


def _merge(*pairs) -> dict:
    """``{weight: mask}`` of (weight, mask) pairs, OR-ing the masks of one fused weight."""
    out: dict = {}
    for n, m in pairs:
        out[n] = out[n] | m if n in out else m
    return out


class UnitEstimate(NamedTuple):
    """An estimator given per unit rather than per weight (``{label: predicted change}``), e.g.
    ``saliency.attribution.local_attribution``; ``per_item``: ``{label: [n_items]}`` each calibration
    item's term (summing to ``values``), for ``estimator_reliability``."""
    values: dict
    per_item: dict | None = None


def estimator_reliability(labels: list[str], per_item: dict) -> dict | None:
    """How reproducible an estimator is over its own calibration items: its unit values summed over
    the even and over the odd items (``per_item``: ``{label: [n_items]}``), compared by
    ``split_half_reliability``. None with fewer than 3 units or 2 items."""
    if len(labels) < 3 or any(len(per_item[x]) < 2 for x in labels):
        return None
    return split_half_reliability([float(per_item[x][0::2].sum()) for x in labels],
                                  [float(per_item[x][1::2].sum()) for x in labels], len(per_item[labels[0]]))


def split_half_reliability(even: list[float], odd: list[float], items: int) -> dict | None:
    """An estimator's reliability from its unit values over two halves of its ``items`` calibration
    items (``even``, ``odd``: one value per unit, in the same order): the Spearman correlation of
    the halves (split half), the Spearman–Brown reliability of the full set ``2r / (1 + r)``, the
    reliability projected for twice the items ``2·rel / (1 + rel)``, and ``√reliability`` — with
    the measurement's own reliability ``m``, ``√(rel · m)`` bounds the Spearman any rerun of this
    estimator on this many items can reach (the attenuation bound). A low value says more
    calibration items would help. None with fewer than 3 units or 2 items. Worked example: halves
    agreeing at r = 0.8 give reliability 0.889 and 0.941 for twice the items."""
    if len(even) < 3 or items < 2:
        return None
    r = spearman(even, odd)
    if r != r or r <= -1:
        return {"split_half_spearman": r, "reliability": float("nan"), "reliability_doubled": float("nan"),
                "ceiling": 0.0, "items": items}
    rel = 2 * r / (1 + r)
    return {"split_half_spearman": r, "reliability": rel,
            "reliability_doubled": 2 * rel / (1 + rel) if rel > -1 else float("nan"),
            "ceiling": math.sqrt(rel) if rel > 0 else 0.0, "items": items}


class SplitHalves(NamedTuple):
    """A weight-level estimator computed on each half of the calibration items: ``first``,
    ``second``: ``{unit label: predicted change}`` (for an additive estimator the two sum to the
    full estimate); ``items``: how many items the halves hold together."""
    first: dict
    second: dict
    items: int


def predict(unit: Unit, estimate) -> float:
    """A unit's predicted change: its entry in a ``UnitEstimate``, or the unit sum of weight-level
    values."""
    return float(estimate.values[unit.label]) if isinstance(estimate, UnitEstimate) else unit_sum(unit, estimate)


def unit_sum(unit: Unit, values: dict[str, torch.Tensor]) -> float:
    """Sum of ``values`` (``{name: [out, in]}``) over the unit's entries."""
    return float(sum(values[n].float()[m.to(values[n].device)].sum() for n, m in unit.entries.items()))


def unit_values(unit_list: list[Unit], values: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{label: unit_sum}`` of every unit: a weight-level estimator as a unit-level one."""
    return {u.label: unit_sum(u, values) for u in unit_list}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties). Worked example: ``[1, 2, 3]`` vs
    ``[10, 30, 20]`` gives 0.5."""
    def ranks(x):
        t = torch.tensor(x, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in t.unique():   # average ranks of ties
            idx = (t == v).nonzero().flatten()
            r[idx] = r[idx].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def layer_profile(rows: list[dict], estimator: str) -> dict[str, list[tuple[int, float, float]]]:
    """A report's ``sublayers`` or ``layers`` units by layer (pure): ``{"attn" | "mlp" | "layer": [(layer,
    measured loss change, predicted by estimator)]}``, each series in layer order; ``{}`` for other unit kinds
    (a head's or a neuron block's change is its own, not its layer's). Worked example: rows labelled ``L1.mlp``
    and ``L0.mlp`` give ``{"mlp": [(0, ...), (1, ...)]}``."""
    out: dict[str, list] = {}
    for r in rows:
        head, _, rest = r["label"].partition(".")
        if not head[1:].isdigit() or rest not in ("", "attn", "mlp"):
            return {}
        out.setdefault(rest or "layer", []).append((int(head[1:]), r["measured_loss"], r["predicted"].get(estimator)))
    return {k: sorted(v) for k, v in sorted(out.items())}


def replacement(weights: dict[str, torch.Tensor], ablation: str, quantized: dict | None = None) -> dict:
    """The values a unit's entries take: ``Q(W)``, zero, or each row's mean (``{name: [out, in]}``)."""
    if ablation not in ABLATIONS:
        raise UsageError(f"unknown ablation '{ablation}'; choose one of {', '.join(ABLATIONS)}")
    if ablation == "quantize":
        if quantized is None:
            raise UsageError("ablation 'quantize' needs Q(W)")
        return quantized
    if ablation == "zero":
        return {n: torch.zeros_like(w) for n, w in weights.items()}
    return {n: w.float().mean(1, keepdim=True).expand_as(w).to(w.dtype) for n, w in weights.items()}


def union(parts: list[dict]) -> dict:
    out: dict = {}
    for d in parts:
        for n, m in d.items():
            out[n] = out[n] | m if n in out else m.clone()
    return out


def complement(entries: dict, shapes: dict) -> dict:
    return {n: ~entries[n] if n in entries else torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}


def random_like(entries: dict, shapes: dict, seed: int) -> dict:
    """A seeded random set with as many entries per weight as ``entries``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in shapes.items():
        k = int(entries[n].sum()) if n in entries else 0
        m = torch.zeros(math.prod(s), dtype=torch.bool)
        if k:
            m[torch.randperm(m.numel(), generator=g)[:k]] = True
        out[n] = m.view(*s)
    return out


class LayerReplay:
    """Skip the decoder layers that a replacement cannot change, holding a few layers' outputs.

    Replacing weights of layer ``l`` leaves the outputs of layers ``< l`` as they were, so an
    evaluation of the changed model may take layer ``l − 1``'s output from an evaluation of the
    unchanged model (same items, same batches, same order) instead of computing layers ``0 … l − 1``.
    The replay keeps a *window* of at most ``span`` layers' outputs (every evaluation batch of each),
    not every layer's, and with ``plan(layers)`` only the layers that will be asked for (the layer
    below each unit's lowest): ``record()`` wraps the base evaluation and keeps the first window;
    ``ensure(first, evaluate)``, called on the unchanged model, moves the window so that it holds
    layer ``first − 1`` (one evaluation of the unchanged model that itself replays the layers below
    the old window's top and records the new window; its loss is checked against ``reference`` when
    set); ``replay(first)`` then makes layers ``< first`` return layer ``first − 1``'s recorded output
    (the layers below it return the same tensor, which the next replayed layer ignores), call by call,
    and restores them afterwards. An evaluation inside ``replay`` must call the model exactly as the
    recorded one did (the count of calls is checked). Units taken in ascending layer order move the
    window ``⌈|S| / span⌉ − 1`` times for ``S`` the planned layers.

    Memory: ``4 · (min(span, |S|) + 1) · T_eval · d`` bytes (float32) at most, against
    ``4 · L · T_eval · d`` for keeping every layer (before 0.8.6). Time: each move is one evaluation of
    the layers above the old window's top; the default ``span = ⌈√L⌉`` (6 of SmolLM2's 30 layers) holds
    a fifth of the outputs for 4 moves over all 270 heads (about 2 evaluation passes), 0–2 moves over
    a top-and-random sample of 20 heads. Saves about half the forward work over units spread evenly
    across layers."""

    def __init__(self, layers, span: int | None = None):
        self.layers = list(layers)
        n = len(self.layers)
        self.span = max(1, min(n, span if span is not None else math.ceil(math.sqrt(n))))
        self.needed: list[int] | None = None   # the layers whose outputs will be asked for (plan), None: any
        self.outputs: dict[int, list] = {}
        self.reference: float | None = None   # the unchanged model's loss, checked after each move
        self.moves = 0

    def plan(self, layers) -> None:
        """Keep only ``layers`` (and the one ``ensure`` is asked for): e.g. ``first_layer − 1`` of every
        unit about to be measured."""
        self.needed = sorted({int(x) for x in layers if 0 <= x < len(self.layers)})

    def _window(self, lo: int) -> list[int]:
        if self.needed is None:
            return list(range(lo, min(lo + self.span, len(self.layers))))
        return sorted({lo, *[x for x in self.needed if x > lo][: self.span - 1]}) if lo >= 0 else self.needed[: self.span]

    @contextmanager
    def _recording(self, keep: list[int]):
        got: dict[int, list] = {i: [] for i in keep}
        hooks = [self.layers[i].register_forward_hook(lambda _m, _a, out, i=i: got[i].append(out)) for i in keep]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        self.outputs = got

    @contextmanager
    def record(self):
        """Wrap one evaluation of the unchanged model: keeps the first window (layers ``0 … span − 1``,
        or the first ``span`` planned layers)."""
        self.outputs = {}
        with self._recording(self._window(0) if self.needed is None else self._window(-1)):
            yield self

    def ensure(self, first: int, evaluate) -> None:
        """Make the window hold layer ``first − 1``'s outputs (nothing to do for ``first ≤ 0``).
        ``evaluate()`` runs the same evaluation as the recorded one on the *unchanged* model and
        returns its ``(loss, ...)``. Moving up replays the layers below the old window's top; moving
        down starts again from layer 0."""
        need = min(first, len(self.layers)) - 1
        if need < 0 or need in self.outputs:
            return
        top = max(self.outputs) if self.outputs else -1
        start = top + 1 if 0 <= top < need else 0       # replay up to the old window's top, or from scratch
        self.outputs = {top: self.outputs[top]} if start else {}   # only the layer the replay still needs
        with self.replay(start), self._recording(self._window(need)):
            got = evaluate()
        self.moves += 1
        if self.reference is not None and not math.isclose(got[0], self.reference, rel_tol=1e-6, abs_tol=1e-9):
            raise RuntimeError(f"LayerReplay: the unchanged model's loss moved from {self.reference!r} to {got[0]!r} "
                               "while the replay window moved (the evaluation is not deterministic)")

    @contextmanager
    def replay(self, first: int):
        first = min(first, len(self.layers))
        if first <= 0:
            yield self
            return
        if first - 1 not in self.outputs:
            raise RuntimeError(f"LayerReplay: layer {first - 1}'s outputs are not held (call ensure({first}, ...) first)")
        source = self.outputs[first - 1]
        calls = [0] * first

        def replayed(i):
            def forward(*args, **kwargs):
                if calls[i] >= len(source):
                    raise RuntimeError("LayerReplay: more model calls than were recorded")
                calls[i] += 1
                return source[calls[i] - 1]
            return forward

        for i in range(first):
            self.layers[i].forward = replayed(i)
        try:
            yield self
        finally:
            for i in range(first):
                del self.layers[i].forward
        if any(c != len(source) for c in calls):
            raise RuntimeError("LayerReplay: the evaluation called the model differently from the recorded one")


def first_layer(entries: dict) -> int:
    """The lowest decoder layer any of ``entries``' weights belongs to (0 when one is not a layer's)."""
    layers = [p[0] for p in (parse_name(n) for n in entries) if p]
    return min(layers) if layers and len(layers) == len(entries) else 0


class UnitResult(NamedTuple):
    label: str
    size: int                  # entries replaced
    predicted: dict            # estimator -> predicted change
    measured_loss: float       # change of the task loss (NLL per completion token)
    measured_metric: float | None
    measured_halves: tuple | None = None   # the loss change on the even and on the odd items
    measured_metric_halves: tuple | None = None   # the same for the task metric (0.8)
    measured_items: tuple | None = None    # each evaluation item's loss change (its NLL per token; 0.8.5)
    measured_metric_items: tuple | None = None   # each item's change of the task metric (0.8.5)


ITEM_STATISTICS = ("median", "trimmed")
TRIM = 0.1   # "trimmed": the mean of the items' changes without the lowest and the highest 10%


def item_statistic(changes, stat: str, trim: float = TRIM) -> float:
    """A statistic of the items' changes (``[n_items]``) robust to a few heavy items: ``median``
    (the mean of the two middle values for even ``n``) or ``trimmed`` (the mean without the
    ``⌊trim · n⌋`` lowest and highest). Items count alike, whatever their number of tokens (the task
    loss, ``mean``, weighs them by tokens). Worked example: ``[0, 0, 1, 9]``: median 0.5, trimmed
    (trim 0.25) 0.5, mean 2.5."""
    x = torch.as_tensor(changes, dtype=torch.float64).flatten().sort().values
    if x.numel() == 0:
        return float("nan")
    if stat == "median":
        return float(torch.quantile(x, 0.5))
    if stat == "trimmed":
        k = int(math.floor(trim * x.numel()))
        return float(x[k:x.numel() - k].mean()) if x.numel() > 2 * k else float(torch.quantile(x, 0.5))
    raise UsageError(f"unknown item statistic '{stat}'; choose one of {', '.join(ITEM_STATISTICS)}")


def _rounded(x: float) -> float:
    return float(f"{x:.5g}")


def robust_measurements(rows: list[UnitResult], per_item_estimates: dict | None = None) -> dict | None:
    """The measured change of each unit as a per-item ``ITEM_STATISTICS`` rather than the task
    loss's mean, and how the estimators rank against it: a mean over a few hundred items is carried
    by a handful of items when those move by nats where the rest move by hundredths (IOI's first
    layers, 0.8.4), and its ranking then follows the handful. Per statistic: ``spearman`` of every
    estimator against it, ``spearman_metric`` (the task metric's change, sign flipped), their
    ``noise_ceiling``s (the statistic on the even vs the odd items), and ``spearman_matched``: an
    estimator with per-item terms (``per_item_estimates``: ``{name: {label: [n_calib]}}``, e.g.
    ``atp-local``) summarised by the same statistic over its calibration items (its values per unit in
    ``predicted_matched``; ``spearman_matched_vs_mean`` ranks them against the mean). None when the rows
    carry no per-item changes (a report measured before 0.8.5)."""
    if len(rows) < 3 or any(r.measured_items is None for r in rows):
        return None
    has_metric = all(r.measured_metric_items is not None for r in rows)
    out: dict = {"trim": TRIM, "statistics": {}}
    for stat in ITEM_STATISTICS:
        loss = [item_statistic(r.measured_items, stat) for r in rows]
        halves = [(item_statistic(r.measured_items[0::2], stat), item_statistic(r.measured_items[1::2], stat))
                  for r in rows]
        d = {"spearman": {k: spearman([r.predicted[k] for r in rows], loss) for k in rows[0].predicted},
             "noise_ceiling": _ceiling([h[0] for h in halves], [h[1] for h in halves])}
        if per_item_estimates:
            pm = {k: [item_statistic(v[r.label], stat) for r in rows] for k, v in per_item_estimates.items()}
            d["spearman_matched"] = {k: spearman(x, loss) for k, x in pm.items()}
            # the same summary against the task loss's own (mean) change: is it a better estimator, or a
            # better match for the robust measurement only?
            d["spearman_matched_vs_mean"] = {k: spearman(x, [r.measured_loss for r in rows]) for k, x in pm.items()}
            d["predicted_matched"] = {k: {r.label: _rounded(v) for r, v in zip(rows, x)} for k, x in pm.items()}
        if has_metric:
            metric = [-item_statistic(r.measured_metric_items, stat) for r in rows]
            mh = [(-item_statistic(r.measured_metric_items[0::2], stat), -item_statistic(r.measured_metric_items[1::2], stat))
                  for r in rows]
            d["spearman_metric"] = {k: spearman([r.predicted[k] for r in rows], metric) for k in rows[0].predicted}
            d["noise_ceiling_metric"] = _ceiling([h[0] for h in mh], [h[1] for h in mh])
        out["statistics"][stat] = d
    return out


def noise_ceiling(rows: list[UnitResult], field: str = "measured_halves") -> dict | None:
    """How far the measured changes can be predicted at all: the Spearman correlation of the
    changes measured on the even and on the odd evaluation items (split half), its Spearman–Brown
    reliability for all items ``2r / (1 + r)``, and ``√reliability``, the correlation a perfect
    predictor would reach with measurements this noisy (the attenuation bound). None without halves."""
    halves = [getattr(r, field) for r in rows]
    if any(h is None for h in halves) or len(rows) < 3:
        return None
    return _ceiling([h[0] for h in halves], [h[1] for h in halves])


def _ceiling(even: list[float], odd: list[float]) -> dict:
    """``noise_ceiling`` of one value per unit measured on the even and on the odd items."""
    r = spearman(even, odd)
    rel = 2 * r / (1 + r) if r == r and r > -1 else float("nan")
    return {"split_half_spearman": r, "reliability": rel, "ceiling": math.sqrt(rel) if rel == rel and rel > 0 else 0.0}


def measure(model, loss_fn, entries: dict, values: dict, cache: LayerReplay | None = None) -> tuple[float, float | None]:
    """``loss_fn(model) -> (loss, metric[, (loss on even items, loss on odd items)[, (the metric on
    them)[, {"loss": [n_items], "metric": [n_items] | None} each item's]]])`` with
    ``entries`` replaced by ``values``; with ``cache``
    (recorded on the unchanged model), the layers below the first replaced one are replayed."""
    if cache is None:
        with replaced(model, entries, values):
            return loss_fn(model)
    first = first_layer(entries)
    cache.ensure(first, lambda: loss_fn(model))     # on the unchanged model: the window holds layer first - 1
    with replaced(model, entries, values), cache.replay(first):
        return loss_fn(model)


def _resizable_family(task) -> str | None:
    """``ioi`` for ``ioi``, ``ioi:800``, ``ioi:1600`` (a circuit task whose splits can be made
    larger, the first items of a larger split being the smaller one's); None for any other task."""
    kind, _, arg = str(task).partition(":")
    return kind if kind in SIZED_TASKS and (not arg or arg.isdigit()) else None


def reusable_measurements(prev: dict, key: dict | None, source: str = "--measured") -> dict:
    """``prev`` (an earlier faithfulness report) as ``faithfulness_report``'s ``prior``, when it
    measured the same thing: its ``measurement`` equals ``key`` (model fingerprint, task, the
    evaluation items' digest and settings, unit kind, ablation, bits, group size; ``key=None``
    checks only that it is such a report). Sizes of one resizable circuit task (``ioi:800`` and
    ``ioi:1600``) count as the same task when the evaluation items' digest matches, so a larger
    calibration split can reuse a measurement. One line naming the fields that differ otherwise."""
    if not isinstance(prev, dict) or prev.get("format") != "circuitq.faithfulness" or "units" not in prev:
        raise UsageError(f"{source} is not a circuitq faithfulness JSON (made by `circuitq faithfulness --out`)")
    was = prev.get("measurement")
    if not isinstance(was, dict):
        raise UsageError(f"{source} was made by circuitq {prev.get('circuitq_version', '?')}, which did not record what it "
                         "measured; measure again without --measured")
    diff = [] if key is None else sorted(k for k in set(key) | set(was) if key.get(k) != was.get(k))
    if diff == ["task"] and _resizable_family(key["task"]) == _resizable_family(was.get("task")) is not None:
        diff = []   # ioi:800 and ioi:1600 on the same held-out items (the digest matched): the same measurement
    if diff:
        raise UsageError(f"{source} measured something else ({', '.join(diff)} differ); match them or drop --measured")
    return prev


def evaluation_passes(n_units: int, *, all_units: bool, top: int, n_random: int, curve_points: int,
                      orderings: int, reused: bool = False) -> int:
    """How many evaluation passes of the task's items a faithfulness check makes: one per unit
    measured (none when ``reused``: ``--measured`` supplies them), four contrasts, one base, and
    ``2 · curve_points · orderings`` for the curves. Worked example: 270 heads, all measured, no
    curves: 275; reused: 5."""
    measured = 0 if reused else n_units if all_units else min(n_units, top + n_random)
    return 1 + measured + 4 + 2 * curve_points * orderings


def faithfulness_report(model, loss_fn, scores: dict, unit_list: list[Unit], values: dict, estimators: dict, *,
                        top: int, n_random: int, fraction: float, seed: int = 0, all_units: bool = False,
                        cache: LayerReplay | None = None, prior: dict | None = None, progress: bool = True,
                        estimator_halves: dict[str, SplitHalves] | None = None) -> dict:
    """The faithfulness measurements (``loss_fn`` runs the task's evaluation items).

    ``scores``: the circuit's scores ``{name: [out, in]}``; ``estimators``: ``{name: {weight name:
    [out, in]}}`` whose unit sums are the predicted changes (e.g. ``score`` = the selection scores,
    ``atp`` = ``ΣG·ΔW``); ``values``: what replaced entries take. Units: every unit when
    ``all_units``, else the ``top`` by summed score plus ``n_random`` others (seeded). ``cache``: a
    ``LayerReplay`` of ``model``'s layers, recorded here on the unchanged model and replayed for
    each unit (same numbers, less work). ``prior``: an earlier report of the same measurement
    (``reusable_measurements``); its units' measured changes are taken instead of measured again,
    after the base loss measured here is checked against its own. ``estimator_halves``: weight-level
    estimators computed on each half of the calibration items, for their split-half reliability
    over the units measured (``atp-local``'s comes from its own per-item terms)."""
    by_score = sorted(unit_list, key=lambda u: -unit_sum(u, scores))
    rest = by_score[top:]
    g = torch.Generator().manual_seed(seed)
    picked = by_score if all_units else \
        by_score[:top] + [rest[i] for i in torch.randperm(len(rest), generator=g)[:n_random].tolist()]
    if cache is not None:
        # only the layer below each measured unit's lowest (none with --measured: nothing is measured here)
        cache.plan([] if prior is not None else [first_layer(u.entries) - 1 for u in picked])
        with cache.record():
            base = loss_fn(model)
        cache.reference = base[0]
    else:
        base = loss_fn(model)
    base_loss, base_metric = base[0], base[1]
    base_halves = base[2] if len(base) > 2 else None
    base_mhalves = base[3] if len(base) > 3 and base[3] is not None else None
    base_items = base[4] if len(base) > 4 else None
    known = {}
    if prior is not None:
        was = prior["base"]["loss"]
        if not math.isclose(base_loss, was, rel_tol=1e-5, abs_tol=1e-7):
            raise UsageError(f"--measured: the base loss measured now ({base_loss:.6f}) differs from the earlier file's "
                             f"({was:.6f}); the measurements do not reproduce here, so measure again without --measured")
        known = {u["label"]: u for u in prior["units"]}
    lacking = [u.label for u in picked if known and u.label not in known]
    if lacking:
        raise UsageError(f"--measured: the earlier file has no measurement of {len(lacking)} of the units asked for "
                         f"(e.g. {lacking[0]}); ask for the units it measured (e.g. --all-units if it did) or drop --measured")
    # measured in ascending layer order (the replay window then only moves up), reported in ``picked``'s order
    order = sorted(range(len(picked)), key=lambda i: first_layer(picked[i].entries)) if cache is not None and not known \
        else list(range(len(picked)))
    done: dict[int, UnitResult] = {}
    for i in tqdm(order, desc="units" + (" (measured earlier)" if known else ""), disable=not progress):
        u = picked[i]
        predicted = {k: predict(u, v) for k, v in estimators.items()}
        size = int(sum(int(m.sum()) for m in u.entries.values()))
        if known:
            k = known[u.label]
            halves = tuple(k["measured_halves"]) if k.get("measured_halves") is not None else None
            mh = tuple(k["measured_metric_halves"]) if k.get("measured_metric_halves") is not None else None
            its, mits = (tuple(k[f]) if k.get(f) is not None else None for f in ("measured_items", "measured_metric_items"))
            done[i] = UnitResult(u.label, size, predicted, k["measured_loss"], k["measured_metric"], halves, mh, its, mits)
            continue
        got = measure(model, loss_fn, u.entries, values, cache)
        loss, metric = got[0], got[1]
        halves = tuple(a - b for a, b in zip(got[2], base_halves)) if base_halves is not None else None
        mh = tuple(a - b for a, b in zip(got[3], base_mhalves)) if base_mhalves is not None and len(got) > 3 and got[3] is not None \
            else None
        its = mits = None
        if base_items is not None and len(got) > 4:
            its = tuple(_rounded(a - b) for a, b in zip(got[4]["loss"], base_items["loss"]))
            if got[4].get("metric") is not None and base_items.get("metric") is not None:
                mits = tuple(_rounded(a - b) for a, b in zip(got[4]["metric"], base_items["metric"]))
        done[i] = UnitResult(u.label, size, predicted, loss - base_loss,
                             None if metric is None or base_metric is None else metric - base_metric, halves, mh,
                             its, mits)
    rows = [done[i] for i in range(len(picked))]
    rho = {k: spearman([r.predicted[k] for r in rows], [r.measured_loss for r in rows]) for k in estimators}
    # the same against the task metric's measured change, sign flipped so that "hurts the task" is positive
    # for both (the ranking an estimator of --objective metric is made for)
    rho_metric = {k: spearman([r.predicted[k] for r in rows], [-r.measured_metric for r in rows]) for k in estimators} \
        if rows and all(r.measured_metric is not None for r in rows) else None
    shapes = {n: tuple(t.shape) for n, t in scores.items()}
    circuit = select_topk_stream(scores.items(), shapes, fraction)   # 12·k bytes, not a sort of every score
    rand = random_like(circuit, shapes, seed)
    contrasts = {}
    for label, ent in (("only circuit", circuit), ("only random", rand), ("all but circuit", complement(circuit, shapes)),
                       ("all but random", complement(rand, shapes))):
        loss, metric = measure(model, loss_fn, ent, values)[:2]
        contrasts[label] = {"loss_change": loss - base_loss,
                            "metric_change": None if metric is None or base_metric is None else metric - base_metric}
    ratio = contrasts["only circuit"]["loss_change"] / contrasts["only random"]["loss_change"] \
        if contrasts["only random"]["loss_change"] else float("inf")
    reliab = _reliabilities(rows, estimators, estimator_halves or {}) or None
    nc = noise_ceiling(rows)
    return {"base": {"loss": base_loss, "metric": base_metric}, "units": [r._asdict() for r in rows],
            "units_measured": "all" if all_units else f"top {top} by score + {n_random} random (seed {seed})",
            "spearman": rho, "spearman_metric": rho_metric, "best_estimator": max(rho, key=lambda k: -1 if math.isnan(rho[k]) else rho[k]),
            "noise_ceiling": nc,
            "noise_ceiling_metric": noise_ceiling(rows, "measured_metric_halves"),
            "estimator_reliability": reliab,
            "attenuation": attenuation(rho, reliab, nc),
            "robust": robust_measurements(rows, {k: v.per_item for k, v in estimators.items()
                                                 if isinstance(v, UnitEstimate) and v.per_item is not None}),
            "contrasts": contrasts, "only_circuit_over_only_random": ratio,
            "circuit_entries": int(sum(int(m.sum()) for m in circuit.values()))}


def attenuation(rho: dict, reliability: dict | None, ceiling: dict | None) -> dict | None:
    """Per estimator with a split-half reliability ``r_e`` (its calibration items) and the
    measurement's ``r_m`` (its evaluation items): ``attainable = √(r_e · r_m)``, the Spearman that
    an estimator ranking the units perfectly *in the population of items* would reach with both
    samples this noisy, and ``corrected = ρ / attainable`` (Spearman's correction for attenuation;
    above 1 where the noise estimates are themselves noisy). A target above ``attainable`` cannot be
    met at these sample sizes whatever the estimator; ``corrected`` near 1 says the estimator's
    remaining gap is sampling. None without both reliabilities. Worked example: ρ 0.877, r_e 0.971,
    r_m 0.904 give attainable 0.937 and corrected 0.936."""
    if not reliability or not ceiling or not (ceiling.get("reliability", 0) > 0):
        return None
    out = {}
    for k, r in reliability.items():
        if r and r.get("reliability", 0) > 0 and k in rho and rho[k] == rho[k]:
            att = math.sqrt(r["reliability"] * ceiling["reliability"])
            out[k] = {"attainable": att, "corrected": rho[k] / att}
    return out or None


def _reliabilities(rows: list[UnitResult], estimators: dict, halves: dict[str, SplitHalves]) -> dict:
    """Each estimator's split-half reliability over the units measured: from a ``UnitEstimate``'s
    per-item terms, or from ``halves``."""
    labels = [r.label for r in rows]
    out = {k: estimator_reliability(labels, v.per_item) for k, v in estimators.items()
           if isinstance(v, UnitEstimate) and v.per_item is not None}
    for k, h in halves.items():
        if k in estimators:
            out[k] = split_half_reliability([h.first[x] for x in labels], [h.second[x] for x in labels], h.items)
    return out


CURVE_MODES = ("keep-top", "replace-top")


def unit_order(unit_list: list[Unit], values, seed: int = 0) -> list[int]:
    """Indices of ``unit_list`` from most to least important: by ``predict`` of ``values`` (weight
    level or a ``UnitEstimate``)
    (signed: a unit predicted to *help* when replaced comes last), or a seeded random order when
    ``values`` is None."""
    if values is None:
        return torch.randperm(len(unit_list), generator=torch.Generator().manual_seed(seed)).tolist()
    sums = [predict(u, values) for u in unit_list]
    return sorted(range(len(unit_list)), key=lambda i: -sums[i])


def recovery(mode: str, m_k: float, m_full: float, m_none: float) -> float:
    """Recovery at one point of a faithfulness curve (see the module docstring); NaN when
    replacing every unit changes nothing."""
    span = m_full - m_none
    if span == 0 or not math.isfinite(span):
        return float("nan")
    return (m_k - m_none) / span if mode == "keep-top" else (m_full - m_k) / span


def curve_area(fractions: list[float], rec: list[float]) -> float:
    """Trapezoid mean of ``rec`` over ``fractions`` (sorted, distinct): the area under the curve
    divided by the fractions' range. Worked example: fractions ``[0, 0.5, 1]``, recovery
    ``[0, 1, 1]`` give 0.75."""
    if len(fractions) < 2:
        return float("nan")
    area = sum((fractions[i + 1] - fractions[i]) * (rec[i] + rec[i + 1]) / 2 for i in range(len(fractions) - 1))
    return area / (fractions[-1] - fractions[0])


def faithfulness_curves(model, loss_fn, unit_list: list[Unit], values: dict, orderings: dict[str, list[int]],
                        grid: tuple[float, ...], *, cache: LayerReplay | None = None, progress: bool = True) -> dict:
    """Faithfulness curves of each ordering (``{name: unit indices, most important first}``) at the
    fractions ``grid`` of units, in both ``CURVE_MODES``. ``loss_fn(model) -> (loss, metric)``; a task
    without a metric is scored by ``−loss``. ``cache``: a ``LayerReplay`` already recorded on the
    unchanged model with this ``loss_fn``. Memory: one union mask per point (the weights' size in
    bool)."""
    n = len(unit_list)
    fr = sorted({float(f) for f in grid})

    def metric_of(loss, metric):
        return -loss if metric is None else metric

    steps = [(name, mode, f) for name in orderings for mode in CURVE_MODES for f in fr]

    def replaced_at(name, mode, f) -> tuple[int, ...]:
        order, k = orderings[name], round(f * n)
        return tuple(sorted(order[k:] if mode == "keep-top" else order[:k]))

    # every distinct set of replaced units once (k = 0 and k = n of the two modes are the same two models),
    # the unchanged model first, then in ascending order of their lowest layer (the replay window only moves up)
    keys = {(): None, tuple(range(n)): None}
    for s in steps:
        keys.setdefault(replaced_at(*s), None)
    lowest = [first_layer(u.entries) for u in unit_list]
    if cache is not None:
        cache.plan(min((lowest[i] for i in key), default=0) - 1 for key in keys if key)
    seen: dict = {}
    for key in tqdm(sorted(keys, key=lambda key: (bool(key), min((lowest[i] for i in key), default=0))),
                    desc="curves", disable=not progress):
        # one union mask at a time (the weights' size in bool)
        seen[key] = measure(model, loss_fn, union([unit_list[i].entries for i in key]), values, cache) if key \
            else loss_fn(model)

    full_loss, full_metric = seen[()][:2]
    none_loss, none_metric = seen[tuple(range(n))][:2]
    m_full, m_none = metric_of(full_loss, full_metric), metric_of(none_loss, none_metric)
    out = {"units": n, "grid": fr, "full": {"loss": full_loss, "metric": full_metric},
           "none": {"loss": none_loss, "metric": none_metric}, "orderings": {}}
    points: dict = {}
    for name, mode, f in steps:
        loss, metric = seen[replaced_at(name, mode, f)][:2]
        m = metric_of(loss, metric)
        points.setdefault(name, {}).setdefault(mode, []).append(
            {"fraction": f, "units": round(f * n), "loss": loss, "metric": metric, "recovery": recovery(mode, m, m_full, m_none)})
    for name, modes in points.items():
        out["orderings"][name] = {mode: {"points": pts, "area": curve_area([p["fraction"] for p in pts],
                                                                           [p["recovery"] for p in pts])}
                                  for mode, pts in modes.items()}
    return out
