"""Attribution of the task loss change between 16-bit and quantized weights.

For a weight ``w`` and its quantized value ``q = Q(w)``, how much does replacing ``w`` by ``q``
change the task loss ``L`` (summed over calibration items)?

* ``atp`` (attribution patching, first order at ``W``): ``ΣG · (q − w)`` with ``ΣG`` the summed
  per-sample gradient. One gradient pass; a saliency method in ``saliency.methods``.
* ``atp-denoise`` (attribution patching at the other end of the path, the *denoising* direction of
  activation patching): ``ΣG(W') · (q − w)`` with the gradient taken at ``W'``, the model with every
  unit of the kind replaced at once (``denoising_attribution``). It predicts what restoring one unit
  to 16-bit in an otherwise replaced model changes, which is what a keep-top faithfulness curve
  measures; ``atp`` (linearised at ``W``, the noising direction) predicts replacing the unit alone.
  One gradient pass.
* ``atp-local`` (``local_attribution``): attribution patching with the unit's own attention or MLP
  block recomputed exactly and only what follows it linearised (AtP*'s correction, carried to weights).
* ``atp-local2`` (``second_order``): ``atp-local`` plus the second-order term of what follows the
  block, its Hessian taken as the empirical Fisher of each item's NLL: ``Σ_i (t_i + ½ t_i²)`` over
  the items' own first-order terms ``t_i``. The NLL is convex in the logits, so replacing a unit
  whose effect swings from item to item costs more than the mean of its first-order terms; the term
  says how much more. No extra pass over ``atp-local``.
* ``ig`` (integrated gradients along the straight path ``W + α(Q(W) − W)``, every weight moving
  at once, as EAP-IG does for edges): ``(q − w) · ∫₀¹ ΣG(α) dα``. The integral is taken with
  ``K``-point Gauss–Legendre quadrature on ``[0, 1]``, exact for a gradient that is a polynomial
  of degree ``2K − 1`` in ``α``: the path is short (quantization error) and the loss smooth along
  it, so a few nodes converge where a Riemann sum of the same cost has an ``O(1/K)`` bias. Its
  attributions sum to ``L(Q(W)) − L(W)`` up to the quadrature error (completeness), which
  ``completeness`` measures.

Memory of ``integrated_gradients``: the model, plus a copy of ``W`` and the running integral of every
targeted weight (``8 · P_lin`` bytes in float32; 0.8.6, ``12 · P_lin`` and ``16 · P_lin`` at the end
before) beside the caller's ``Q(W)`` (``4 · P_lin``), plus one gradient pass's statistics
(``4 · P_lin``) and activations. Measured on SmolLM2-135M, 16 GSM8k items, before 0.8.6: 4.04 GB peak
(the default run's gradient pass: 2.37 GB). Time: ``K``
gradient passes and two forward passes.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitq.data.tasks import collate, scored_positions, tokenize_examples
from circuitq.errors import UsageError
from circuitq.model.arch import arch_for, parse_name
from circuitq.saliency.capture import collect_stats, plan_batches
from circuitq.saliency.objectives import Objective
from circuitq.storage import replaced


def gauss_legendre(k: int) -> tuple[list[float], list[float]]:
    """Nodes and weights of ``k``-point Gauss–Legendre quadrature on ``[0, 1]`` (weights sum to 1).
    Worked example: ``k = 1`` is the midpoint rule, ``([0.5], [1.0])``."""
    if not isinstance(k, int) or k < 1:
        raise UsageError(f"--ig-steps must be a whole number ≥ 1, got {k!r}")

    x, w = np.polynomial.legendre.leggauss(k)
    return [float((xi + 1) / 2) for xi in x], [float(wi / 2) for wi in w]


def atp(grad_sum: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Attribution patching: ``ΣG · (Q(W) − W)`` elementwise, ``[out, in]`` float32 (signed:
    positive where quantizing the weight is predicted to raise the loss)."""
    return grad_sum.float() * (quantized.float() - weight.float())


def second_order(per_item: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """``atp-local2`` from ``atp-local``'s per-item terms ``{label: [n_items] t_i}``: each item's
    second-order Taylor estimate of its loss change, ``t_i + ½ t_i²``, the Hessian of what follows
    the unit's block approximated by the empirical Fisher ``g_i g_iᵀ`` of that item's NLL (so
    ``½ Δyᵀ g_i g_iᵀ Δy = ½ t_i²``), and their sums. Returns ``({label: Σ_i}, {label: [n_items]})``.

    Why the empirical Fisher: for the NLL of one token the Gauss–Newton Hessian in the logits is
    ``diag(p) − ppᵀ = E_{y~p}[(p − e_y)(p − e_y)ᵀ]``, of which ``g_i g_iᵀ`` is the one-sample
    estimate at the item's own answer; it needs no pass beyond ``atp-local``'s. An item with several
    scored tokens takes the outer product of its mean gradient (the cross terms of its tokens stay).
    Only the NLL has this Hessian: the task metric (``--objective metric``) does not. Worked
    example: terms ``[0.2, −0.2]`` sum to 0 to first order and to ``0.04`` here."""
    terms = {k: t + 0.5 * t * t for k, t in per_item.items()}
    return {k: float(v.sum()) for k, v in terms.items()}, terms


class PathPoint(NamedTuple):
    """The summed loss ``L(α)`` and its slope ``dL/dα = Σ_w ⟨ΣG_w(α), Q(W) − W⟩`` at one point ``α`` of the
    straight path ``W + α(Q(W) − W)``; the slope comes from the gradient pass IG makes there anyway."""

    alpha: float
    loss: float
    slope: float


class Completeness(NamedTuple):
    """``attributed``: the sum of all attributions; ``measured``: ``L(Q(W)) − L(W)``; ``gap``:
    ``|attributed − measured| / |measured|``; ``path``: ``PathPoint`` at every quadrature node and ``loss_w``:
    ``L(W)`` (0.8.7)."""

    attributed: float
    measured: float
    gap: float
    path: tuple = ()
    loss_w: float = float("nan")


def completeness(attributions: dict[str, torch.Tensor], loss_w: float, loss_q: float, path=()) -> Completeness:
    total = float(sum(float(a.detach().double().sum()) for a in attributions.values()))
    measured = loss_q - loss_w
    return Completeness(total, measured, abs(total - measured) / max(abs(measured), 1e-30), tuple(path), loss_w)


def path_diagnosis(loss_w: float, loss_q: float, path, weights=None) -> dict:
    """Why IG's completeness gap is what it is, from the loss and slope at its nodes (pure; no pass).

    ``path``: ``PathPoint`` sorted by ``alpha``; ``weights``: the quadrature weights of the nodes (``None``: the
    trapezoid rule over ``0, α_1, …, α_K, 1`` with the slopes at the ends taken from their nearest node).
    Returns ``{"rule": ∫ slope by the rule, "variation": ∫ |slope| by the rule, "cancellation": variation /
    |L(Q(W)) − L(W)|, "segments": [{"from", "to", "rise", "predicted"}], "worst": the segment whose measured
    rise ``L(b) − L(a)`` differs most from the trapezoid of the slopes at its ends}``.

    Reading it: a quadrature error is at most a share of the *variation* it integrates, so a small net change
    made of large rises and falls (``cancellation`` ≫ 1) gives a large relative gap from a small error; a
    ``worst`` segment whose rise is far from what its end slopes predict is where the nodes are too sparse.
    Worked example: slopes ``[+10, −10]`` at ``α = ¼, ¾`` with equal weights integrate to 0, vary by 10."""
    pts = sorted(path, key=lambda p: p.alpha)
    if not pts:
        raise ValueError("path_diagnosis needs at least one point of the path")
    measured = loss_q - loss_w
    if weights is None:   # trapezoid over the points and the ends
        xs = [0.0] + [p.alpha for p in pts] + [1.0]
        ds = [pts[0].slope] + [p.slope for p in pts] + [pts[-1].slope]
        rule = sum((xs[i + 1] - xs[i]) * (ds[i] + ds[i + 1]) / 2 for i in range(len(xs) - 1))
        variation = sum((xs[i + 1] - xs[i]) * (abs(ds[i]) + abs(ds[i + 1])) / 2 for i in range(len(xs) - 1))
    else:
        rule = sum(w * p.slope for w, p in zip(weights, pts))
        variation = sum(w * abs(p.slope) for w, p in zip(weights, pts))
    known = [(0.0, loss_w, None)] + [(p.alpha, p.loss, p.slope) for p in pts] + [(1.0, loss_q, None)]
    segments = []
    for (a, la, da), (b, lb, db) in zip(known, known[1:]):
        if b <= a:
            continue
        da = db if da is None else da
        db = da if db is None else db
        segments.append({"from": a, "to": b, "rise": lb - la, "predicted": (b - a) * (da + db) / 2})
    worst = max(segments, key=lambda s: abs(s["rise"] - s["predicted"])) if segments else None
    return {"rule": rule, "variation": variation, "measured": measured,
            "cancellation": variation / max(abs(measured), 1e-30), "segments": segments, "worst": worst}


def describe_path(diag: dict, gap: float | None = None) -> str:
    """One line from ``path_diagnosis`` (its ``rule``, ``variation``, ``cancellation``, ``worst``) for the CLI; with a
    completeness ``gap`` over 10%, what to do about it."""
    w = diag["worst"]
    line = (f"the slope dL/dα at the nodes integrates to {diag['rule']:+.4f} out of a variation ∫|dL/dα| of "
            f"{diag['variation']:.4f} ({diag['cancellation']:.1f}x the net change); least resolved: α {w['from']:.3f}–"
            f"{w['to']:.3f}, where the loss moved {w['rise']:+.4f} and the end slopes say {w['predicted']:+.4f}")
    if gap is not None and gap > 0.10:
        line += ("; the nodes do not resolve this path: more --ig-steps (a few times the net change in variation "
                 "turns a small quadrature error into a large gap; analyses/results/ig_path)")
    return line


@torch.no_grad()
def _set_path(model, names: list[str], base: dict, delta, alpha: float) -> None:
    """Every weight of ``names`` to ``W + alpha · (Q(W) − W)``; ``delta(name)`` makes one weight's ``Q(W) − W``
    (a weight-sized temporary, not a copy of the model's)."""
    for n in names:
        model.get_parameter(n).copy_((base[n].float() + alpha * delta(n)).to(base[n].dtype))


@torch.no_grad()
def item_losses(model, tokenizer, examples, calib) -> torch.Tensor:
    """``[n_items]`` float64: each item's objective (``calib.objective``; ``nll``: the mean next-token NLL over its
    scored positions), NaN where it is not finite; one forward pass (``summed_loss`` sums the finite ones)."""
    device = next(model.parameters()).device
    tok = tokenize_examples(examples, tokenizer, calib.seq_len, loss=calib.loss)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    obj = Objective(calib.objective, tokenizer)
    out = torch.full((len(examples),), float("nan"), dtype=torch.float64)
    # batches bounded by padded tokens as the gradient pass (0.8.6): 8 long items' logits at every scored position
    # (8 · ~200 · V floats, twice with the log-softmax) are not held at once
    for idx in plan_batches([len(x) for x in tok.ids], calib.batch_size, calib.batch_tokens):
        skip = [tok.unscored[j] for j in idx] if tok.unscored is not None else None
        ids, attn, lmask = (t.to(device) for t in collate([tok.ids[j] for j in idx], [tok.scored_from[j] for j in idx],
                                                          pad, skip))
        pos = scored_positions(lmask)
        logits = model(input_ids=ids, attention_mask=attn.long(), logits_to_keep=pos).logits
        losses = obj(logits, ids, lmask, pos, [examples[j] for j in idx]).double().cpu()
        out[idx] = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, float("nan")))
    return out


def summed_loss(model, tokenizer, examples, calib) -> float:
    """``Σ_s`` of each item's objective (``item_losses``, the finite ones): the loss whose gradient the statistics
    sum (``capture.sample_losses``, the same collation)."""
    losses = item_losses(model, tokenizer, examples, calib)
    return float(losses[torch.isfinite(losses)].sum())


def walk_path(model, tokenizer, examples, quantized: dict[str, torch.Tensor], calib, alphas, *,
              model_path: str | None = None, progress: bool = True, on_step=None, desc: str = "path",
              forward_alphas=()) -> list[PathPoint]:
    """One gradient pass at each ``α`` of ``alphas`` on the straight path ``W + α(Q(W) − W)``, every weight of
    ``quantized`` moving at once: a ``PathPoint`` (summed loss, slope ``dL/dα``) per ``α``, in the order given.
    ``on_step(k, α, sums)`` sees each point's summed gradients ``{name: [out, in] ΣG(α)}`` (IG accumulates them).
    ``forward_alphas``: further points where only the loss is taken (a forward pass; slope NaN), appended in order,
    with the same copy of ``W`` (IG's ``L(Q(W))`` at ``α = 1``). The weights are restored at the end, also on an error.

    Memory: a copy of ``W`` (``4 · P_lin`` float32) and one gradient pass's ``ΣG`` (``4 · P_lin``); ``Q(W) − W``
    one weight at a time. Time: ``len(alphas)`` gradient passes; the loss is the pass's own (no extra pass)."""
    path = model_path or getattr(model.config, "_name_or_path", "") or "model"
    names = list(quantized)
    base = {n: model.get_parameter(n).detach().clone() for n in names}

    def delta(n):   # Q(W) − W of one weight, when needed (0.8.6: no longer held for every weight at once)
        return quantized[n].float().to(base[n].device) - base[n].float()

    points = []
    try:
        for k, a in enumerate(tqdm(list(alphas), desc=desc, unit="step", disable=not progress)):
            _set_path(model, names, base, delta, a)
            res = collect_stats(model, tokenizer, examples, path, batch_size=calib.batch_size,
                                seq_len=calib.seq_len, stats=("sum",), progress=False, batch_tokens=calib.batch_tokens,
                                attention=calib.attention, loss=calib.loss, recompute=calib.recompute,
                                objective=calib.objective)
            sums = res["stats"].tensors["sum"]
            # one dot product per weight (float32 products summed by the BLAS): no weight-sized float64 temporaries
            slope = sum(float(torch.dot(sums[n].to(base[n].device).reshape(-1).float(), delta(n).reshape(-1)))
                        for n in names)
            points.append(PathPoint(float(a), float(res["loss"]), slope))
            if on_step is not None:
                on_step(k, a, sums)
            del res, sums
        for a in forward_alphas:
            _set_path(model, names, base, delta, a)
            points.append(PathPoint(float(a), summed_loss(model, tokenizer, examples, calib), float("nan")))
    finally:
        with torch.no_grad():
            for n in names:
                model.get_parameter(n).copy_(base[n])
    return points


@torch.no_grad()
def path_item_losses(model, tokenizer, examples, quantized: dict[str, torch.Tensor], calib, alphas, *,
                     progress: bool = True) -> torch.Tensor:
    """``[len(alphas), n_items]`` float64: each item's loss at each ``α`` of the straight path ``W + α(Q(W) − W)``
    (every weight of ``quantized`` moving at once), one forward pass per ``α``; the weights are restored after, also
    on an error. Where along the path, and for which items, the summed loss bends (``analyses/ig_path.py``).
    Memory: a copy of ``W`` (``4 · P_lin``) and ``Q(W) − W`` one weight at a time."""
    names = list(quantized)
    base = {n: model.get_parameter(n).detach().clone() for n in names}

    def delta(n):
        return quantized[n].float().to(base[n].device) - base[n].float()

    rows = []
    try:
        for a in tqdm(list(alphas), desc="path losses", unit="point", disable=not progress):
            _set_path(model, names, base, delta, a)
            rows.append(item_losses(model, tokenizer, examples, calib))
    finally:
        for n in names:
            model.get_parameter(n).copy_(base[n])
    return torch.stack(rows)


def integrated_gradients(model, tokenizer, examples, quantized: dict[str, torch.Tensor], calib, *, steps: int = 16,
                         model_path: str | None = None, progress: bool = True) -> tuple[dict, Completeness]:
    """``{HF weight name: [out, in]}`` IG attributions of replacing each weight by ``quantized``
    (``Q(W)``, e.g. ``stages.quantized_weights(...).weights``) on ``examples``, and their
    completeness, with the loss and slope at every node (``Completeness.path``, from the gradient passes
    themselves; ``path_diagnosis`` reads them). The model's weights are moved along the path and restored
    at the end, also on an error. ``calib``: a ``CalibConfig`` (batching, sequence length, loss scope).

    Memory: a copy of ``W`` and the running integral (``8 · P_lin`` bytes, float32) besides ``Q(W)``
    (the caller's) and one gradient pass's ``Σ G`` (``4 · P_lin``); ``Q(W) − W`` is made one weight at a
    time and the integral becomes the attribution in place. Before 0.8.6 ``Q(W) − W`` was held for every
    weight and the attribution was a new tensor beside the integral: ``16 · P_lin`` at the end (0.43 GB
    per ``4 · P_lin`` on SmolLM2, about 28 GB on an 8B model)."""
    nodes, weights = gauss_legendre(steps)
    names = list(quantized)
    integral = {n: torch.zeros(model.get_parameter(n).shape, dtype=torch.float32,
                               device=model.get_parameter(n).device) for n in names}

    def accumulate(k, a, sums):
        for n in names:
            integral[n].add_(sums[n].to(integral[n].device), alpha=weights[k])

    loss_w = summed_loss(model, tokenizer, examples, calib)
    # L(Q(W)) at α = 1 by a loss pass, with walk_path's own copy of W (one copy of W for the whole walk)
    points = walk_path(model, tokenizer, examples, quantized, calib, nodes, model_path=model_path,
                       progress=progress, desc="ig", on_step=lambda k, a, sums: accumulate(k, a, sums),
                       forward_alphas=(1.0,))
    loss_q, points = points[-1].loss, points[:-1]
    attr = {}
    for n in names:   # in place: the integral becomes the attribution, weight by weight (the model is at W again)
        # detached: the parameter requires grad, and `integral.mul_(Q − W)` would record a MulBackward that saves the
        # weight-sized Q − W, 4 · P_lin held unseen by the garbage collector (0.8.7's +0.43 GB, found in 0.8.8)
        w = model.get_parameter(n).detach()
        attr[n] = integral.pop(n).mul_(quantized[n].float().to(w.device) - w.float())
    comp = completeness(attr, loss_w, loss_q, points)
    if not math.isfinite(comp.attributed):
        raise UsageError("integrated gradients are not finite on these items (a NaN loss along the path)")
    return attr, comp


def denoising_attribution(model, tokenizer, examples, cover: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
                          calib, *, model_path: str | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """``atp-denoise``: ``{HF weight name: [out, in]}`` float32 ``ΣG(W') · (values − W)`` where
    ``W'`` is the model with the entries of ``cover`` (``{name: [out, in] bool}``, e.g. the union of
    every query head) set to ``values`` and ``ΣG(W')`` the summed per-sample gradient there.

    Signed like ``atp``: a unit's sum predicts ``L(W') − L(W' with the unit back at W)`` to first
    order, the loss its restoration saves (positive: the unit's 16-bit weights matter in the
    replaced model). Weights outside ``cover`` keep ``W`` in ``W'``; their entries here are the same
    product at ``W'``. The model's weights are restored bit for bit, also on an error.

    Cost: one gradient pass over ``examples``. Memory: a copy of the covered weights (``2 · P``
    bytes of the covered weights' dtype) and one gradient statistic (``4 · P_lin``) beside the
    caller's ``values``."""
    path = model_path or getattr(model.config, "_name_or_path", "") or "model"
    with replaced(model, cover, values):
        st = collect_stats(model, tokenizer, examples, path, batch_size=calib.batch_size, seq_len=calib.seq_len,
                           stats=("sum",), progress=progress, batch_tokens=calib.batch_tokens,
                           attention=calib.attention, loss=calib.loss, recompute=calib.recompute,
                           objective=calib.objective)["stats"]
    g = st.tensors["sum"]
    return {n: atp(g[n].to(values[n].device), model.get_parameter(n).detach().to(values[n].device), values[n])
            for n in values if n in g}


def _detached(x):
    if torch.is_tensor(x):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(v) for v in x)
    return x


def sublayer_of(entries) -> str:
    """The module that holds every weight of a unit: the common parent of its modules, e.g.
    ``model.layers.3.self_attn`` for a query head (its q rows and o columns)."""
    parents = {n.rsplit(".", 2)[0] for n in entries}
    if len(parents) == 1:
        return parents.pop()
    common = {p.rsplit(".", 1)[0] for p in parents}
    if len(common) != 1:
        raise UsageError(f"a unit spans several sublayers ({', '.join(sorted(parents))}); estimator atp-local "
                         "needs each unit inside one attention or MLP block")
    return common.pop()


@torch.no_grad()
def _patched_output(run, model, entries, values):
    """``run()`` with ``entries`` of the model's weights set to ``values`` (restored after, also on an error)."""
    saved = {}
    try:
        for n, m in entries.items():
            p = model.get_parameter(n)
            m = m.to(p.device)
            saved[n] = (m, p.data[m].clone())
            p.data[m] = values[n].to(p.device, p.dtype)[m]
        out = run()
    finally:
        for n, (m, old) in saved.items():
            model.get_parameter(n).data[m] = old
    return out[0] if isinstance(out, tuple) else out


def _hidden_in(args, kwargs):
    """The hidden states a decoder layer was called with (first positional, or ``hidden_states=``)."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    return ((h,) + tuple(args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": h})


def _layer_of(entries) -> int:
    layers = {p[0] for p in (parse_name(n) for n in entries) if p}
    if len(layers) != 1 or any(parse_name(n) is None for n in entries):
        raise UsageError("estimator atp-window needs each unit inside one decoder layer; "
                         f"this one spans {sorted(layers) or 'weights outside the layers'}")
    return layers.pop()


def _run_layers(layers, calls, first: int, last: int, h=None):
    """Decoder layers ``first..last`` on their recorded calls (``[(args, kwargs)]``), from the
    recorded input of ``first`` (or ``h``), every later layer fed the previous one's output."""
    for j in range(first, last + 1):
        args, kwargs = calls[j]
        if h is not None:
            args, kwargs = _with_hidden(args, kwargs, h)
        out = layers[j](*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return h


def local_attribution(model, tokenizer, examples, unit_list, values: dict[str, torch.Tensor], calib, *,
                      progress: bool = True, per_item: bool = False, window: int | None = None):
    """``atp-local``: per unit (anything with ``label`` and ``entries`` ``{weight: [out, in] bool}``),
    the predicted change of the summed task loss when the unit's entries take ``values``, with the
    unit's own sublayer (its attention or MLP block) recomputed **exactly** and only what follows
    it linearised: ``Σ_items ⟨∂L/∂y, f(x; W_unit→Q) − f(x; W)⟩`` where ``y = f(x; W)`` is the
    sublayer's output. Attribution patching linearises the softmax too; recomputing it is the
    AtP* correction (Kramár et al., 2024) carried to weights. For a unit in ``o_proj``/``down_proj``
    alone it equals ``ΣG·ΔW`` (the output is linear there).

    Cost: one forward+backward over ``examples`` (the plain HF model, gradients of activations
    only), then per unit and batch one forward of its sublayer. Memory: the autograd graph of one
    batch plus every hooked sublayer's inputs and output for that batch; a batch holds at most
    ``calib.batch_size`` items and ``calib.batch_tokens`` padded tokens (0.8.6; before, ``batch_size``
    items whatever their length: 8 GSM8k items of ~300 tokens). Returns ``{label: float}``;
    with ``per_item`` also ``{label: [n_items] float64}``, each item's own term (the items' losses are
    summed, so item ``j``'s output gradient depends on item ``j`` alone; the terms sum to the total),
    for the estimator's split-half reliability (``circuits.faithfulness.estimator_reliability``), at
    ``8·n_items`` bytes per unit. The model's weights are restored after each unit, also on an error.

    ``window`` (``atp-window``): recompute exactly the unit's whole decoder layer and the ``window``
    layers after it (capped at the last), and linearise only what follows: ``Σ ⟨∂L/∂h_e, h_e(W_unit→Q)
    − h_e(W)⟩`` with ``h_e`` the output of layer ``e = min(l + window, L − 1)``. What a change in layer
    ``l`` does to the attention patterns and MLPs of the next layers is then kept, not linearised.
    Cost per unit and batch: ``window + 1`` layer forwards (``(window + 1) / L`` of a forward pass)
    instead of one sublayer's; memory adds every layer's output gradient for one batch
    (``4 · L · B · T · d`` bytes)."""
    device = next(model.parameters()).device
    by_layer: dict = {}
    for u in unit_list:
        by_layer.setdefault(sublayer_of(u.entries) if window is None else _layer_of(u.entries), []).append(u)
    if window is not None:
        if not isinstance(window, int) or window < 0:
            raise UsageError(f"--window must be a whole number ≥ 0 (decoder layers after the unit's own), got {window!r}")
        layers = model.get_submodule(arch_for(model.config.model_type).layers)
        n_layers = len(layers)
    est = {u.label: 0.0 for u in unit_list}
    tok = tokenize_examples(examples, tokenizer, calib.seq_len, loss=calib.loss)
    items = {u.label: torch.zeros(len(tok.ids), dtype=torch.float64) for u in unit_list} if per_item else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    obj = Objective(calib.objective, tokenizer)
    embed = model.get_input_embeddings()
    # batches of at most batch_size items and batch_tokens padded tokens (as the gradient pass): the graph of
    # one batch is what this holds, so long items (GSM8k, MMLU with shots) go a few at a time
    batches = plan_batches([len(x) for x in tok.ids], calib.batch_size, calib.batch_tokens)
    bar = tqdm(total=len(batches) * len(unit_list), desc="atp-local" if window is None else f"atp-window {window}", unit="unit", disable=not progress)
    wanted = {p: p.requires_grad for p in model.parameters()}   # activations' gradients only
    for p in wanted:
        p.requires_grad_(False)
    try:
        for idx in batches:
            skip = [tok.unscored[j] for j in idx] if tok.unscored is not None else None
            ids, attn, lmask = (t.to(device) for t in collate([tok.ids[j] for j in idx],
                                                              [tok.scored_from[j] for j in idx], pad, skip))
            seen: dict = {}
            hooks = []
            watched = by_layer if window is None else range(n_layers)
            for name in watched:
                def keep(mod, args, kwargs, out, name=name):
                    y = out[0] if isinstance(out, tuple) else out
                    y.retain_grad()
                    seen[name] = (_detached(args), _detached(kwargs), y)
                mod = model.get_submodule(name) if window is None else layers[name]
                hooks.append(mod.register_forward_hook(keep, with_kwargs=True))
            try:
                with torch.enable_grad():
                    x = embed(ids).detach().requires_grad_(True)
                    pos = scored_positions(lmask)
                    logits = model(inputs_embeds=x, attention_mask=attn.long(), use_cache=False,
                                   logits_to_keep=pos).logits
                    losses = obj(logits, ids, lmask, pos, [examples[j] for j in idx])
                    losses[torch.isfinite(losses)].sum().backward()
            finally:
                for h in hooks:
                    h.remove()
            del logits, x
            for name, units_here in by_layer.items():
                if window is None:
                    args, kwargs, y = seen[name]
                    mod = model.get_submodule(name)
                    g = y.grad
                    run = partial(mod, *args, **kwargs)
                else:
                    last = min(name + window, n_layers - 1)
                    g = seen[last][2].grad
                    run = partial(_run_layers, layers, {j: seen[j][:2] for j in range(name, last + 1)}, name, last)
                with torch.no_grad():
                    y0 = run()
                    y0 = y0[0] if isinstance(y0, tuple) else y0
                for u in units_here:
                    y1 = _patched_output(run, model, u.entries, values)
                    terms = (g.double() * (y1 - y0).double()).flatten(1).sum(1)     # [batch], one per item
                    est[u.label] += float(terms.sum())
                    if items is not None:
                        items[u.label][idx] = terms.cpu()
                    bar.update(1)
            seen.clear()
    finally:
        bar.close()
        for p, r in wanted.items():
            p.requires_grad_(r)
    return (est, items) if per_item else est
