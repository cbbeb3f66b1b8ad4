import pytest
import torch

from circuitq.quant.quantizer import QuantSpec, fill_masked, fit_params, fake_quantize, rtn_quantize


def test_worked_example_from_docstring():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.5]])
    qp = fit_params(x, QuantSpec(bits=3))
    assert qp.scale.item() == 0.5 and qp.zero.item() == 2
    assert torch.equal(fake_quantize(x, qp.scale[:, None], qp.zero[:, None], 7), x)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_rtn_values_lie_on_grid_and_error_shrinks_with_bits(bits, sym, group_size):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    qw = rtn_quantize(w, spec)
    assert qw.codes.max() <= spec.maxq
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (spec.n_groups(64), 8)
    q = qw.dequantize()
    # every value is scale * (integer - zero): dividing by the per-entry scale gives integers
    scale = qw.scales.float()[qw.g_idx.long()].T
    k = q / scale + qw.zeros.float()[qw.g_idx.long()].T
    assert torch.allclose(k, k.round(), atol=1e-3)
    # rounding error is at most half a step inside the range
    assert ((q - w).abs() <= scale / 2 + 1e-6).float().mean() > 0.95


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    errs = [((rtn_quantize(w, QuantSpec(bits=b)).dequantize() - w) ** 2).sum() for b in (2, 3, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > errs[3]


def test_mse_clipping_never_worse_in_its_norm():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[0, 0] = 12.0  # an outlier stretches the range
    plain = QuantSpec(bits=3)
    mse = QuantSpec(bits=3, mse=True)
    e_plain = ((rtn_quantize(w, plain).dequantize() - w).abs() ** 2.4).sum(1)
    e_mse = ((rtn_quantize(w, mse).dequantize() - w).abs() ** 2.4).sum(1)
    assert (e_mse <= e_plain + 1e-4).all() and e_mse.sum() < e_plain.sum()


def test_mask_entries_do_not_stretch_the_grid_and_are_kept():
    w = torch.tensor([[0.1, -0.2, 0.3, 100.0]])
    keep = torch.tensor([[False, False, False, True]])
    assert torch.allclose(fill_masked(w, keep), torch.tensor([[0.1, -0.2, 0.3, 0.2 / 3]]))
    qw = rtn_quantize(w, QuantSpec(bits=3), keep)
    assert qw.scales.float().item() < 0.1  # the outlier did not set the range
    assert qw.nnz == 1
    assert abs(qw.dequantize()[0, 3].item() - 100.0) < 0.1  # kept at 16-bit precision


def test_bad_specs_raise_clear_errors():
    with pytest.raises(ValueError, match="unsupported bits"):
        QuantSpec(bits=5)
    with pytest.raises(ValueError, match="does not divide"):
        QuantSpec(bits=3, group_size=48).n_groups(64)
