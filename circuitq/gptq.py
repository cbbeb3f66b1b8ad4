"""Mask-aware GPTQ for one linear layer (pure core: tensors in, tensors out).

GPTQ (Frantar et al., 2023) quantizes the columns of ``W`` (``[out, in]``) one at a time and
spreads each column's quantization error over the columns not yet quantized, weighted by the
inverse Hessian ``H = 2 X Xᵀ / n`` of the layer's inputs ``X`` (``[in, n]``), so that the layer
output ``W X`` changes as little as possible.

TaCQ (Xiao et al., 2025, arXiv 2504.07389) adds a boolean mask ``M`` of weights that stay in
16-bit: each row's (or group's) scale and zero are fitted with the masked entries replaced by the
mean of the unmasked ones, a masked entry contributes zero error (so it absorbs the compensation
of the columns before it and passes nothing on), and it is emitted at its error-compensated
value. With no mask, or an all-false one, this is exactly plain GPTQ.

Worked example of one GPTQ step (2 columns, ``H⁻¹`` upper Cholesky factor ``U``): quantizing
column 0 to ``q0`` leaves error ``e = (w0 - q0) / U[0,0]``; column 1 becomes
``w1 - e * U[0,1]`` before it is quantized itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .quantizer import QuantSpec, QuantizedWeight, fit_params, quantize_codes, dequantize, sparse_residual


# ---------------------------------------------------------------------------------------------
# Hessian accumulator: (state, batch) -> state
# ---------------------------------------------------------------------------------------------
@dataclass
class HessianState:
    """Running mean ``H = 2/n Σ_t x_t x_tᵀ`` over ``n`` tokens; ``H``: ``[in, in]`` float32."""

    H: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, in_features: int, device: torch.device | str = "cpu") -> "HessianState":
        return cls(torch.zeros(in_features, in_features, device=device, dtype=torch.float32), 0)


def hessian_update(state: HessianState, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> HessianState:
    """Add a batch of layer inputs ``x`` (``[..., in]``) to the running mean.

    ``token_mask`` (``x.shape[:-1]`` bool) drops padding tokens. Accumulating in pieces equals
    accumulating at once (up to float32 rounding).
    """
    x = x.reshape(-1, x.shape[-1])
    if token_mask is not None:
        x = x[token_mask.reshape(-1)]
    m = x.shape[0]
    if m == 0:
        return state
    x = x.float()
    n = state.n + m
    H = state.H * (state.n / n)
    H.addmm_(x.T, x, alpha=2.0 / n)
    return HessianState(H, n)


def hessian_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    """Output reconstruction error ``tr((W-Q) H (W-Q)ᵀ)``; ``w``, ``q``: ``[out, in]``."""
    d = (w.float() - q.float())
    return float(((d @ H) * d).sum())


# ---------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTQConfig:
    """Algorithm settings. ``damp``: fraction of mean(diag H) added to the diagonal; raised ×10
    (up to ``damp_max``) until the Cholesky factorisation succeeds."""

    block_size: int = 128
    damp: float = 0.01
    damp_max: float = 10.0
    act_order: bool = False


class GPTQResult(NamedTuple):
    qweight: QuantizedWeight   # codes, scales, zeros, g_idx, 16-bit residuals
    weight: torch.Tensor       # [out, in] float32: the emitted weight (== qweight.dequantize())
    loss: float                # Σ (w - q)² / [H⁻¹]_jj², GPTQ's own objective
    damp: float                # damping fraction actually used


class HessianError(ValueError):
    """The Hessian cannot be factorised (NaN/Inf inputs, or singular even with max damping)."""


def inverse_hessian_factor(H: torch.Tensor, damp: float, damp_max: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``; returns
    ``(U [in, in], damp used)``. Raises ``HessianError`` when no damping up to ``damp_max`` works."""
    if not torch.isfinite(H).all():
        raise HessianError("the Hessian contains NaN/Inf: the calibration inputs of this layer are "
                           "not finite (check the model weights and the calibration data)")
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    d = damp
    while d <= damp_max:
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, d
        d *= 10
    raise HessianError(f"Cholesky failed even with damping {damp_max} x mean(diag H); the layer "
                       "inputs are degenerate (use more calibration samples)")


def inverse_hessian_diag(H: torch.Tensor, damp: float = 0.01, damp_max: float = 10.0) -> torch.Tensor:
    """``diag((H + λI)⁻¹)``: ``[in]`` float32, dead columns handled as in GPTQ (SpQR's
    sensitivity denominator)."""
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    U, _ = inverse_hessian_factor(H, damp, damp_max)
    return (U * U).sum(0)  # H⁻¹ = Uᵀ U


def _group_of(col: int, gs: int) -> int:
    return col // gs


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, keep: torch.Tensor | None = None,
                  cfg: GPTQConfig = GPTQConfig()) -> GPTQResult:
    """Quantize ``w`` (``[out, in]``) with GPTQ, keeping ``keep`` (``[out, in]`` bool) in 16-bit.

    ``H``: ``[in, in]`` Hessian of the layer inputs (not modified). Statistics in float32 on
    ``w``'s device. Group parameters are fitted when a group starts, on the error-updated
    weights; under act-order groups follow the permuted order and ``g_idx`` records them.
    """
    out_f, in_f = w.shape
    n_groups = spec.n_groups(in_f)
    gs = in_f if spec.group_size == -1 else spec.group_size
    if not torch.isfinite(w).all():
        raise HessianError("the weight contains NaN/Inf; the model is corrupt")
    W = w.detach().float().clone()
    H = H.detach().float().clone().to(W.device)
    keep = None if keep is None or not bool(keep.any()) else keep.to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = torch.where(keep[:, dead], W[:, dead], 0) if keep is not None else 0
    perm = None
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        keep = keep[:, perm] if keep is not None else None
    U, damp = inverse_hessian_factor(H, cfg.damp, cfg.damp_max)

    bs = cfg.block_size if spec.group_size == -1 else max(gs, cfg.block_size // gs * gs)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scales = torch.zeros(n_groups, out_f, device=W.device)
    zeros = torch.zeros(n_groups, out_f, device=W.device)
    losses = torch.zeros(out_f, device=W.device)
    scale = zero = None
    if spec.group_size == -1:
        scale, zero = fit_params(W, spec, keep)
        scales[0], zeros[0] = scale, zero
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        k1 = keep[:, i1:i2] if keep is not None else None
        for i in range(i2 - i1):
            col = i1 + i
            if spec.group_size != -1 and col % gs == 0:
                sl = slice(i, i + gs)
                scale, zero = fit_params(W1[:, sl], spec, None if k1 is None else k1[:, sl])
                scales[_group_of(col, gs)], zeros[_group_of(col, gs)] = scale, zero
            wc = W1[:, i]
            c = quantize_codes(wc, scale, zero, spec.maxq)
            q = dequantize(c, scale, zero)
            if k1 is not None:
                q = torch.where(k1[:, i], wc, q)
            codes[:, col], Q[:, col] = c, q
            d = U1[i, i]
            losses += (wc - q) ** 2 / d ** 2
            err = (wc - q) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    g_idx = (torch.arange(in_f, device=W.device) // gs).int()
    if perm is not None:
        inv = torch.argsort(perm)
        Q, codes, g_idx = Q[:, inv], codes[:, inv], g_idx[inv]
        keep = keep[:, inv] if keep is not None else None
    qw = QuantizedWeight(codes.to(torch.uint8), scales.half(), zeros.to(torch.uint8), g_idx,
                         spec.bits, spec.group_size, spec.sym, *sparse_residual(Q, Q, None))
    if keep is not None:
        qw.rows, qw.cols, qw.vals = sparse_residual(Q, qw.dequantize_grid(), keep)
    return GPTQResult(qw, qw.dequantize(), float(losses.sum()), damp)
