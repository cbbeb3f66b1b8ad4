"""Whole-model sequential quantization driver (hooks, devices and progress live here; the
algorithms are the pure cores in ``gptq.py`` and ``quantizer.py``).

Two ways to get each module's Hessian (``QuantizeConfig.hessian``):

* ``sequential`` (GPTQ's recipe, the default): run the calibration sequences (one item each,
  padding masked out of every Hessian) up to the first decoder layer and keep its inputs;
then for each layer, in true-sequential order (q/k/v, then o, then gate/up, then down), run the
layer on the kept inputs only as far as the group's input (a pre-hook stops the forward there),
accumulate the group's Hessian, quantize the group's modules, and move on; finally run the
quantized layer in full and feed its outputs to the next layer. Only the current layer is moved
to ``device``, so a model larger than GPU memory but within CPU RAM works.
* ``shared``: one forward pass of the *unquantized* model collects every module's Hessian at
  once (``collect_hessians``); all modules are then quantized together, batched by shape. The
  Hessians do not see the error of earlier quantized layers, so quality is a little below
  ``sequential``, but the Hessians can be reused for any number of masks and bit widths: this is
  what ``circuitq run`` uses to compare many masks at one budget on a CPU.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, NamedTuple

import torch

from circuitq.config import QuantizeConfig
from circuitq.data.calib import Sequences, as_sequences
from circuitq.model.arch import arch_for, module_name, target_shapes, weight_of
from circuitq.quant.gptq import (GPTQConfig, HessianState, gptq_quantize, gptq_quantize_batch, hessian_error, hessian_update,
                   inverse_hessian_diag)
from circuitq.quant.plan import FULL_PRECISION, BitReport, PrecisionPlan, bit_report
from circuitq.quant.quantizer import QuantizedWeight, QuantSpec, rtn_quantize


def quant_spec(cfg: QuantizeConfig, bits: int | None = None) -> QuantSpec:
    """The grid of one weight under ``cfg`` (at ``bits``, default ``cfg.bits``)."""
    return QuantSpec(bits=cfg.bits if bits is None else bits, group_size=cfg.group_size, sym=cfg.sym, mse=cfg.mse)


def gptq_config(cfg: QuantizeConfig) -> GPTQConfig:
    return GPTQConfig(block_size=cfg.block_size, damp=cfg.damp, act_order=cfg.act_order)


class MethodResult(NamedTuple):
    qweight: QuantizedWeight
    loss: float
    damp: float
    errors: torch.Tensor | None = None   # [out, in] GPTQ's scaled errors (w - q) / U_jj


@dataclass(frozen=True)
class Method:
    needs_hessian: bool
    fn: Callable[[torch.Tensor, torch.Tensor | None, QuantSpec, torch.Tensor | None, QuantizeConfig], MethodResult]


def _gptq(w, H, spec, keep, cfg):
    r = gptq_quantize(w, H, spec, keep, gptq_config(cfg), keep_errors=True)
    return MethodResult(r.qweight, r.loss, r.damp, r.errors)


def _rtn(w, H, spec, keep, cfg):
    return MethodResult(rtn_quantize(w, spec, keep), float("nan"), 0.0)


METHODS: dict[str, Method] = {"gptq": Method(True, _gptq), "rtn": Method(False, _rtn)}


@dataclass
class ModuleRecord:
    name: str
    bits: int
    shape: tuple[int, int]
    nnz: int
    weight_rel_error: float          # ||W - Q||² / ||W||²
    output_rel_error: float | None   # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the calibration inputs
    gptq_loss: float | None
    damp: float
    seconds: float


@dataclass
class QuantizeResult:
    qweights: dict[str, QuantizedWeight]              # module name -> quantized weight
    records: list[ModuleRecord] = field(default_factory=list)
    bits: BitReport | None = None
    seconds: float = 0.0
    unmasked_modules: list[str] = field(default_factory=list)
    hinv_diag: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> [in], if asked
    gptq_errors: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> [out, in], if asked

    def summary(self) -> dict:
        return {"seconds": self.seconds, "bits": self.bits.to_dict() if self.bits else None,
                "modules": [asdict(r) for r in self.records]}


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


def _capture_first_inputs(model, spec, calib, batch_size: int, device) -> tuple[list, list, list]:
    """Run each calibration batch to the first decoder layer; returns its hidden states
    (``[b, L, d]`` per batch), keyword arguments (masks, rotary embeddings) and token masks
    (``[b, L]`` bool: the real tokens) per batch. ``calib``: ``Sequences`` or ``[N, L]`` ids."""
    seqs = as_sequences(calib)
    layers = model.get_submodule(spec.layers)
    moved = [(model.get_submodule(n), next(model.get_submodule(n).parameters(), None)) for n in spec.pre_layers]
    homes = {n: (p.device if p is not None else None) for n, (_, p) in zip(spec.pre_layers, moved)}
    for m, _ in moved:
        m.to(device)
    hidden, kwargs, tmask = [], [], []

    def hook(_mod, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids, mask in _batches(seqs, batch_size, device):
                tmask.append(mask)
                try:
                    model(input_ids=ids, attention_mask=mask.long(), use_cache=False, logits_to_keep=1)
                except _Stop:
                    pass
    finally:
        handle.remove()
        for (m, _), n in zip(moved, spec.pre_layers):
            if homes[n] is not None:
                m.to(homes[n])
    return hidden, kwargs, tmask


def _batches(seqs: Sequences, batch_size: int, device):
    """``(ids [b, L'], mask [b, L'])`` batches on ``device``, cut to the batch's longest item."""
    for b in range(0, seqs.ids.shape[0], batch_size):
        mask = seqs.mask[b:b + batch_size]
        width = int(mask.sum(1).max())
        yield seqs.ids[b:b + batch_size, :width].to(device), mask[:, :width].to(device)


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _group_hessian(layer, mods, hidden, kwargs, tmask) -> HessianState:
    """Accumulate the Hessian of the shared input of ``mods`` over the real tokens of all
    batches (``tmask``), stopping each forward pass at the first of them."""
    in_f = mods[0].weight.shape[1]
    state = [HessianState.zeros(in_f, hidden[0].device)]
    current = [None]

    def pre(_mod, args):
        state[0] = hessian_update(state[0], args[0], current[0])
        raise _Stop

    handles = [m.register_forward_pre_hook(pre) for m in mods]
    try:
        with torch.no_grad():
            for h, kw, tm in zip(hidden, kwargs, tmask):
                current[0] = tm
                try:
                    layer(h, **kw)
                except _Stop:
                    pass
    finally:
        for hd in handles:
            hd.remove()
    return state[0]


def _quantize_module(name, mod, H, spec, keep, cfg, method) -> tuple[QuantizedWeight, ModuleRecord]:
    t0 = time.perf_counter()
    w = mod.weight.data
    if not torch.isfinite(w).all():
        raise FloatingPointError(f"{name}.weight contains NaN/Inf: the model is corrupt; nothing was written")
    r = method.fn(w.float(), H.H if H is not None else None, spec, keep, cfg)
    q = r.qweight.dequantize()
    wf = w.float()
    out_err = None
    if H is not None:
        out_err = hessian_error(wf, q, H.H) / max(hessian_error(wf, torch.zeros_like(wf), H.H), 1e-30)
    rec = ModuleRecord(name, spec.bits, tuple(w.shape), r.qweight.nnz,
                       float(((wf - q) ** 2).sum() / (wf ** 2).sum().clamp(min=1e-30)), out_err,
                       None if r.loss != r.loss else r.loss, r.damp, 0.0)
    mod.weight.data = q.to(w.dtype)
    rec.seconds = time.perf_counter() - t0
    return r.qweight, rec, r.errors


def quantize_model(model: torch.nn.Module, calib: Sequences | torch.Tensor | None, plan: PrecisionPlan,
                   cfg: QuantizeConfig = QuantizeConfig(), masks: dict[str, torch.Tensor] | None = None,
                   device: str | torch.device | None = None, progress: bool = True,
                   keep_hinv: bool = False, hessians: dict[str, HessianState] | None = None) -> QuantizeResult:
    """Quantize every targeted linear weight of ``model`` in place (weights become their
    dequantized values) and return the quantized representation for export.

    ``calib``: ``Sequences`` (right-padded items with their token masks) or ``[N, L]`` token ids
    (needed by GPTQ); ``masks``: ``{weight name: [out, in] bool}``
    of entries kept in 16-bit; ``device``: where each layer runs (default: the model's device);
    ``keep_hinv``: also return each module's inverse-Hessian diagonal and GPTQ's scaled errors
    ``(w - q) / U_jj`` (SpQR's sensitivity, ``result.gptq_errors``);
    ``hessians``: ``{module name: HessianState}`` from ``collect_hessians`` (implies the shared mode;
    reused across calls without another forward pass).
    """
    from tqdm.auto import tqdm

    if cfg.method not in METHODS:
        raise ValueError(f"unknown method '{cfg.method}'; choose one of {sorted(METHODS)}")
    method = METHODS[cfg.method]
    if method.needs_hessian and calib is None and hessians is None:
        raise ValueError(f"method '{cfg.method}' needs calibration data")
    spec_arch = arch_for(model.config.model_type)
    shapes = target_shapes(model)
    masks = masks or {}
    device = torch.device(device) if device is not None else next(model.parameters()).device
    t_start = time.perf_counter()
    result = QuantizeResult({}, unmasked_modules=[k for k in shapes if k not in masks] if masks else [])
    if method.needs_hessian and (hessians is not None or cfg.hessian == "shared"):
        if hessians is None:
            hessians = collect_hessians(model, calib, cfg.batch_size, device, progress)
        _quantize_shared(model, hessians, plan, cfg, masks, device, result, keep_hinv, progress)
        return _finish(result, shapes, plan, cfg, t_start)
    layers = model.get_submodule(spec_arch.layers)
    hidden = kwargs = tmask = None
    if method.needs_hessian:
        hidden, kwargs, tmask = _capture_first_inputs(model, spec_arch, calib, cfg.batch_size, device)
    bar = tqdm(range(len(layers)), desc=f"{cfg.method} {cfg.bits}-bit", unit="layer", disable=not progress)
    for i in bar:
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        for group in spec_arch.groups:
            todo = [(f"{spec_arch.layers}.{i}.{n}", layer.get_submodule(n)) for n in group]
            todo = [(n, m) for n, m in todo if plan.bits_for(weight_of(n)) < FULL_PRECISION]
            if not todo:
                continue
            H = _group_hessian(layer, [layer.get_submodule(n) for n in group], hidden, kwargs, tmask) if hidden else None
            for name, mod in todo:
                if keep_hinv and H is not None:
                    result.hinv_diag[weight_of(name)] = inverse_hessian_diag(H.H, cfg.damp).cpu()
                keep = masks.get(weight_of(name))
                keep = keep.to(device) if keep is not None else None
                qw, rec, errors = _quantize_module(name, mod, H, quant_spec(cfg, plan.bits_for(weight_of(name))), keep,
                                                   cfg, method)
                result.qweights[name] = qw.to("cpu")
                if keep_hinv and errors is not None:
                    result.gptq_errors[weight_of(name)] = errors.cpu()
                result.records.append(rec)
                bar.set_postfix_str(f"{name.split('.')[-1]} err {rec.output_rel_error or rec.weight_rel_error:.2e}")
        if hidden is not None:
            with torch.no_grad():
                hidden = [_first_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
            if not all(torch.isfinite(h).all() for h in hidden):
                raise FloatingPointError(f"layer {i} produced NaN/Inf outputs after quantization")
        layer.to(home)
    return _finish(result, shapes, plan, cfg, t_start)


def _finish(result: QuantizeResult, shapes, plan, cfg, t_start) -> QuantizeResult:
    nnz = {weight_of(r.name): r.nnz for r in result.records}
    result.bits = bit_report(shapes, plan, cfg.group_size, nnz)
    result.seconds = time.perf_counter() - t_start
    return result


def collect_hessians(model: torch.nn.Module, calib: Sequences | torch.Tensor, batch_size: int = 8, device=None,
                     progress: bool = True) -> dict[str, HessianState]:
    """Hessians of every targeted module's input in one pass of the unquantized model.

    ``calib``: ``Sequences`` (only real tokens count) or ``[N, L]`` token ids. Returns ``{module
    name: HessianState}``; modules that share an input (q/k/v, gate/up) share one state object."""
    from tqdm.auto import tqdm

    seqs = as_sequences(calib)
    current = [None]
    spec = arch_for(model.config.model_type)
    layers = model.get_submodule(spec.layers)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    states: dict[str, HessianState] = {}
    handles = []
    for i, layer in enumerate(layers):
        for group in spec.groups:
            key = f"{spec.layers}.{i}.{group[0]}"
            states[key] = HessianState.zeros(layer.get_submodule(group[0]).weight.shape[1], device)

            def pre(_mod, args, key=key):
                states[key] = hessian_update(states[key], args[0], current[0])
            handles.append(layer.get_submodule(group[0]).register_forward_pre_hook(pre))
    home = next(model.parameters()).device
    model.to(device)
    try:
        with torch.no_grad():
            n_batches = -(-seqs.ids.shape[0] // batch_size)
            for ids, mask in tqdm(_batches(seqs, batch_size, device), total=n_batches, desc="hessians", unit="batch",
                                  disable=not progress):
                current[0] = mask
                model(input_ids=ids, attention_mask=mask.long(), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        model.to(home)
    out = {}
    for i in range(len(layers)):
        for group in spec.groups:
            for n in group:
                out[f"{spec.layers}.{i}.{n}"] = states[f"{spec.layers}.{i}.{group[0]}"]
    return out


def _quantize_shared(model, hessians, plan, cfg, masks, device, result: QuantizeResult, keep_hinv, progress,
                     max_elems: int = 2 ** 26) -> None:
    """Quantize every targeted module against its given Hessian, batching modules of one shape
    and bit width through ``gptq_quantize_batch`` (chunks of at most ``max_elems`` weights)."""
    from tqdm.auto import tqdm

    names = [module_name(n) for n in target_shapes(model)]
    missing = [n for n in names if n not in hessians]
    if missing:
        raise ValueError(f"no Hessian for {len(missing)} modules, e.g. {missing[0]}; collect them from this model")
    buckets: dict[tuple, list[str]] = {}
    for n in names:
        bits = plan.bits_for(weight_of(n))
        if bits < FULL_PRECISION:
            buckets.setdefault((tuple(model.get_submodule(n).weight.shape), bits), []).append(n)
    bar = tqdm(total=sum(len(v) for v in buckets.values()), desc=f"gptq {cfg.bits}-bit (shared H)", unit="module",
               disable=not progress)
    for (shape, bits), group in buckets.items():
        step = max(1, max_elems // (shape[0] * shape[1]))
        spec = quant_spec(cfg, bits)
        for c in range(0, len(group), step):
            chunk = group[c:c + step]
            t0 = time.perf_counter()
            mods = [model.get_submodule(n) for n in chunk]
            for n, m in zip(chunk, mods):
                if not torch.isfinite(m.weight).all():
                    raise FloatingPointError(f"{n}.weight contains NaN/Inf: the model is corrupt; nothing was written")
            W = torch.stack([m.weight.detach().float() for m in mods]).to(device)
            H = torch.stack([hessians[n].H for n in chunk]).to(device)
            keep = None
            if any(weight_of(n) in masks for n in chunk):
                keep = torch.stack([masks[weight_of(n)].to(device) if weight_of(n) in masks else
                                    torch.zeros(shape, dtype=torch.bool, device=device) for n in chunk])
            res = gptq_quantize_batch(W, H, spec, keep, gptq_config(cfg), keep_errors=keep_hinv)
            dt = (time.perf_counter() - t0) / len(chunk)
            for b, (n, m, r) in enumerate(zip(chunk, mods, res)):
                wf, q = W[b], r.weight
                out_err = hessian_error(wf, q, H[b]) / max(hessian_error(wf, torch.zeros_like(wf), H[b]), 1e-30)
                result.records.append(ModuleRecord(n, bits, tuple(shape), r.qweight.nnz,
                                                   float(((wf - q) ** 2).sum() / (wf ** 2).sum().clamp(min=1e-30)),
                                                   out_err, r.loss, r.damp, dt))
                if keep_hinv:
                    result.hinv_diag[weight_of(n)] = inverse_hessian_diag(H[b], cfg.damp).cpu()
                    result.gptq_errors[weight_of(n)] = r.errors.cpu()
                m.weight.data = q.to(m.weight.device, m.weight.dtype)
                result.qweights[n] = r.qweight.to("cpu")
            bar.update(len(chunk))
    bar.close()
    order = {n: i for i, n in enumerate(names)}
    result.records.sort(key=lambda r: order[r.name])
    result.qweights = dict(sorted(result.qweights.items(), key=lambda kv: order[kv[0]]))


def quantize_copy(model: torch.nn.Module, cfg: QuantizeConfig, calib: torch.Tensor | None = None,
                  hessians: dict[str, HessianState] | None = None, masks: dict[str, torch.Tensor] | None = None,
                  device: str | torch.device | None = None, progress: bool = True,
                  keep_hinv: bool = False) -> tuple[torch.nn.Module, QuantizeResult]:
    """A quantized deep copy of ``model`` (the original is untouched) and its ``QuantizeResult``.

    ``cfg.hessian == "shared"`` uses ``hessians`` (from ``collect_hessians``; collected from
    ``calib`` when not given); ``sequential`` runs GPTQ layer by layer on ``calib`` (``[N, L]``
    token ids). RTN needs neither."""
    import copy

    twin = copy.deepcopy(model)
    needs_h = METHODS[cfg.method].needs_hessian
    if needs_h and cfg.hessian == "shared" and hessians is None:
        if calib is None:
            raise ValueError("shared-Hessian GPTQ needs calibration tokens or collected Hessians")
        hessians = collect_hessians(model, calib, cfg.batch_size, device, progress)
    res = quantize_model(twin, calib if needs_h and cfg.hessian == "sequential" else None,
                         PrecisionPlan(cfg.bits), cfg, masks, device, progress=progress, keep_hinv=keep_hinv,
                         hessians=hessians if needs_h and cfg.hessian == "shared" else None)
    return twin, res


class Reference(NamedTuple):
    """``Q(W)``: what quantization without any 16-bit weight makes of every targeted weight.

    ``weights``: ``{HF weight name: [out, in]}`` in the model's dtype; ``hinv_diag``:
    ``{HF weight name: [in]}`` inverse-Hessian diagonals (GPTQ only, when asked); ``config``:
    the quantizer that made it."""

    weights: dict[str, torch.Tensor]
    hinv_diag: dict[str, torch.Tensor]
    config: QuantizeConfig
    errors: dict[str, torch.Tensor] | None = None   # {HF weight name: [out, in]} GPTQ's scaled errors (need_hinv)


def reference_quantization(model: torch.nn.Module, cfg: QuantizeConfig, calib: torch.Tensor | None = None,
                           hessians: dict[str, HessianState] | None = None, need_hinv: bool = False,
                           device: str | torch.device | None = None, progress: bool = False) -> Reference:
    """The one definition of ``Q(W)`` for every saliency method and entry point: mask-free
    quantization of a copy of ``model`` with exactly the final quantizer's settings ``cfg``
    (bits, group size, grid, GPTQ settings, Hessian mode). ``cfg.method`` picks GPTQ or RTN."""
    twin, res = quantize_copy(model, cfg, calib, hessians, None, device, progress, keep_hinv=need_hinv)
    q = {weight_of(n): twin.get_submodule(n).weight.detach() for n in res.qweights}
    return Reference(q, res.hinv_diag, cfg, res.gptq_errors)
