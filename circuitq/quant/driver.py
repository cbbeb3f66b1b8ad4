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

import copy
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from circuitq.config import QuantizeConfig
from circuitq.data.calib import Sequences
from circuitq.errors import NumericError, UsageError
from circuitq.model.arch import arch_for, module_name, target_shapes, weight_of
from circuitq.quant.gptq import (
    Factor,
    GPTQConfig,
    GPTQResult,
    HessianState,
    gptq_quantize,
    gptq_quantize_batch,
    hessian_error,
    hessian_factor,
    hessian_update,
    hinv_diag_from_factor,
    inverse_hessian_diag,
)
from circuitq.quant.hessians import (  # noqa: F401
    HessianFile,
    _Stop,
    batches,
    capture_first_inputs,
    collect_hessians,
    first_output,
    write_hessians,
)
from circuitq.quant.plan import FULL_PRECISION, BitReport, PrecisionPlan, bit_report
from circuitq.quant.quantizer import QuantizedWeight, QuantSpec, rtn_quantize
from circuitq.storage import ParameterBackup


def quant_spec(cfg: QuantizeConfig, bits: int | None = None) -> QuantSpec:
    """The grid of one weight under ``cfg`` (at ``bits``, default ``cfg.bits``)."""
    return QuantSpec(bits=cfg.bits if bits is None else bits, group_size=cfg.group_size, sym=cfg.sym, mse=cfg.mse)


def check_group_size(model, cfg: QuantizeConfig) -> None:
    """Refuse, before any work, a group size that does not divide every targeted input dimension."""
    spec = quant_spec(cfg)
    for _, in_f in target_shapes(model).values():
        spec.n_groups(in_f)


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
        raise NumericError(f"{name}.weight contains NaN/Inf: the model is corrupt; nothing was written")
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
                   cfg: QuantizeConfig = QuantizeConfig(), *, masks: dict[str, torch.Tensor] | None = None,
                   device: str | torch.device | None = None, progress: bool = True,
                   keep_hinv: bool = False, hessians: dict[str, HessianState] | HessianFile | None = None,
                   output_error: bool = True, pack: bool = True) -> QuantizeResult:
    """Quantize every targeted linear weight of ``model`` in place (weights become their
    dequantized values) and return the quantized representation for export.

    ``calib``: ``Sequences`` (right-padded items with their token masks) or ``[N, L]`` token ids
    (needed by GPTQ); ``masks``: ``{weight name: [out, in] bool}``
    of entries kept in 16-bit; ``device``: where each layer runs (default: the model's device);
    ``keep_hinv``: also return each module's inverse-Hessian diagonal and GPTQ's scaled errors
    ``(w - q) / U_jj`` (SpQR's sensitivity, ``result.gptq_errors``);
    ``hessians``: ``{module name: HessianState}`` from ``collect_hessians`` or a ``HessianFile``
    (implies the shared mode; reused across calls without another forward pass);
    ``output_error``: record each module's ``tr(ΔW H ΔWᵀ)`` (shared mode); ``pack``: keep the packed
    weights in ``result.qweights`` for an export (``P_lin`` bytes of codes and more; a run that
    only evaluates passes False). Memory in shared mode: one ``gptq_stream`` chunk.
    """
    if cfg.method not in METHODS:
        raise UsageError(f"unknown method '{cfg.method}'; choose one of {sorted(METHODS)}")
    method = METHODS[cfg.method]
    if method.needs_hessian and calib is None and hessians is None:
        raise UsageError(f"method '{cfg.method}' needs calibration data")
    spec_arch = arch_for(model.config.model_type)
    shapes = target_shapes(model)
    masks = masks or {}
    device = torch.device(device) if device is not None else next(model.parameters()).device
    t_start = time.perf_counter()
    result = QuantizeResult({}, unmasked_modules=[k for k in shapes if k not in masks] if masks else [])
    if method.needs_hessian and (hessians is not None or cfg.hessian == "shared"):
        if hessians is None:
            hessians = collect_hessians(model, calib, cfg.batch_size, device, progress)
        _quantize_shared(model, hessians, plan, cfg, masks=masks, device=device, result=result, keep_hinv=keep_hinv,
                         progress=progress, output_error=output_error, pack=pack)
        return _finish(result, shapes, plan, cfg, t_start)
    layers = model.get_submodule(spec_arch.layers)
    hidden = kwargs = tmask = None
    if method.needs_hessian:
        hidden, kwargs, tmask = capture_first_inputs(model, spec_arch, calib, cfg.batch_size, device)
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
                if pack:
                    result.qweights[name] = qw.to("cpu")
                if keep_hinv and errors is not None:
                    result.gptq_errors[weight_of(name)] = errors.cpu()
                result.records.append(rec)
                bar.set_postfix_str(f"{name.split('.')[-1]} err {rec.output_rel_error or rec.weight_rel_error:.2e}")
        if hidden is not None:
            with torch.no_grad():
                hidden = [first_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
            if not all(torch.isfinite(h).all() for h in hidden):
                raise NumericError(f"layer {i} produced NaN/Inf outputs after quantization")
        layer.to(home)
    return _finish(result, shapes, plan, cfg, t_start)


def _finish(result: QuantizeResult, shapes, plan, cfg, t_start) -> QuantizeResult:
    nnz = {weight_of(r.name): r.nnz for r in result.records}
    result.bits = bit_report(shapes, plan, cfg.group_size, nnz)
    result.seconds = time.perf_counter() - t_start
    return result


class ModuleQuant(NamedTuple):
    """One module's mask-aware GPTQ from ``gptq_stream``: ``weight`` ``[out, in]`` float32 as it
    was (on ``device``), ``result`` (``qweight``, dequantized ``weight``, ``loss``, ``damp``,
    ``errors`` if asked), its ``factor`` (``U``: ``[in, in]``), and seconds per module."""

    name: str
    bits: int
    weight: torch.Tensor
    result: GPTQResult
    factor: Factor
    seconds: float


def _chunks(model, names, plan, max_elems: int):
    """Modules batched by (shape, bits) in chunks of at most ``max_elems`` weight + Hessian entries."""
    buckets: dict[tuple, list[str]] = {}
    for n in names:
        bits = plan.bits_for(weight_of(n))
        if bits < FULL_PRECISION:
            buckets.setdefault((tuple(model.get_submodule(n).weight.shape), bits), []).append(n)
    for (shape, bits), group in buckets.items():
        step = max(1, max_elems // (shape[0] * shape[1] + shape[1] * shape[1]))
        for c in range(0, len(group), step):
            yield shape, bits, group[c:c + step]


def _factors(hessians, chunk, cfg) -> list[Factor]:
    """GPTQ's factor of each module's Hessian: stored ones from a ``HessianFile``, else computed
    once per shared Hessian (q/k/v and gate/up share theirs)."""
    if isinstance(hessians, HessianFile) and not cfg.act_order:
        return [hessians.factor(n, cfg.damp) for n in chunk]
    made: dict[int, Factor] = {}
    out = []
    for n in chunk:
        st = hessians[n]
        if id(st) not in made:
            made[id(st)] = hessian_factor(st.H, cfg.damp)
        out.append(made[id(st)])
    return out


def gptq_stream(model, hessians, plan: PrecisionPlan, cfg: QuantizeConfig, *, masks=None, device=None,
                progress: bool = True, keep_errors: bool = False, max_elems: int = 2 ** 23):
    """Mask-aware GPTQ of every targeted module of ``model`` against given Hessians (shared
    mode), yielding one ``ModuleQuant`` per module; the model is not modified. Modules of one shape
    and bit width are batched through ``gptq_quantize_batch`` in chunks of at most ``max_elems``
    weight + Hessian entries. Memory: one chunk, about ``4 · (7 + keep_errors) · max_elems`` bytes
    (235 MB at the default) plus what the consumer keeps. ``hessians``: ``{module name:
    HessianState}`` or a ``HessianFile`` (read a chunk at a time, factors reused)."""
    masks = masks or {}
    device = torch.device(device) if device is not None else next(model.parameters()).device
    names = [module_name(n) for n in target_shapes(model)]
    missing = [n for n in names if n not in hessians]
    if missing:
        raise UsageError(f"no Hessian for {len(missing)} modules, e.g. {missing[0]}; collect them from this model")
    todo = [n for n in names if plan.bits_for(weight_of(n)) < FULL_PRECISION]
    bar = tqdm(total=len(todo), desc=f"gptq {cfg.bits}-bit (shared H)", unit="module", disable=not progress)
    for shape, bits, chunk in _chunks(model, names, plan, max_elems):
        t0 = time.perf_counter()
        mods = [model.get_submodule(n) for n in chunk]
        for n, m in zip(chunk, mods):
            if not torch.isfinite(m.weight).all():
                raise NumericError(f"{n}.weight contains NaN/Inf: the model is corrupt; nothing was written")
        W = torch.stack([m.weight.detach().float() for m in mods]).to(device)
        fac = _factors(hessians, chunk, cfg)
        keep = None
        if any(weight_of(n) in masks for n in chunk):
            keep = torch.stack([masks[weight_of(n)].to(device) if weight_of(n) in masks else
                                torch.zeros(shape, dtype=torch.bool, device=device) for n in chunk])
        res = gptq_quantize_batch(W, None, quant_spec(cfg, bits), keep, gptq_config(cfg), keep_errors=keep_errors,
                                  factors=[Factor(f.U.to(device), f.damp, f.dead.to(device)) for f in fac]) \
            if not cfg.act_order else \
            gptq_quantize_batch(W, torch.stack([hessians[n].H for n in chunk]).to(device), quant_spec(cfg, bits), keep,
                                gptq_config(cfg), keep_errors=keep_errors)
        dt = (time.perf_counter() - t0) / len(chunk)
        for b, n in enumerate(chunk):
            yield ModuleQuant(n, bits, W[b], res[b], fac[b], dt)
        del W, res, keep, fac
        bar.update(len(chunk))
    bar.close()


def _quantize_shared(model, hessians, plan, cfg, *, masks, device, result: QuantizeResult, keep_hinv, progress,
                     output_error: bool = True, pack: bool = True) -> None:
    """``gptq_stream`` written into ``model`` (each weight becomes its dequantized value) and
    ``result`` (packed weights, records; with ``keep_hinv`` also ``diag(H⁻¹)`` and GPTQ's scaled
    errors). ``output_error``: measure ``tr(ΔW H ΔWᵀ)`` per module (reads each Hessian again)."""
    names = [module_name(n) for n in target_shapes(model)]
    for mq in gptq_stream(model, hessians, plan, cfg, masks=masks, device=device, progress=progress,
                          keep_errors=keep_hinv):
        n, r, wf, q = mq.name, mq.result, mq.weight, mq.result.weight
        out_err = None
        if output_error:
            H = hessians[n].H.to(wf.device)
            out_err = hessian_error(wf, q, H) / max(hessian_error(wf, torch.zeros_like(wf), H), 1e-30)
        result.records.append(ModuleRecord(n, mq.bits, tuple(wf.shape), r.qweight.nnz,
                                           float(((wf - q) ** 2).sum() / (wf ** 2).sum().clamp(min=1e-30)),
                                           out_err, r.loss, r.damp, mq.seconds))
        if keep_hinv:
            result.hinv_diag[weight_of(n)] = hinv_diag_from_factor(mq.factor.U).cpu()
            result.gptq_errors[weight_of(n)] = r.errors.cpu()
        m = model.get_submodule(n)
        m.weight.data = q.to(m.weight.device, m.weight.dtype)
        if pack:
            result.qweights[n] = r.qweight.to("cpu")
    order = {n: i for i, n in enumerate(names)}
    result.records.sort(key=lambda r: order[r.name])
    result.qweights = dict(sorted(result.qweights.items(), key=lambda kv: order[kv[0]]))


def quantize_copy(model: torch.nn.Module, cfg: QuantizeConfig, calib: torch.Tensor | None = None,
                  *, hessians: dict[str, HessianState] | None = None, masks: dict[str, torch.Tensor] | None = None,
                  device: str | torch.device | None = None, progress: bool = True,
                  keep_hinv: bool = False) -> tuple[torch.nn.Module, QuantizeResult]:
    """A quantized deep copy of ``model`` (the original is untouched) and its ``QuantizeResult``.

    ``cfg.hessian == "shared"`` uses ``hessians`` (from ``collect_hessians``; collected from
    ``calib`` when not given); ``sequential`` runs GPTQ layer by layer on ``calib`` (``[N, L]``
    token ids). RTN needs neither."""
    twin = copy.deepcopy(model)
    needs_h = METHODS[cfg.method].needs_hessian
    if needs_h and cfg.hessian == "shared" and hessians is None:
        if calib is None:
            raise UsageError("shared-Hessian GPTQ needs calibration tokens or collected Hessians")
        hessians = collect_hessians(model, calib, cfg.batch_size, device, progress)
    res = quantize_model(twin, calib if needs_h and cfg.hessian == "sequential" else None,
                         PrecisionPlan(cfg.bits), cfg, masks=masks, device=device, progress=progress, keep_hinv=keep_hinv,
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


class QWModule(NamedTuple):
    """``Q(W)`` of one module from ``qw_stream``: ``name`` (HF weight name), ``weight`` and
    ``quantized`` ``[out, in]`` in the model's dtype, ``hinv_diag`` ``[in]`` and ``errors``
    ``[out, in]`` (GPTQ only, when asked; else None)."""

    name: str
    weight: torch.Tensor
    quantized: torch.Tensor
    hinv_diag: torch.Tensor | None
    errors: torch.Tensor | None


def qw_stream(model: torch.nn.Module, cfg: QuantizeConfig, calib=None, *, hessians=None, need_hinv: bool = False,
              device=None, progress: bool = False):
    """``Q(W)`` module by module (``QWModule``), never modifying ``model``: shared-Hessian GPTQ
    and RTN hold one chunk of modules at a time (``gptq_stream``); sequential GPTQ needs the partly
    quantized model, so it quantizes a copy (``+4P`` bytes) and yields from it."""
    needs_h = METHODS[cfg.method].needs_hessian
    if needs_h and cfg.hessian == "sequential" and hessians is None:
        yield from _sequential_qw(model, cfg, calib, need_hinv, device, progress)
        return
    if not needs_h:
        spec = quant_spec(cfg)
        for w in target_shapes(model):
            W = model.get_parameter(w).detach()
            q = rtn_quantize(W.float(), spec, None).dequantize().to(W.dtype)
            yield QWModule(w, W, q, None, None)
        return
    if hessians is None:
        if calib is None:
            raise UsageError("shared-Hessian GPTQ needs calibration tokens or collected Hessians")
        hessians = collect_hessians(model, calib, cfg.batch_size, device, progress)
    for mq in gptq_stream(model, hessians, PrecisionPlan(cfg.bits), cfg, masks=None, device=device, progress=progress,
                          keep_errors=need_hinv):
        w = weight_of(mq.name)
        W = model.get_parameter(w).detach()
        yield QWModule(w, W, mq.result.weight.to(W.device, W.dtype),
                        hinv_diag_from_factor(mq.factor.U).cpu() if need_hinv else None,
                        mq.result.errors.cpu() if need_hinv else None)


def _sequential_qw(model, cfg, calib, need_hinv, device, progress):
    """Sequential GPTQ needs the partly quantized model: quantize ``model`` in place (its
    weights saved to a temporary file first, ``storage.ParameterBackup``), yield, restore."""
    names = list(target_shapes(model))
    fd, path = tempfile.mkstemp(prefix="circuitq-originals-", suffix=".safetensors")
    os.close(fd)
    backup = ParameterBackup(model, names, path)
    try:
        res = quantize_model(model, calib, PrecisionPlan(cfg.bits), cfg, device=device, progress=progress,
                             keep_hinv=need_hinv, pack=False)
        for w in names:
            yield QWModule(w, backup.saved(w).to(model.get_parameter(w).device),
                            model.get_parameter(w).detach().clone(), res.hinv_diag.get(w), res.gptq_errors.get(w))
    finally:
        backup.restore()
        backup.close()


def qw_quantization(model: torch.nn.Module, cfg: QuantizeConfig, calib: torch.Tensor | None = None,
                    *, hessians: dict[str, HessianState] | None = None, need_hinv: bool = False,
                    device: str | torch.device | None = None, progress: bool = False) -> Reference:
    """The one definition of ``Q(W)`` for every saliency method and entry point: mask-free
    quantization of ``model``'s weights with exactly the final quantizer's settings ``cfg`` (bits,
    group size, grid, GPTQ settings, Hessian mode). ``cfg.method`` picks GPTQ or RTN. Holds every
    ``Q(W)`` (``4 · P_lin`` bytes, ``+8 · P_lin`` with ``need_hinv``); ``qw_stream`` gives
    them one module at a time."""
    q, hinv, err = {}, {}, {}
    for r in qw_stream(model, cfg, calib, hessians=hessians, need_hinv=need_hinv, device=device, progress=progress):
        q[r.name] = r.quantized
        if r.hinv_diag is not None:
            hinv[r.name], err[r.name] = r.hinv_diag, r.errors
    return Reference(q, hinv, cfg, err)
