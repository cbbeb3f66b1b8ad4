import pytest
import torch

from circuitq.quant.gptq import GPTQConfig, HessianError, HessianState, gptq_quantize, hessian_error, hessian_update
from circuitq.quant.quantizer import QuantSpec, rtn_quantize


def _problem(seed=0, out_f=32, in_f=128, n=1024):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) * 0.2)
    w = torch.randn(out_f, in_f, generator=g)
    return w, X, hessian_update(HessianState.zeros(in_f), X).H


def test_hessian_in_pieces_equals_at_once():
    _, X, H = _problem()
    st = HessianState.zeros(X.shape[1])
    for chunk in (X[:100], X[100:101], X[101:700], X[700:]):
        st = hessian_update(st, chunk)
    assert st.n == X.shape[0]
    assert torch.allclose(st.H, H, rtol=1e-5, atol=1e-4)
    assert torch.allclose(H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)


def test_hessian_token_mask_drops_padding():
    _, X, _ = _problem()
    x = X[:64].view(2, 32, -1)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1, 20:] = False
    st = hessian_update(HessianState.zeros(x.shape[-1]), x, mask)
    ref = hessian_update(HessianState.zeros(x.shape[-1]), torch.cat([x[0], x[1, :20]]))
    assert st.n == 52 and torch.allclose(st.H, ref.H)


@pytest.mark.parametrize("group_size,act_order", [(-1, False), (-1, True), (32, False), (32, True)])
def test_gptq_beats_rtn_on_hessian_weighted_error(group_size, act_order):
    w, _, H = _problem()
    spec = QuantSpec(bits=3, group_size=group_size)
    rtn = rtn_quantize(w, spec).dequantize()
    g = gptq_quantize(w, H, spec, cfg=GPTQConfig(act_order=act_order, block_size=64))
    assert hessian_error(w, g.weight, H) < 0.8 * hessian_error(w, rtn, H)


def test_unmasked_on_grid_masked_at_compensated_value_and_all_false_is_plain():
    w, _, H = _problem(seed=3)
    spec = QuantSpec(bits=3, group_size=32)
    plain = gptq_quantize(w, H, spec)
    none_mask = gptq_quantize(w, H, spec, torch.zeros_like(w, dtype=torch.bool))
    assert torch.equal(plain.weight, none_mask.weight) and torch.equal(plain.qweight.codes, none_mask.qweight.codes)

    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) < 0.05
    r = gptq_quantize(w, H, spec, keep)
    grid = r.qweight.dequantize_grid()
    assert torch.equal(r.weight[~keep], grid[~keep])                 # unmasked: on the grid
    assert not torch.allclose(r.weight[keep], grid[keep])            # masked: off the grid
    assert r.qweight.nnz == int(keep.sum())
    # the emitted 16-bit value is the error-compensated weight: it differs from the original W
    # (compensation) but stays close to it, within float16 precision of the residual
    assert not torch.allclose(r.weight[keep], w[keep])
    assert (r.weight[keep] - w[keep]).abs().median() < 1.0
    # keeping weights in 16-bit lowers the output error
    assert hessian_error(w, r.weight, H) < hessian_error(w, plain.weight, H)


def test_masked_first_column_is_emitted_at_its_original_value():
    """Nothing is quantized before column 0, so its compensated value is W itself: a masked
    first column comes out as W to float16 precision of the residual."""
    w, _, H = _problem(seed=4, in_f=64)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[:, 0] = True
    r = gptq_quantize(w, H, QuantSpec(bits=3), keep)
    assert torch.allclose(r.weight[:, 0], w[:, 0].half().float(), atol=1e-3)


def test_dead_columns_and_damping():
    w, X, _ = _problem(in_f=64)
    X[:, 5] = 0
    H = hessian_update(HessianState.zeros(64), X).H
    r = gptq_quantize(w, H, QuantSpec(bits=4))
    assert torch.isfinite(r.weight).all() and r.damp == 0.01
    assert torch.equal(r.weight[:, 5], torch.zeros_like(r.weight[:, 5]))  # a dead input column is zeroed
    # an indefinite Hessian needs the damping raised x10 until Cholesky works
    from circuitq.quant.gptq import inverse_hessian_factor

    bad = torch.tensor([[1.0, 3.0], [3.0, 1.0]])   # eigenvalues -2 and 4: damping 1 is not enough
    _, used = inverse_hessian_factor(bad, 0.01, 10.0)
    assert used == pytest.approx(10.0)
    with pytest.raises(HessianError, match="Cholesky failed"):
        inverse_hessian_factor(bad, 0.01, 0.5)
    with pytest.raises(HessianError, match="NaN/Inf"):
        gptq_quantize(w, H * float("nan"), QuantSpec(bits=4))
