import json

import pytest
import torch

from circuitq.saliency.masks import MaskError, combine, fraction_for_bits, select_per_layer, select_topk
from circuitq.saliency.methods import METHODS, SaliencyInputs, compute_scores


def _inputs():
    g = torch.Generator().manual_seed(0)
    W = {"a.weight": torch.randn(4, 6, generator=g), "b.weight": torch.randn(3, 6, generator=g)}
    Q = {n: (w * 2).round() / 2 for n, w in W.items()}
    stats = {"sum_abs": {n: torch.rand(w.shape, generator=g) for n, w in W.items()},
             "sum": {n: torch.randn(w.shape, generator=g) for n, w in W.items()},
             "sum_sq": {n: torch.rand(w.shape, generator=g) for n, w in W.items()},
             "act_sq": {n: torch.rand(w.shape[1], generator=g) for n, w in W.items()}}
    hinv = {n: torch.rand(w.shape[1], generator=g) + 0.5 for n, w in W.items()}
    return SaliencyInputs(W, Q, stats, hinv, seed=3)


def test_every_method_equals_its_direct_formula():
    i = _inputs()
    n = "a.weight"
    W, Q, S, h = i.weights[n], i.quantized[n], {k: v[n] for k, v in i.stats.items()}, i.hinv_diag[n]
    direct = {
        "tacq": S["sum_abs"] * (W - Q).abs() * W.abs(),
        "tacq-rtn": S["sum_abs"] * (W - Q).abs() * W.abs(),
        "taylor": (S["sum"] * (Q - W)).abs(),
        "atp": S["sum"] * (Q - W), "atp-abs": S["sum_abs"] * (Q - W).abs(),
        "grad": S["sum_abs"], "fisher": S["sum_sq"], "magnitude": W.abs(),
        "spqr": ((W - Q) ** 2 / h[None, :]) / ((W - Q) ** 2 / h[None, :]).mean(),
        "wanda": W.abs() * S["act_sq"].sqrt()[None, :],
    }
    for m, expect in direct.items():
        assert torch.allclose(compute_scores(m, i)[n], expect), m
    r1, r2 = compute_scores("random", i), compute_scores("random", _inputs())
    assert torch.equal(r1[n], r2[n]) and not torch.equal(r1["a.weight"][:3], r1["b.weight"])
    assert set(direct) | {"random"} == set(METHODS)


def test_docstring_worked_example():
    i = SaliencyInputs({"w": torch.tensor([[0.5]])}, {"w": torch.tensor([[0.25]])},
                       {"sum_abs": {"w": torch.tensor([[2.0]])}})
    assert compute_scores("tacq", i)["w"].item() == pytest.approx(0.25)


def test_missing_inputs_are_a_clear_error():
    with pytest.raises(ValueError, match="needs statistics"):
        compute_scores("tacq", SaliencyInputs({"w": torch.ones(1, 1)}))
    with pytest.raises(ValueError, match="unknown saliency method"):
        compute_scores("nope", SaliencyInputs({"w": torch.ones(1, 1)}))


def test_topk_global_per_layer_union_intersection():
    s = {"model.layers.0.x.weight": torch.tensor([[9.0, 1.0], [8.0, 0.0]]),
         "model.layers.1.x.weight": torch.tensor([[7.0, 6.0], [5.0, 4.0]])}
    m = select_topk(s, 0.375)  # 3 of 8
    assert m["model.layers.0.x.weight"].tolist() == [[True, False], [True, False]]
    assert m["model.layers.1.x.weight"].tolist() == [[True, False], [False, False]]
    p = select_per_layer(s, 0.5)  # 2 of 4 in each layer
    assert int(p["model.layers.0.x.weight"].sum()) == 2 and int(p["model.layers.1.x.weight"].sum()) == 2
    u = combine([m, p], "union")
    x = combine([m, p], "intersection")
    for n in s:
        assert torch.equal(u[n], m[n] | p[n]) and torch.equal(x[n], m[n] & p[n])
    with pytest.raises(MaskError):
        combine([m, {"other.weight": torch.zeros(1, dtype=torch.bool)}], "union")


def test_fraction_for_bits_inverts_the_accounting():
    from circuitq.quant.plan import PrecisionPlan, bit_report

    shapes = {"a.weight": (64, 128), "b.weight": (32, 128)}
    f = fraction_for_bits(3.2, 3, -1, shapes)
    numel = 64 * 128 + 32 * 128
    nnz = {"a.weight": int(f * 64 * 128), "b.weight": int(f * 32 * 128)}
    avg = bit_report(shapes, PrecisionPlan(3), -1, nnz).average_bits
    assert avg == pytest.approx(3.2, abs=32 / numel * 2)
    for bad in (2.0, 16.5, 40.0, float("nan"), float("inf")):   # below the base cost, above 16, not a number
        with pytest.raises(MaskError, match=r"--target-bits must be between 3\.\d+ .* and 16"):
            fraction_for_bits(bad, 3, -1, shapes)
    assert fraction_for_bits(16.0, 3, -1, shapes) < 1


def test_rank_max_union_keeps_exactly_the_single_task_budget():
    """The multi-task circuit is re-selected at the same k: exactly floor(f·N) weights, and it
    holds each task's very top weights, where a union of two masks holds up to 2k."""
    from circuitq.saliency.masks import rank_normalize, select_rank_max

    g = torch.Generator().manual_seed(1)
    a = {"x.weight": torch.rand(20, 30, generator=g), "y.weight": torch.rand(10, 30, generator=g) * 100}
    b = {"x.weight": torch.rand(20, 30, generator=g) * 1e-6, "y.weight": torch.rand(10, 30, generator=g)}
    n = 20 * 30 + 10 * 30
    for f in (0.01, 0.05, 0.2):
        m = select_rank_max([a, b], f)
        assert sum(int(v.sum()) for v in m.values()) == int(f * n)
        union = combine([select_topk(a, f), select_topk(b, f)], "union")
        assert sum(int(v.sum()) for v in union.values()) > int(f * n)
    # units do not matter: b's scores are a millionth of a's in x, yet its top weight is kept
    m = select_rank_max([a, b], 0.01)
    top_b = torch.cat([v.flatten() for v in b.values()]).argmax()
    flat = torch.cat([v.flatten() for v in m.values()])
    assert bool(flat[top_b])
    r = rank_normalize(a)
    assert float(max(v.max() for v in r.values())) == pytest.approx((n - 1) / n)


def test_spqr_uses_gptqs_own_scaled_errors_relative_to_the_layer():
    """SpQR's err = (w - q) / U_jj as GPTQ made it: GPTQ's loss is their sum of squares, column 0
    (no earlier compensation) is (w0 - q0) / U_00, and the score is err² over the layer's mean."""
    from circuitq.quant.gptq import gptq_quantize, hessian_update, HessianState, inverse_hessian_factor
    from circuitq.quant.quantizer import QuantSpec

    g = torch.Generator().manual_seed(0)
    w, X = torch.randn(8, 16, generator=g), torch.randn(64, 16, generator=g)
    H = hessian_update(HessianState.zeros(16), X).H
    r = gptq_quantize(w, H, QuantSpec(3), keep_errors=True)
    assert r.loss == pytest.approx(float((r.errors ** 2).sum()), rel=1e-5)
    U, _ = inverse_hessian_factor(H, 0.01, 10.0)
    assert torch.allclose(r.errors[:, 0], (w[:, 0] - r.weight[:, 0]) / U[0, 0], atol=1e-6)
    inp = SaliencyInputs({"a.weight": w}, {"a.weight": r.weight}, {}, {"a.weight": torch.ones(16)}, 0,
                         {"a.weight": r.errors})
    s = compute_scores("spqr", inp)["a.weight"]
    assert torch.allclose(s, r.errors ** 2 / (r.errors ** 2).mean())
    assert float(s.mean()) == pytest.approx(1.0)


def test_the_additive_flag_is_exactly_the_methods_linear_in_their_statistics():
    """A method flagged ``additive`` scores two halves of the items' statistics to values that
    sum to its score of the whole (what the split-half reliability of ``circuitq faithfulness``
    relies on); every method reading statistics and not flagged fails that (taylor's abs, wanda's
    sqrt), so the flag is neither missing nor claimed wrongly."""
    a, b = _inputs(), _inputs()
    g = torch.Generator().manual_seed(1)
    b.stats = {k: {n: t * torch.rand(t.shape, generator=g) * 3 - (t if k == "sum" else 0) for n, t in v.items()}
               for k, v in a.stats.items()}
    b.stats["sum_abs"] = {n: t.abs() for n, t in b.stats["sum_abs"].items()}
    both = _inputs()
    both.stats = {k: {n: a.stats[k][n] + b.stats[k][n] for n in v} for k, v in a.stats.items()}
    for name, m in METHODS.items():
        if not m.stats:
            assert not m.additive, name
            continue
        whole, parts = compute_scores(name, both), (compute_scores(name, a), compute_scores(name, b))
        adds = all(torch.allclose(whole[n], parts[0][n] + parts[1][n], atol=1e-5) for n in whole)
        assert adds == m.additive, name
    assert {n for n, m in METHODS.items() if m.additive} >= {"atp", "atp-abs", "tacq", "grad"}
