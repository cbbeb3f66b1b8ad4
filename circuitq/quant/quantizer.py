"""Uniform quantizer primitives: pure tensor functions, no modules, no I/O.

The grid follows GPTQ (Frantar et al., 2023, IST-DASLab ``quant.py``): for ``b`` bits, codes are
integers ``q in [0, 2^b - 1]`` and a weight is represented as ``scale * (q - zero)``.

* asymmetric: the range ``[min(x, 0), max(x, 0)]`` of each row (or group) is mapped onto the
  codes; ``zero = round(-xmin / scale)``.
* symmetric: the range is ``[-max|x|, max|x|]`` and ``zero = 2^(b-1)`` (the GPTQ convention, so
  the same packed layout serves both).
* optional MSE clipping: shrink the range by ``p = 1 - i/grid`` for ``i < maxshrink * grid`` and
  keep, per row, the scale with the least ``sum |x - Q(x)|^norm`` (``norm = 2.4``).

Scales are rounded to float16 as soon as they are fitted, because the packed checkpoint stores
them in float16: every value this module produces is exactly what a packed checkpoint decodes.

Worked example (3 bits asymmetric, one row ``x = [-1.0, 0.0, 0.5, 2.5]``):
range ``[-1, 2.5]``, ``scale = 3.5 / 7 = 0.5``, ``zero = round(1 / 0.5) = 2``,
codes ``round(x / 0.5) + 2 = [0, 2, 3, 7]``, dequantized ``[-1.0, 0.0, 0.5, 2.5]``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from circuitq.config import SUPPORTED_BITS
from circuitq.errors import UsageError

FP16_TINY = 2.0 ** -24  # smallest positive float16 (subnormal): scales never go below it


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized.

    ``group_size = -1`` means one scale/zero per output channel (row); otherwise every
    ``group_size`` consecutive input columns of a row share one scale/zero.
    """

    bits: int = 3
    group_size: int = -1
    sym: bool = False
    mse: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    mse_norm: float = 2.4

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UsageError(f"unsupported bits={self.bits}: circuitq quantizes to one of "
                             f"{SUPPORTED_BITS} bits (use 16 in a precision plan to keep a module "
                             "unquantized)")
        if self.group_size != -1 and self.group_size < 1:
            raise UsageError(f"group_size must be -1 (per output channel) or a positive number "
                             f"of input columns, got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def n_groups(self, in_features: int) -> int:
        """Number of scale/zero groups per row; raises if the group size does not fit."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise UsageError(f"group size {self.group_size} does not divide the input dimension "
                             f"{in_features}; choose a divisor of {in_features} or -1 "
                             "(per output channel)")
        return in_features // self.group_size


class QParams(NamedTuple):
    """Per-row quantization parameters. ``scale``, ``zero``: ``[rows]`` float32 (zero integral)."""

    scale: torch.Tensor
    zero: torch.Tensor


def fill_masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Replace the ``keep`` entries of each row by the mean of that row's other entries.

    ``x``, ``keep``: ``[..., rows, n]``. Weights that stay in 16-bit must not stretch the grid of the
    weights that are quantized (TaCQ). A row with every entry kept is left unchanged.
    """
    if keep is None or not bool(keep.any()):
        return x
    free = (~keep).to(x.dtype)
    count = free.sum(dim=-1, keepdim=True)
    mean = (x * free).sum(dim=-1, keepdim=True) / count.clamp(min=1)
    mean = torch.where(count > 0, mean, x.mean(dim=-1, keepdim=True))
    return torch.where(keep, mean, x)


def _range_params(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> QParams:
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, torch.zeros_like(xmin))
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / spec.maxq).half().float().clamp(min=FP16_TINY)
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, spec.maxq)
    return QParams(scale, zero)


def fit_params(x: torch.Tensor, spec: QuantSpec, keep: torch.Tensor | None = None) -> QParams:
    """Fit one scale and zero per row of ``x`` (``[..., rows, n]``), ignoring ``keep`` entries.

    Returns ``QParams`` with ``[..., rows]`` tensors. With ``spec.mse`` the range is shrunk over a
    grid and the per-row scale with least ``sum |x - Q(x)|^norm`` is kept.
    """
    x = fill_masked(x.float(), keep)
    zeros = torch.zeros(x.shape[:-1], device=x.device, dtype=x.dtype)
    xmin = torch.minimum(x.min(dim=-1).values, zeros)
    xmax = torch.maximum(x.max(dim=-1).values, zeros)
    best = _range_params(xmin, xmax, spec)
    if not spec.mse:
        return best
    best_err = torch.full_like(xmin, float("inf"))
    for i in range(int(spec.mse_maxshrink * spec.mse_grid)):
        p = 1 - i / spec.mse_grid
        cand = _range_params(p * xmin, p * xmax, spec)
        err = (fake_quantize(x, cand.scale[..., None], cand.zero[..., None], spec.maxq) - x)
        err = err.abs().pow(spec.mse_norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(torch.where(better, cand.scale, best.scale),
                       torch.where(better, cand.zero, best.zero))
    return best


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest grid codes ``clamp(round(x / scale) + zero, 0, maxq)`` (float tensor, integral)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (codes - zero)`` in float32."""
    return scale.float() * (codes.float() - zero.float())


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``x`` to the nearest point of the grid; same shape as ``x``."""
    return dequantize(quantize_codes(x, scale, zero, maxq), scale, zero)


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight plus the entries kept in 16-bit, as pure data.

    * ``codes``: ``[out, in]`` uint8, the grid code of every entry (kept entries hold their
      nearest code);
    * ``scales``: ``[n_groups, out]`` float16; ``zeros``: ``[n_groups, out]`` uint8;
    * ``g_idx``: ``[in]`` int32, the group of each input column (non-trivial under act-order);
    * ``rows``, ``cols``: ``[nnz]`` int32 sorted by row, ``vals``: ``[nnz]`` float16, the
      additive residual ``W_kept - dequant(codes)`` of each 16-bit entry.

    ``dequantize()`` is the one definition of the weight every export and loader uses.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return replace(self, **{f: getattr(self, f).to(device) for f in
                                ("codes", "scales", "zeros", "g_idx", "rows", "cols", "vals")})

    @property
    def nnz(self) -> int:
        return int(self.rows.numel())

    def dequantize_grid(self) -> torch.Tensor:
        """The grid part only: ``[out, in]`` float32."""
        g = self.g_idx.long()
        scale = self.scales.float()[g].T  # [out, in]
        zero = self.zeros.float()[g].T
        return dequantize(self.codes, scale, zero)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Grid values plus the float16 residuals at the 16-bit entries: ``[out, in]``."""
        w = self.dequantize_grid()
        if self.nnz:
            w[self.rows.long(), self.cols.long()] += self.vals.float()
        return w.to(dtype)


def sparse_residual(target: torch.Tensor, grid: torch.Tensor, keep: torch.Tensor | None):
    """COO residual ``target - grid`` at ``keep`` (``[out, in]`` bool), rows sorted.

    Returns ``(rows int32, cols int32, vals float16)``; empty tensors when nothing is kept.
    """
    if keep is None or not bool(keep.any()):
        e = torch.zeros(0, dtype=torch.int32, device=target.device)
        return e, e.clone(), torch.zeros(0, dtype=torch.float16, device=target.device)
    idx = keep.nonzero()  # row-major order: sorted by row, then column
    rows, cols = idx[:, 0], idx[:, 1]
    vals = (target[rows, cols].float() - grid[rows, cols].float()).half()
    return rows.int(), cols.int(), vals


def rtn_quantize(w: torch.Tensor, spec: QuantSpec, keep: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` (``[out, in]``), keeping ``keep`` entries in 16-bit.

    Scales and zeros are fitted per row (or per group of ``spec.group_size`` columns) with the
    kept entries ignored, as in mask-aware GPTQ.
    """
    out_f, in_f = w.shape
    n_groups = spec.n_groups(in_f)
    gs = in_f if spec.group_size == -1 else spec.group_size
    w = w.float()
    codes = torch.empty_like(w)
    scales = torch.empty(n_groups, out_f, device=w.device)
    zeros = torch.empty(n_groups, out_f, device=w.device)
    for g in range(n_groups):
        sl = slice(g * gs, (g + 1) * gs)
        qp = fit_params(w[:, sl], spec, None if keep is None else keep[:, sl])
        scales[g], zeros[g] = qp.scale, qp.zero
        codes[:, sl] = quantize_codes(w[:, sl], qp.scale[:, None], qp.zero[:, None], spec.maxq)
    g_idx = (torch.arange(in_f, device=w.device) // gs).int()
    qw = QuantizedWeight(codes.to(torch.uint8), scales.half(), zeros.to(torch.uint8), g_idx,
                         spec.bits, spec.group_size, spec.sym, *sparse_residual(w, w, None))
    if keep is not None and bool(keep.any()):
        qw.rows, qw.cols, qw.vals = sparse_residual(w, qw.dequantize_grid(), keep)
    return qw
