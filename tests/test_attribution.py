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


def _summed_loss(model, tok, tk, n: int):
    """Σ items' mean NLL over their scored positions, in float64, batches of 4 (its own collation)."""
    from circuitq.data.tasks import collate

    total = 0.0
    for i in range(0, n, 4):
        ids, attn, lm = collate(tk.ids[i:i + 4], tk.scored_from[i:i + 4], tok.pad_token_id or 0)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn.long()).logits[:, :-1].double(), -1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        m = lm[:, :-1].double()
        total = total + ((nll * m).sum(1) / m.sum(1)).sum()
    return total


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
        # plain tensors: no autograd graph that would hold a weight-sized Q(W) − W per weight out of sight (0.8.7
        # made the attribution from the parameter itself, which requires grad: +4 · P_lin resident after IG)
        assert all(a.grad_fn is None and not a.requires_grad for a in attr.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert abs(comp.measured) > 1e-3                  # 3-bit RTN changes the loss measurably
    assert gaps[4] <= 0.02 and gaps[4] <= gaps[1]
    # attribution patching is the one-node first-order estimate at W: its sum is less complete
    from circuitq.pipeline.stages import collect_gradients

    g = collect_gradients(model, tok, ex, calib, ("sum",), progress=False, model_path=str(d))["stats"].tensors["sum"]
    first = completeness({n: atp(g[n], model.get_parameter(n), qw[n]) for n in qw}, 0.0, comp.measured)
    assert gaps[4] < first.gap


def test_integrated_gradients_equal_the_quadrature_written_out(tiny_dir):
    """IG (which makes Q(W) − W one weight at a time and turns its integral into the attribution in
    place, 0.8.6) equals Σ_k w_k · ΣG(W + α_k(Q − W)) · (Q − W) computed here node by node."""
    from circuitq.pipeline.stages import collect_gradients
    from circuitq.saliency.attribution import gauss_legendre

    d, tok, model, ex, qw = _setup(tiny_dir)
    calib = CalibConfig(samples=len(ex), seq_len=64, batch_size=3)
    attr, _ = integrated_gradients(model, tok, ex, qw, calib, steps=3, model_path=str(d), progress=False)
    w = {n: model.get_parameter(n).detach().clone() for n in qw}
    want = {n: torch.zeros_like(w[n]) for n in qw}
    nodes, weights = gauss_legendre(3)
    try:
        for a, wt in zip(nodes, weights):
            with torch.no_grad():
                for n in qw:
                    model.get_parameter(n).copy_(w[n] + a * (qw[n].float() - w[n]))
            g = collect_gradients(model, tok, ex, calib, ("sum",), progress=False, model_path=str(d))["stats"].tensors["sum"]
            for n in qw:
                want[n] += wt * g[n]
    finally:
        with torch.no_grad():
            for n in qw:
                model.get_parameter(n).copy_(w[n])
    for n in qw:
        assert torch.allclose(attr[n], want[n] * (qw[n].float() - w[n]), rtol=1e-4, atol=1e-7), n


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
    assert len(meta["completeness"]["path"]) == 4 and "ig path: the slope" in capsys.readouterr().out   # 0.8.7
    assert meta["completeness"]["path_diagnosis"]["rule"] == pytest.approx(meta["completeness"]["attributed"], rel=1e-4)
    assert any((s < 0).any() for s in sf["scores"].values())        # signed
    assert main(["mask", "--scores", str(tmp_path / "ig"), "--out", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    assert main(args[:-1] + [str(tmp_path / "ig0"), "--ig-steps", "0"]) == 2
    assert "--ig-steps must be at least 1" in capsys.readouterr().err


def test_local_attribution_is_the_directional_derivative_through_the_exact_sublayer_change(tiny_dir):
    """atp-local = ⟨∂L/∂y, y(W_unit→Q) − y(W)⟩ for the unit's sublayer output y: checked against
    dL/dt of the summed loss (float64, its own collation) along y + t·Δy (hooking the sublayer's
    output; t a scalar with a gradient), for a
    query head (attention block) and a neuron block (MLP block); for a unit inside o_proj alone
    (linear in the weight) it equals attribution patching ΣG·ΔW; the model is unchanged."""
    from circuitq.circuits.faithfulness import units
    from circuitq.data.tasks import tokenize_examples
    from circuitq.model.arch import Geometry
    from circuitq.pipeline.stages import collect_gradients
    from circuitq.saliency.attribution import local_attribution, sublayer_of

    d, tok, model, ex, qw = _setup(tiny_dir)
    model = model.double()
    model.config.use_cache = False      # the hooks below rerun the sublayer: no KV cache to append to twice
    qw = {n: q.double() for n, q in qw.items()}
    calib = CalibConfig(samples=len(ex), seq_len=64, batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    geo = Geometry.from_config(model.config)
    shapes = {n: tuple(q.shape) for n, q in qw.items()}
    head = units(shapes, geo, "heads")[5]                     # layer 1, head 1
    block = units(shapes, geo, "neurons", block=32)[2]
    o_only = type(head)("o", {n: m for n, m in head.entries.items() if "o_proj" in n})
    tk = tokenize_examples(ex, tok, 64)

    def summed_loss(*_):
        return _summed_loss(model, tok, tk, len(ex))

    est = local_attribution(model, tok, ex, [head, block, o_only], qw, calib, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    for u in (head, block):
        name = sublayer_of(u.entries)
        mod = model.get_submodule(name)
        delta, busy = {}, []

        def capture(m, args, kwargs, out):   # Δy of this unit on each batch, in call order
            if busy:
                return out
            busy.append(1)
            y = out[0] if isinstance(out, tuple) else out
            saved = {n: model.get_parameter(n).data.clone() for n in u.entries}
            with torch.no_grad():
                for n, msk in u.entries.items():
                    model.get_parameter(n).data[msk] = qw[n][msk]
                y1 = m(*args, **kwargs)
                for n in u.entries:
                    model.get_parameter(n).data.copy_(saved[n])
            delta[len(delta)] = (y1[0] if isinstance(y1, tuple) else y1) - y
            busy.clear()
            return out

        h = mod.register_forward_hook(capture, with_kwargs=True)
        with torch.no_grad():
            summed_loss()   # records Δy per batch
        h.remove()

        # dL/dt at t = 0 of the loss with the sublayer's output moved to y + t·Δy (reverse mode on t)
        t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        calls = iter(range(len(delta)))

        def shift(m, args, out):
            d_ = delta[next(calls)]
            return (out[0] + t * d_,) + tuple(out[1:]) if isinstance(out, tuple) else out + t * d_

        h = mod.register_forward_hook(shift)
        try:
            summed_loss().backward()
        finally:
            h.remove()
        fd = float(t.grad)
        # the loss's gradient goes through float32 logits (capture.sample_losses): agreement to 1e-3
        assert abs(fd) > 1e-6 and est[u.label] == pytest.approx(fd, rel=1e-3), (u.label, name)
    g = collect_gradients(model, tok, ex, calib, ("sum",), progress=False, model_path=str(d))["stats"].tensors["sum"]

    def first_order(u):
        return sum(float((g[n].double() * (qw[n] - model.get_parameter(n).detach()))[m].sum()) for n, m in u.entries.items())

    assert est["o"] == pytest.approx(first_order(o_only), rel=1e-3)
    # gate and up change together inside the block: their product and SiLU's curvature are kept, not dropped
    assert est[block.label] != pytest.approx(first_order(block), rel=0.1)


def test_local_attribution_of_whole_layers_recomputes_the_layer(tiny_dir):
    """A ``layers`` unit spans attention and MLP: atp-local recomputes its common parent, the decoder layer,
    exactly, which is what atp-window does with window 0; an ``.mlp`` sublayer's atp-local is the same as its
    layer's window-0 recompute too (the layer's attention does not see the MLP's weights)."""
    from circuitq.circuits.faithfulness import units
    from circuitq.model.arch import Geometry
    from circuitq.saliency.attribution import local_attribution, sublayer_of

    d, tok, model, ex, qw = _setup(tiny_dir)
    calib = CalibConfig(samples=len(ex), seq_len=64, batch_size=4)
    geo = Geometry.from_config(model.config)
    shapes = {n: tuple(q.shape) for n, q in qw.items()}
    layer_units, subs = units(shapes, geo, "layers"), units(shapes, geo, "sublayers")
    assert [sublayer_of(u.entries) for u in layer_units] == ["model.layers.0", "model.layers.1"]
    for group in (layer_units, [u for u in subs if u.label.endswith(".mlp")]):
        local = local_attribution(model, tok, ex, group, qw, calib, progress=False)
        window = local_attribution(model, tok, ex, group, qw, calib, progress=False, window=0)
        assert all(abs(local[u.label]) > 1e-6 and local[u.label] == pytest.approx(window[u.label], rel=1e-4)
                   for u in group)


def test_local_attribution_per_item_terms_are_each_items_own_estimate(tiny_dir):
    """``per_item``: the terms sum to the totals, and item j's term equals atp-local run on item j
    alone (the items' losses are summed, so nothing crosses between items in a batch)."""
    from circuitq.circuits.faithfulness import units
    from circuitq.model.arch import Geometry
    from circuitq.saliency.attribution import local_attribution

    d, tok, model, ex, qw = _setup(tiny_dir)
    model = model.double()
    model.config.use_cache = False
    qw = {n: q.double() for n, q in qw.items()}
    calib = CalibConfig(samples=len(ex), seq_len=64, batch_size=4)
    geo = Geometry.from_config(model.config)
    shapes = {n: tuple(q.shape) for n, q in qw.items()}
    picked = [units(shapes, geo, "heads")[5], units(shapes, geo, "neurons", block=32)[2]]
    est, per = local_attribution(model, tok, ex, picked, qw, calib, progress=False, per_item=True)
    assert est == local_attribution(model, tok, ex, picked, qw, calib, progress=False)
    for u in picked:
        assert per[u.label].shape == (len(ex),) and per[u.label].sum().item() == pytest.approx(est[u.label], rel=1e-9)
        assert per[u.label].abs().min() > 0
        for j in (0, 3, 5):
            alone = local_attribution(model, tok, [ex[j]], [u], qw, calib, progress=False)[u.label]
            assert per[u.label][j].item() == pytest.approx(alone, rel=1e-6, abs=1e-12)
    # batches bounded by padded tokens (as the gradient pass): more, smaller batches, the same terms
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, a, _o: seen.append(a[0].numel()))
    try:
        from circuitq.data.tasks import tokenize_examples
        small = dict(batch_size=4, batch_tokens=max(len(x) for x in tokenize_examples(ex, tok, 64, loss=calib.loss).ids))
        est2, per2 = local_attribution(model, tok, ex, picked, qw, CalibConfig(samples=len(ex), seq_len=64, **small),
                                       progress=False, per_item=True)
    finally:
        hook.remove()
    assert len(seen) > 2 and max(seen) <= small["batch_tokens"]     # by batch_size alone: 2 batches of 6 items
    for u in picked:
        assert torch.allclose(per2[u.label], per[u.label], rtol=1e-6, atol=1e-12)


def test_window_attribution_is_the_directional_derivative_at_the_windows_last_layer(tiny_dir):
    """atp-window = ⟨∂L/∂h_e, h_e(W_unit→Q) − h_e(W)⟩ with h_e the output of decoder layer
    e = min(l + window, L − 1): checked against dL/dt of the summed loss (float64) along h_e + t·Δh_e,
    Δh_e the exact change of that layer's output when only the unit is replaced (two full forwards),
    on a 3-layer model for a head of layer 0 with window 0, 1 and 5 (capped at the last layer); per-item
    terms sum to the total; the model is unchanged; a bad window or a unit across layers is one line."""
    from conftest import tiny_model
    from transformers import AutoTokenizer

    from circuitq.circuits.faithfulness import Unit, units
    from circuitq.data.tasks import Example, tokenize_examples
    from circuitq.model.arch import Geometry
    from circuitq.pipeline.stages import quantized_weights
    from circuitq.saliency.attribution import local_attribution

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = tiny_model(layers=3, vocab=len(tok)).double()
    model.config.use_cache = False
    words = "the quick brown fox jumps over the lazy dog".split()
    ex = [Example(" ".join(words[: 2 + i % 5]), " " + " ".join(words[i % 3: i % 3 + 3])) for i in range(6)]
    qw = quantized_weights(model, QuantizeConfig(bits=2, group_size=32, method="rtn")).weights
    calib = CalibConfig(samples=len(ex), seq_len=64, batch_size=4)
    geo = Geometry.from_config(model.config)
    head = units({n: tuple(q.shape) for n, q in qw.items()}, geo, "heads")[1]      # layer 0, head 1
    assert {n.split(".")[2] for n in head.entries} == {"0"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tk = tokenize_examples(ex, tok, 64)
    layers = model.model.layers

    def summed_loss():
        return _summed_loss(model, tok, tk, len(ex))

    def outputs_of(e):
        got = []
        h = layers[e].register_forward_hook(lambda m, a, out: got.append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            summed_loss()
        h.remove()
        return got

    for window, e in ((0, 0), (1, 1), (5, 2)):
        est, per = local_attribution(model, tok, ex, [head], qw, calib, progress=False, per_item=True, window=window)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert per[head.label].sum().item() == pytest.approx(est[head.label], rel=1e-9)
        h0 = outputs_of(e)
        saved = {n: model.get_parameter(n).data.clone() for n in head.entries}
        with torch.no_grad():
            for n, msk in head.entries.items():
                model.get_parameter(n).data[msk] = qw[n][msk]
        h1 = outputs_of(e)
        with torch.no_grad():
            for n in head.entries:
                model.get_parameter(n).data.copy_(saved[n])
        t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        calls = iter(range(len(h0)))

        def shift(m, args, out):
            k = next(calls)
            d_ = h1[k] - h0[k]
            return (out[0] + t * d_,) + tuple(out[1:]) if isinstance(out, tuple) else out + t * d_

        hook = layers[e].register_forward_hook(shift)
        try:
            summed_loss().backward()
        finally:
            hook.remove()
        assert abs(float(t.grad)) > 1e-6 and est[head.label] == pytest.approx(float(t.grad), rel=1e-3), window
    # the window changes the estimate (layer 0's change goes through nonlinear layers 1 and 2)
    ests = [local_attribution(model, tok, ex, [head], qw, calib, progress=False, window=w)[head.label] for w in (0, 2)]
    assert ests[0] != pytest.approx(ests[1], rel=1e-3)
    with pytest.raises(UsageError, match="--window"):
        local_attribution(model, tok, ex, [head], qw, calib, progress=False, window=-1)
    two = Unit("two", {n: m for u in units({n: tuple(q.shape) for n, q in qw.items()}, geo, "heads")[::4]
                       for n, m in u.entries.items()})
    with pytest.raises(UsageError, match="one decoder layer"):
        local_attribution(model, tok, ex, [two], qw, calib, progress=False, window=1)


def test_second_order_adds_half_the_square_of_each_items_own_term():
    """atp-local2 per item is t + ½t² (the docstring's worked example: terms that cancel to first
    order do not cancel here), summed per unit; a unit whose terms are all zero stays zero. And the
    reason for the empirical Fisher: for one token's NLL, averaging (g_y·δ)² over labels y drawn
    from the model's own p gives exactly the Gauss–Newton term δᵀ(diag p − ppᵀ)δ."""
    from circuitq.saliency.attribution import second_order

    tot, per = second_order({"a": torch.tensor([0.2, -0.2], dtype=torch.float64), "z": torch.zeros(3, dtype=torch.float64)})
    assert tot["a"] == pytest.approx(0.04) and per["a"].tolist() == pytest.approx([0.22, -0.18])
    assert tot["z"] == 0.0 and per["z"].shape == (3,)
    g = torch.Generator().manual_seed(0)
    z, delta = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    p = torch.softmax(z, 0)
    fisher = sum(p[y] * float((p - torch.eye(7, dtype=torch.float64)[y]) @ delta) ** 2 for y in range(7))
    assert float(fisher) == pytest.approx(float(delta @ (torch.diag(p) - torch.outer(p, p)) @ delta), rel=1e-12)


def test_denoising_attribution_is_the_first_order_effect_of_restoring_a_unit_in_the_replaced_model(tiny_dir):
    """atp-denoise: with every query head replaced by Q(W) (the keep-top curve's k = 0 model W'),
    a head's sum is ``−d/dt L(W' + t·(W_u − Q_u))`` at t = 0 (central difference, float64, the
    loss collated on its own); it is not atp (the gradient is taken at W', not at W); the model is
    unchanged afterwards."""
    from circuitq.circuits.faithfulness import replaced, union, unit_sum, units
    from circuitq.data.tasks import collate, tokenize_examples
    from circuitq.model.arch import Geometry
    from circuitq.pipeline.stages import collect_gradients
    from circuitq.saliency.attribution import denoising_attribution

    d, tok, model, ex, qw = _setup(tiny_dir)
    model = model.double()
    qw = {n: q.double() for n, q in qw.items()}
    calib = CalibConfig(samples=len(ex), seq_len=64, batch_size=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {n: tuple(q.shape) for n, q in qw.items()}
    heads = units(shapes, Geometry.from_config(model.config), "heads")
    cover = union([u.entries for u in heads])
    est = denoising_attribution(model, tok, ex, cover, qw, calib, model_path=str(d), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(est) == set(qw) and all(est[n].shape == qw[n].shape for n in qw)
    tk = tokenize_examples(ex, tok, 64)

    @torch.no_grad()
    def loss():   # Σ items' mean NLL over their scored positions, float64
        total = 0.0
        for i in range(0, len(ex), 3):
            ids, attn, lm = collate(tk.ids[i:i + 3], tk.scored_from[i:i + 3], tok.pad_token_id or 0)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn.long()).logits[:, :-1].double(), -1)
            nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
            m = lm[:, :-1].double()
            total += float(((nll * m).sum(1) / m.sum(1)).sum())
        return total

    g = collect_gradients(model, tok, ex, calib, ("sum",), progress=False, model_path=str(d))["stats"].tensors["sum"]
    noising = {n: atp(g[n].double(), model.get_parameter(n).detach(), qw[n]) for n in qw}
    eps, differ = 1e-3, 0
    for u in heads[:4]:
        w_u = {n: model.get_parameter(n).detach().clone() for n in u.entries}
        fd = []
        for t in (eps, -eps):   # W' with the unit moved a step t towards W
            vals = {**qw, **{n: qw[n] + t * (w_u[n] - qw[n]) * m for n, m in u.entries.items()}}
            with replaced(model, cover, vals):
                fd.append(loss())
        deriv = (fd[0] - fd[1]) / (2 * eps)
        pred = unit_sum(u, est)
        assert abs(deriv) > 1e-6 and pred == pytest.approx(-deriv, rel=2e-3, abs=1e-7), u.label
        differ += pred != pytest.approx(unit_sum(u, noising), rel=0.05)
    assert differ >= 1          # the base point matters: restoring in W' is not replacing in W


def test_walk_path_gives_the_loss_and_its_slope_along_the_path(tiny_dir):
    """Each point's loss is the summed loss at W + α(Q − W) (a loss pass written out here) and its slope is
    dL/dα (a central difference of that loss); the model is unchanged after; IG's nodes carry the same, and
    the rule over their slopes is IG's Σ attributions."""
    from circuitq.saliency.attribution import summed_loss, walk_path

    d, tok, model, ex, qw = _setup(tiny_dir)
    calib = CalibConfig(samples=len(ex), seq_len=64, batch_size=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pts = walk_path(model, tok, ex, qw, calib, [0.0, 0.5, 1.0], model_path=str(d), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    w = {n: model.get_parameter(n).detach().clone() for n in qw}

    def loss_at(a):
        with torch.no_grad():
            for n in qw:
                model.get_parameter(n).copy_(w[n] + a * (qw[n].float() - w[n]))
        try:
            return summed_loss(model, tok, ex, calib)
        finally:
            with torch.no_grad():
                for n in qw:
                    model.get_parameter(n).copy_(w[n])

    from circuitq.saliency.attribution import path_item_losses

    per_item = path_item_losses(model, tok, ex, qw, calib, [p.alpha for p in pts], progress=False)
    assert per_item.shape == (3, len(ex)) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert per_item.sum(1).tolist() == pytest.approx([p.loss for p in pts], rel=1e-5)   # forward-only = the passes' loss
    h = 0.02
    for p in pts:
        assert p.loss == pytest.approx(loss_at(p.alpha), rel=1e-5)
        fd = (loss_at(p.alpha + h) - loss_at(p.alpha - h)) / (2 * h)
        assert p.slope == pytest.approx(fd, rel=0.02, abs=1e-3), p
    assert abs(pts[-1].loss - pts[0].loss) > 1e-3
    attr, comp = integrated_gradients(model, tok, ex, qw, calib, steps=3, model_path=str(d), progress=False)
    nodes, weights = gauss_legendre(3)
    assert [p.alpha for p in comp.path] == pytest.approx(nodes)
    assert sum(wt * p.slope for wt, p in zip(weights, comp.path)) == pytest.approx(comp.attributed, rel=1e-4)
    assert comp.loss_w == pytest.approx(pts[0].loss, rel=1e-6)
    assert comp.measured == pytest.approx(pts[-1].loss - pts[0].loss, rel=1e-4)


def test_path_diagnosis_finds_cancellation_and_the_unresolved_segment():
    import math

    from circuitq.saliency.attribution import PathPoint, path_diagnosis

    # L(α) = 10 sin(2πα) + α: net change 1 made of rises and falls of ~40
    f = lambda a: 10 * math.sin(2 * math.pi * a) + a                      # noqa: E731
    df = lambda a: 20 * math.pi * math.cos(2 * math.pi * a) + 1           # noqa: E731
    x, w = gauss_legendre(8)
    d = path_diagnosis(f(0), f(1), [PathPoint(a, f(a), df(a)) for a in x], w)
    assert d["rule"] == pytest.approx(1.0, abs=1e-3) and d["measured"] == pytest.approx(1.0)
    assert d["variation"] == pytest.approx(40, rel=0.05) and d["cancellation"] > 30     # ∫|20π cos 2πα| = 40
    # L(α) = 100 α^12: the rise is near α = 1, the unresolved segments are the last two (sparse nodes there)
    g = lambda a: 100 * a ** 12                                           # noqa: E731
    x, w = gauss_legendre(4)
    d = path_diagnosis(g(0), g(1), [PathPoint(a, g(a), 1200 * a ** 11) for a in x], w)
    assert d["worst"]["from"] >= x[-2] - 1e-12
    assert abs(d["worst"]["rise"] - d["worst"]["predicted"]) > 10
    assert d["cancellation"] == pytest.approx(d["variation"] / 100) and abs(d["rule"] - 100) < 1   # GL still integrates it
    # the trapezoid form (no weights) over a straight line is exact
    d = path_diagnosis(1.0, 3.0, [PathPoint(0.25, 1.5, 2.0), PathPoint(0.75, 2.5, 2.0)])
    assert d["rule"] == pytest.approx(2.0) and all(abs(s["rise"] - s["predicted"]) < 1e-12 for s in d["segments"])


def test_describe_path_says_what_to_do_only_when_the_gap_is_large():
    from circuitq.saliency.attribution import PathPoint, describe_path, path_diagnosis

    d = path_diagnosis(1.0, 3.0, [PathPoint(0.25, 1.5, 2.0), PathPoint(0.75, 2.5, 2.0)], [0.5, 0.5])
    assert "variation ∫|dL/dα| of 2.0000 (1.0x the net change)" in describe_path(d, 0.01)
    assert "more --ig-steps" not in describe_path(d, 0.01) and "more --ig-steps" in describe_path(d, 0.2)
