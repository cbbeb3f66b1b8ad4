"""Attribution between 16-bit and quantized weights (issue 23): attribution patching as a
saliency method, integrated gradients with Gauss–Legendre quadrature, and completeness."""
from __future__ import annotations

import pytest
import torch

from circuitq.config import CalibConfig, QuantizeConfig
from circuitq.errors import UsageError
from circuitq.saliency.attribution import atp, completeness, gauss_legendre, integrated_gradients


def test_gauss_legendre_on_the_unit_interval():
    for k in (1, 2, 4, 8):
        x, w = gauss_legendre(k)
        assert len(x) == k and abs(sum(w) - 1) < 1e-12 and all(0 < xi < 1 for xi in x)
        # exact for polynomials of degree 2k - 1: ∫0^1 t^d dt = 1 / (d + 1)
        for d in range(2 * k):
            assert abs(sum(wi * xi ** d for xi, wi in zip(x, w)) - 1 / (d + 1)) < 1e-12
    assert gauss_legendre(1) == ([0.5], [1.0])
    for bad in (0, -3, 2.5):
        with pytest.raises(UsageError, match="--ig-steps"):
            gauss_legendre(bad)


def test_atp_is_signed_first_order_and_completeness_is_measured():
    g = torch.tensor([[1.0, -2.0]])
    w, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.75, 0.25]])
    a = atp(g, w, q)
    assert torch.equal(a, torch.tensor([[0.25, 0.5]]))
    c = completeness({"x": a}, loss_w=1.0, loss_q=1.8)
    assert c.attributed == pytest.approx(0.75) and c.measured == pytest.approx(0.8)
    assert c.gap == pytest.approx(0.05 / 0.8)


def _setup(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitq.data.tasks import Example
    from circuitq.pipeline.stages import quantized_weights

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    words = "the quick brown fox jumps over the lazy dog".split()
    ex = [Example(" ".join(words[: 2 + i % 5]), " " + " ".join(words[i % 3: i % 3 + 3])) for i in range(6)]
    qw = quantized_weights(model, QuantizeConfig(bits=3, group_size=32, method="rtn")).weights
    return d, tok, model, ex, qw


def test_integrated_gradients_are_complete_and_restore_the_model(tiny_dir):
    """Σ attributions converges to L(Q(W)) − L(W) as nodes are added; the model is unchanged."""
    d, tok, model, ex, qw = _setup(tiny_dir)
    calib = CalibConfig(samples=len(ex), seq_len=64, batch_size=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gaps = {}
    for k in (1, 4):
        attr, comp = integrated_gradients(model, tok, ex, qw, calib, steps=k, model_path=str(d), progress=False)
        gaps[k] = comp.gap
        assert set(attr) == set(qw) and all(a.shape == qw[n].shape for n, a in attr.items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert abs(comp.measured) > 1e-3                  # 3-bit RTN changes the loss measurably
    assert gaps[4] <= 0.02 and gaps[4] <= gaps[1]
    # attribution patching is the one-node first-order estimate at W: its sum is less complete
    from circuitq.pipeline.stages import collect_gradients

    g = collect_gradients(model, tok, ex, calib, ("sum",), progress=False, model_path=str(d))["stats"].tensors["sum"]
    first = completeness({n: atp(g[n], model.get_parameter(n), qw[n]) for n in qw}, 0.0, comp.measured)
    assert gaps[4] < first.gap


def test_atp_is_a_saliency_method_like_the_others(tiny_dir):
    from circuitq.pipeline.stages import collect_gradients, quantized_weights, score_weights

    d, tok, model, ex, _ = _setup(tiny_dir)
    calib = CalibConfig(samples=len(ex), seq_len=64, batch_size=3)
    st = collect_gradients(model, tok, ex, calib, ("sum", "sum_abs"), progress=False, model_path=str(d))["stats"]
    from circuitq.pipeline.stages import calibration_tokens

    ref = quantized_weights(model, QuantizeConfig(bits=3, group_size=32, hessian="shared"),
                            calibration_tokens(ex, tok, calib))
    signed = score_weights("atp", model, st, ref)
    bound = score_weights("atp-abs", model, st, ref)
    assert any((s < 0).any() for s in signed.values())         # signed: some quantizations help
    for n in signed:                                            # |Σ G_s ΔW| ≤ Σ |G_s| |ΔW|
        assert (signed[n].abs() <= bound[n] + 1e-6).all()


def test_score_method_ig_writes_a_scores_directory_with_its_completeness(tmp_path, tiny_dir, capsys):
    import json

    from test_score import _task

    from circuitq.cli import main
    from circuitq.saliency.files import load_scores

    d, _ = tiny_dir
    task = _task(tmp_path)
    args = ["score", "--model", str(d), "--task", f"jsonl:{task}", "--samples", "6", "--seq-len", "32",
            "--bits", "3", "--group-size", "32", "--method", "ig", "--out", str(tmp_path / "ig")]
    assert main(args + ["--ig-steps", "4"]) == 0
    sf = load_scores(tmp_path / "ig")
    meta = json.loads((tmp_path / "ig" / "score.json").read_text())
    assert meta["method"] == "ig" and meta["ig_steps"] == 4 and meta["completeness"]["gap"] < 0.05
    assert any((s < 0).any() for s in sf["scores"].values())        # signed
    assert main(["mask", "--scores", str(tmp_path / "ig"), "--out", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    assert main(args[:-1] + [str(tmp_path / "ig0"), "--ig-steps", "0"]) == 2
    assert "--ig-steps must be at least 1" in capsys.readouterr().err
