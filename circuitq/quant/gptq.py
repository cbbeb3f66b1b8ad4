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

from circuitq.errors import CircuitqError
from circuitq.quant.quantizer import QuantizedWeight, QuantSpec, dequantize, fit_params, quantize_codes, sparse_residual


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
    errors: torch.Tensor | None = None   # [out, in] (w - q) / U_jj per weight, as GPTQ spread it (if asked)


class HessianError(CircuitqError, ValueError):
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


class Factor(NamedTuple):
    """GPTQ's factor of one Hessian: ``U`` ``[in, in]`` upper Cholesky factor of ``(H + λI)⁻¹``,
    the damping fraction used, and ``dead`` ``[in]`` bool (columns that never saw an input)."""

    U: torch.Tensor
    damp: float
    dead: torch.Tensor


def hessian_factor(H: torch.Tensor, damp: float = 0.01, damp_max: float = 10.0) -> Factor:
    """GPTQ's factor of one Hessian exactly as ``gptq_quantize`` makes it: dead columns
    (``H_jj = 0``) get ``H_jj = 1``, then ``inverse_hessian_factor``. It depends on ``H`` and the
    damping only, so it is computed once per Hessian and shared by every mask and bit width
    (``gptq_quantize_batch(factors=...)``)."""
    H = H.detach().float().clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1
    U, d = inverse_hessian_factor(H, damp, damp_max)
    return Factor(U, d, dead)


def hinv_diag_from_factor(U: torch.Tensor) -> torch.Tensor:
    """``diag(H⁻¹)`` from the upper factor ``U`` (``H⁻¹ = Uᵀ U``): ``[in]``."""
    return (U * U).sum(-2)


def inverse_hessian_diag(H: torch.Tensor, damp: float = 0.01, damp_max: float = 10.0) -> torch.Tensor:
    """``diag((H + λI)⁻¹)``: ``[in]`` float32, dead columns handled as in GPTQ (SpQR's
    sensitivity denominator)."""
    return hinv_diag_from_factor(hessian_factor(H, damp, damp_max).U)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, keep: torch.Tensor | None = None,
                  cfg: GPTQConfig = GPTQConfig(), keep_errors: bool = False) -> GPTQResult:
    """Quantize ``w`` (``[out, in]``) with GPTQ, keeping ``keep`` (``[out, in]`` bool) in 16-bit.

    ``H``: ``[in, in]`` Hessian of the layer inputs (not modified). Statistics in float32 on
    ``w``'s device. Group parameters are fitted when a group starts, on the error-updated
    weights; under act-order groups follow the permuted order and ``g_idx`` records them.
    """
    return gptq_quantize_batch(w[None], H[None], spec, None if keep is None else keep[None], cfg,
                               keep_errors=keep_errors)[0]


def _gather_cols(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[b, :, perm[b]]`` for ``x``: ``[B, rows, in]``, ``perm``: ``[B, in]``."""
    return torch.gather(x, -1, perm[:, None, :].expand(-1, x.shape[1], -1))


def gptq_quantize_batch(w: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec, keep: torch.Tensor | None = None,
                        cfg: GPTQConfig = GPTQConfig(), *, keep_errors: bool = False,
                        factors: list[Factor] | None = None) -> list[GPTQResult]:
    """GPTQ on a batch of independent matrices of one shape: ``w``: ``[B, out, in]``, ``H``:
    ``[B, in, in]`` (each matrix its own Hessian), ``keep``: ``[B, out, in]`` bool or None.
    ``factors``: ``hessian_factor(H[b])`` per element, computed once and shared by every mask and
    bit width (then ``H`` is not read and may be None; natural column order only).

    Element ``b`` of the result equals ``gptq_quantize(w[b], H[b], spec, keep[b])``: the batch only
    removes Python overhead from the column loop (all layers' q/o projections, say, in one pass).
    Memory: about ``(6 + keep_errors) · B · out · in`` float32 plus ``B · in²`` for the factors.
    """
    B, out_f, in_f = w.shape
    n_groups = spec.n_groups(in_f)
    gs = in_f if spec.group_size == -1 else spec.group_size
    if not torch.isfinite(w).all():
        raise HessianError("the weight contains NaN/Inf; the model is corrupt")
    W = w.detach().float().clone()
    if keep is not None:
        keep = keep.to(W.device)
        if not bool(keep.any()):
            keep = None
    perm = None
    if factors is None:
        H = H.detach().float().clone().to(W.device)
        diag = H.diagonal(dim1=-2, dim2=-1)
        dead = diag == 0                                           # [B, in]
        diag[dead] = 1
        if cfg.act_order:
            perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True)  # [B, in]
            H = torch.gather(_gather_cols(H, perm), 1, perm[:, :, None].expand(-1, -1, in_f))
        made = [inverse_hessian_factor(H[b], cfg.damp, cfg.damp_max) for b in range(B)]
        U, damps = torch.stack([f[0] for f in made]), [f[1] for f in made]   # U: [B, in, in]
        del H
    else:
        if cfg.act_order:
            raise ValueError("precomputed GPTQ factors are for the natural column order (act_order=False)")
        U = torch.stack([f.U for f in factors]).to(W.device).float()
        dead = torch.stack([f.dead for f in factors]).to(W.device)
        damps = [f.damp for f in factors]
    zero_out = dead[:, None, :] if keep is None else dead[:, None, :] & ~keep
    W = torch.where(zero_out, torch.zeros_like(W), W)
    if perm is not None:
        W = _gather_cols(W, perm)
        keep = _gather_cols(keep, perm) if keep is not None else None

    bs = cfg.block_size if spec.group_size == -1 else max(gs, cfg.block_size // gs * gs)
    scales = torch.zeros(B, n_groups, out_f, device=W.device)
    zeros = torch.zeros(B, n_groups, out_f, device=W.device)
    losses = torch.zeros(B, out_f, device=W.device)
    scale = zero = None
    if spec.group_size == -1:
        scale, zero = fit_params(W, spec, keep)                    # [B, out]
        scales[:, 0], zeros[:, 0] = scale, zero
    # columns are walked one by one: keep them contiguous ([B, in, out] layout)
    Wt = W.transpose(1, 2).contiguous()
    Ut = U.transpose(1, 2).contiguous()
    del W
    kt = keep.transpose(1, 2).contiguous() if keep is not None else None
    Qt = torch.empty_like(Wt)
    Et = torch.zeros_like(Wt) if keep_errors else None          # SpQR's sensitivity: the scaled errors
    Ct = torch.empty_like(Wt)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = Wt[:, i1:i2].clone()                                  # [B, cols, out]
        Err1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if spec.group_size != -1 and col % gs == 0:
                sl = slice(i, i + gs)
                scale, zero = fit_params(W1[:, sl].transpose(1, 2), spec,
                                         None if kt is None else kt[:, col:col + gs].transpose(1, 2))
                scales[:, col // gs], zeros[:, col // gs] = scale, zero
            wc = W1[:, i]                                          # [B, out]
            c = quantize_codes(wc, scale, zero, spec.maxq)
            q = dequantize(c, scale, zero)
            if kt is not None:
                q = torch.where(kt[:, col], wc, q)
            Ct[:, col], Qt[:, col] = c, q
            d = U1[:, i, i][:, None]                               # [B, 1]
            err = (wc - q) / d
            losses += err ** 2
            W1[:, i:].baddbmm_(U1[:, i, i:, None], err[:, None, :], alpha=-1)
            Err1[:, i] = err
            if Et is not None:
                Et[:, col] = err
        Wt[:, i2:].baddbmm_(Ut[:, i2:, i1:i2], Err1, alpha=-1)
    Q, codes = Qt.transpose(1, 2), Ct.transpose(1, 2)
    E = Et.transpose(1, 2) if Et is not None else None

    g_idx = (torch.arange(in_f, device=Q.device) // gs).int().expand(B, -1)
    if perm is not None:
        inv = torch.argsort(perm, dim=-1)
        Q, codes = _gather_cols(Q, inv), _gather_cols(codes, inv)
        E = _gather_cols(E, inv) if E is not None else None
        g_idx = torch.gather(g_idx, -1, inv)
        keep = _gather_cols(keep, inv) if keep is not None else None
    results = []
    for b in range(B):
        qw = QuantizedWeight(codes[b].to(torch.uint8), scales[b].half(), zeros[b].to(torch.uint8),
                             g_idx[b].clone(), spec.bits, spec.group_size, spec.sym, *sparse_residual(Q[b], Q[b], None))
        if keep is not None:
            qw.rows, qw.cols, qw.vals = sparse_residual(Q[b], qw.dequantize_grid(), keep[b])
        results.append(GPTQResult(qw, qw.dequantize(), float(losses[b].sum()), damps[b],
                                  E[b].contiguous() if E is not None else None))
    return results
