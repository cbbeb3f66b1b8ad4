"""Saliency methods: pure functions of accumulated statistics, ``W`` and ``Q(W)``.

TaCQ (Xiao et al., 2025) scores weight ``w_ij`` by an attribution-patching estimate of the loss
change that quantizing it causes: ``|Σ_s |G_s|| · |W − Q(W)| · |W|``, where ``G_s`` is sample
``s``'s weight gradient and ``Q`` is mask-free GPTQ at the target bits. The other methods are the
usual baselines. Every method maps ``{HF weight name: [out, in]}`` inputs to ``[out, in]`` float32
scores (higher = keep in 16-bit).

| method | score | needs |
| --- | --- | --- |
| ``tacq`` | Σ_s abs(G_s) · abs(W − Q_gptq(W)) · abs(W) | sum_abs, GPTQ |
| ``tacq-rtn`` | Σ_s abs(G_s) · abs(W − Q_rtn(W)) · abs(W) | sum_abs, RTN |
| ``taylor`` | abs(Σ_s G_s ⊙ (Q(W) − W)) (attribution patching) | sum, GPTQ |
| ``grad`` | Σ_s abs(G_s) | sum_abs |
| ``fisher`` | Σ_s G_s² | sum_sq |
| ``magnitude`` | abs(W) | — |
| ``spqr`` | ((W − Q(W)) / U_jj)² during GPTQ, relative to the layer's mean (SpQR) | GPTQ errors |
| ``wanda`` | abs(W) · ‖X_j‖ (Wanda, Sun et al. 2023; not AWQ) | act_sq |
| ``random`` | seeded uniform | — |

Worked example (``tacq``, one weight): ``Σ|G| = 2``, ``W = 0.5``, ``Q(W) = 0.25`` gives
``2 · 0.25 · 0.5 = 0.25``.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from circuitq.errors import UsageError


@dataclass
class SaliencyInputs:
    """``weights``/``quantized``: ``{name: [out, in]}``; ``stats``: ``{stat: {name: tensor}}``
    (``act_sq`` is ``[in]``); ``hinv_diag``: ``{name: [in]}``."""

    weights: dict[str, torch.Tensor]
    quantized: dict[str, torch.Tensor] | None = None
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    hinv_diag: dict[str, torch.Tensor] | None = None
    seed: int = 0
    errors: dict[str, torch.Tensor] | None = None   # {name: [out, in]} GPTQ's scaled errors (w - q) / U_jj


@dataclass(frozen=True)
class SaliencyMethod:
    stats: tuple[str, ...]        # accumulated statistics it reads
    quantizer: str | None         # "gptq", "rtn" or None: which Q(W) it needs
    hessian: bool                 # needs the GPTQ inverse-Hessian diagonal
    fn: Callable[[str, SaliencyInputs], torch.Tensor]
    # linear in its statistics (W and Q(W) fixed): its value over a set of items is the sum of its
    # values over the parts of the set, so halves of the items give a split-half reliability
    additive: bool = False

    @property
    def task_free(self) -> bool:
        """Reads neither calibration statistics nor a calibrated Q(W): the same for every task."""
        return not self.stats and self.quantizer is None and not self.hessian


def _w(inp: SaliencyInputs, n: str) -> torch.Tensor:
    return inp.weights[n].float()


def _dq(inp: SaliencyInputs, n: str) -> torch.Tensor:
    return inp.quantized[n].float() - _w(inp, n)


def _random(n: str, inp: SaliencyInputs) -> torch.Tensor:
    g = torch.Generator().manual_seed(inp.seed * 1_000_003 + zlib.crc32(n.encode()))
    return torch.rand(inp.weights[n].shape, generator=g).to(inp.weights[n].device)


def _spqr(n: str, inp: SaliencyInputs) -> torch.Tensor:
    """SpQR's sensitivity (Dettmers et al., 2023): ``err² = ((w − q) / U_jj)²`` with ``U`` the upper
    Cholesky factor of ``H⁻¹`` and the error as mask-free GPTQ made it (after the compensation of
    earlier columns), relative to the layer's mean ``err²``, so a global top-k is SpQR's per-layer
    relative threshold tuned to the same count. Without GPTQ's errors (a bare ``Q(W)``) it falls
    back to ``(W − Q)² / [H⁻¹]_jj``, the same units."""
    if inp.errors is not None and n in inp.errors:
        e2 = inp.errors[n].float().to(inp.weights[n].device) ** 2
    else:
        e2 = _dq(inp, n) ** 2 / inp.hinv_diag[n].float()[None, :]
    return e2 / e2.mean().clamp(min=1e-30)


def _tacq(n, inp):
    return inp.stats["sum_abs"][n] * _dq(inp, n).abs() * _w(inp, n).abs()


METHODS: dict[str, SaliencyMethod] = {
    "tacq": SaliencyMethod(("sum_abs",), "gptq", False, _tacq, additive=True),
    "tacq-rtn": SaliencyMethod(("sum_abs",), "rtn", False, _tacq, additive=True),
    "taylor": SaliencyMethod(("sum",), "gptq", False, lambda n, i: (i.stats["sum"][n] * _dq(i, n)).abs()),
    # attribution patching between W and Q(W): the predicted loss change of quantizing the weight,
    # signed (a weight whose quantization helps ranks last), and its per-sample absolute bound
    "atp": SaliencyMethod(("sum",), "gptq", False, lambda n, i: i.stats["sum"][n] * _dq(i, n), additive=True),
    "atp-abs": SaliencyMethod(("sum_abs",), "gptq", False, lambda n, i: i.stats["sum_abs"][n] * _dq(i, n).abs(),
                              additive=True),
    "grad": SaliencyMethod(("sum_abs",), None, False, lambda n, i: i.stats["sum_abs"][n].clone(), additive=True),
    "fisher": SaliencyMethod(("sum_sq",), None, False, lambda n, i: i.stats["sum_sq"][n].clone(), additive=True),
    "magnitude": SaliencyMethod((), None, False, lambda n, i: _w(i, n).abs()),
    "spqr": SaliencyMethod((), "gptq", True, _spqr),
    "wanda": SaliencyMethod(("act_sq",), None, False, lambda n, i: _w(i, n).abs() * i.stats["act_sq"][n].sqrt()[None, :]),
    "random": SaliencyMethod((), None, False, _random),
}


RENAMED = {"awq": "wanda"}   # |W|·‖X_j‖ is Wanda's criterion, not AWQ's


def method(name: str) -> SaliencyMethod:
    if name in RENAMED:
        raise UsageError(f"saliency method '{name}' is now called '{RENAMED[name]}' (|W|·‖X_j‖ is Wanda's "
                         "criterion, not AWQ's)")
    if name not in METHODS:
        raise UsageError(f"unknown saliency method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def compute_scores(name: str, inp: SaliencyInputs) -> dict[str, torch.Tensor]:
    """Scores of every weight in ``inp.weights``: ``{name: [out, in] float32}``."""
    m = method(name)
    missing = [s for s in m.stats if s not in inp.stats]
    if missing or (m.quantizer and inp.quantized is None) or (m.hessian and inp.hinv_diag is None):
        raise UsageError(f"method '{name}' needs statistics {list(m.stats)}, "
                         f"{'Q(W) from ' + m.quantizer if m.quantizer else 'no Q(W)'}"
                         f"{' and the GPTQ Hessian' if m.hessian else ''}")
    out = {}
    for n in inp.weights:
        s = m.fn(n, inp).float()
        out[n] = torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    return out
