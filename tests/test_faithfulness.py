"""Faithfulness: units are the right slices, replacing a unit touches only it and is undone bit
for bit, and for a small change the first-order prediction equals the measured change."""
from __future__ import annotations

import json
import math

import pytest
import torch

from circuitq.circuits.faithfulness import complement, random_like, replaced, spearman, unit_sum, units
from circuitq.model.arch import Geometry, target_shapes
from conftest import tiny_model


def test_units_are_gqa_aware_slices():
    model = tiny_model(seed=0)
    geo = Geometry.from_config(model.config)          # 4 query heads, 2 KV heads, head dim 16, MLP 128
    shapes = target_shapes(model)
    heads = units(shapes, geo, "heads")
    assert [u.label for u in heads[:4]] == ["L0.H0", "L0.H1", "L0.H2", "L0.H3"] and len(heads) == 8
    h1 = heads[1].entries
    q = h1["model.layers.0.self_attn.q_proj.weight"]
    o = h1["model.layers.0.self_attn.o_proj.weight"]
    assert q[16:32].all() and q.sum() == 16 * 64 and o[:, 16:32].all() and o.sum() == 64 * 16
    kv = units(shapes, geo, "kv-heads")
    assert len(kv) == 4 and kv[1].entries["model.layers.0.self_attn.k_proj.weight"][16:32].all()
    neurons = units(shapes, geo, "neurons", block=64)
    assert len(neurons) == 4 and neurons[0].entries["model.layers.0.mlp.down_proj.weight"][:, :64].all()
    assert len(units(shapes, geo, "modules")) == 14
    with pytest.raises(ValueError, match="unknown unit kind"):
        units(shapes, geo, "blocks")


def test_sublayer_and_layer_units_cover_their_blocks_exactly():
    """``sublayers``: each layer's attention block (every entry of q, k, v, o) and MLP block (gate, up,
    down); ``layers``: both; the two attention and MLP units of a layer partition its layer unit."""
    model = tiny_model(seed=0)
    geo = Geometry.from_config(model.config)
    shapes = target_shapes(model)
    subs = units(shapes, geo, "sublayers")
    layers = units(shapes, geo, "layers")
    assert [u.label for u in subs] == ["L0.attn", "L0.mlp", "L1.attn", "L1.mlp"] and [u.label for u in layers] == ["L0", "L1"]
    attn = {n.rsplit(".", 2)[-2] for n in subs[0].entries}
    mlp = {n.rsplit(".", 2)[-2] for n in subs[1].entries}
    assert attn == {"q_proj", "k_proj", "v_proj", "o_proj"} and mlp == {"gate_proj", "up_proj", "down_proj"}
    assert all(m.all() for u in subs + layers for m in u.entries.values())        # whole weights
    for lay, (a, b) in zip(layers, zip(subs[0::2], subs[1::2])):
        assert set(lay.entries) == set(a.entries) | set(b.entries) and not set(a.entries) & set(b.entries)
        assert all(n.startswith(f"model.layers.{lay.label[1:]}.") for n in lay.entries)
    assert sum(int(m.sum()) for u in layers for m in u.entries.values()) == sum(a * b for a, b in shapes.values())


def test_layer_profile_orders_blocks_by_layer():
    from circuitq.circuits.faithfulness import layer_profile

    rows = [{"label": "L1.mlp", "measured_loss": 0.3, "predicted": {"atp": 3.0}},
            {"label": "L0.attn", "measured_loss": 0.1, "predicted": {"atp": 1.0}},
            {"label": "L0.mlp", "measured_loss": 0.2, "predicted": {"atp": 2.0}}]
    assert layer_profile(rows, "atp") == {"attn": [(0, 0.1, 1.0)], "mlp": [(0, 0.2, 2.0), (1, 0.3, 3.0)]}
    assert layer_profile([{"label": "L2", "measured_loss": 1.0, "predicted": {}}], "atp") == {"layer": [(2, 1.0, None)]}
    assert layer_profile([{"label": "L0.H3", "measured_loss": 0.1, "predicted": {}}] + rows, "atp") == {}


def test_faithfulness_over_layers_with_local_estimators(tmp_path, tiny_dir, capsys):
    """Attention and MLP blocks as units, every one measured; for an MLP block atp-local (which recomputes the
    block) and atp-window with window 0 (the whole layer, whose attention the unit does not touch) agree. Whole
    layers: too few on a 2-layer model, a one-line error."""
    from circuitq.cli import main
    from test_score import _score, _task

    d, _ = tiny_dir
    task = _task(tmp_path)
    assert _score(d, task, tmp_path / "s", "--group-size", "32") == 0
    out = tmp_path / "layers.json"
    assert main(["faithfulness", "--scores", str(tmp_path / "s"), "--units", "layers", "--all-units",
                 "--estimators", "atp", "atp-local", "atp-window", "--window", "0", "--calib-samples", "6",
                 "--eval-samples", "6", "--group-size", "32", "--out", str(out)]) == 2   # 2 units: too few to rank
    assert "--units layers: this model has 2 such units" in capsys.readouterr().err and not out.exists()
    out = tmp_path / "sub.json"
    assert main(["faithfulness", "--scores", str(tmp_path / "s"), "--units", "sublayers", "--all-units",
                 "--estimators", "atp", "atp-local", "atp-window", "--window", "0", "--calib-samples", "6",
                 "--eval-samples", "6", "--group-size", "32", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["units_kind"] == "sublayers" and sorted(u["label"] for u in rep["units"]) == ["L0.attn", "L0.mlp",
                                                                                             "L1.attn", "L1.mlp"]
    for u in rep["units"]:
        p = u["predicted"]
        assert math.isfinite(u["measured_loss"]) and all(math.isfinite(v) for v in p.values())
        if u["label"].endswith(".mlp"):
            assert p["atp-local"] == pytest.approx(p["atp-window"], rel=1e-4, abs=1e-7)


def test_replacing_a_unit_changes_only_it_and_is_undone():
    model = tiny_model(seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    u = units(target_shapes(model), Geometry.from_config(model.config), "heads")[2]
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with replaced(model, u.entries, zeros):
        for n, p in model.named_parameters():
            if n in u.entries:
                assert (p[u.entries[n]] == 0).all() and torch.equal(p[~u.entries[n]], before[n][~u.entries[n]])
            else:
                assert torch.equal(p, before[n])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_first_order_prediction_matches_a_small_measured_change():
    """Loss = mean NLL of fixed tokens; for a small replacement the change per unit is Σ G·ΔW
    (measured as a central difference, which cancels the second-order term; HF's RMSNorm
    computes in float32, so the change must stay well above float32 rounding of the loss)."""
    model = tiny_model(seed=2).double()
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))

    def nll(m):   # in float64 (HF's own loss casts logits to float32)
        logits = m(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def loss(m):
        with torch.no_grad():
            return float(nll(m))

    model.zero_grad()
    nll(model).backward()
    shapes = target_shapes(model)
    G = {n: model.get_parameter(n).grad.detach().clone() for n in shapes}
    g = torch.Generator().manual_seed(1)
    dW = {n: 1e-4 * torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    plus = {n: model.get_parameter(n).detach() + dW[n] for n in shapes}
    minus = {n: model.get_parameter(n).detach() - dW[n] for n in shapes}
    pred, meas = [], []
    for u in units(shapes, Geometry.from_config(model.config), "heads"):
        pred.append(unit_sum(u, {n: G[n] * dW[n] for n in shapes}))
        with replaced(model, u.entries, plus):
            up = loss(model)
        with replaced(model, u.entries, minus):
            down = loss(model)
        meas.append((up - down) / 2)
    for p, m in zip(pred, meas):
        assert m == pytest.approx(p, rel=1e-2)
    assert spearman(pred, meas) > 0.95


def test_random_sets_match_the_circuit_size_and_complements():
    shapes = {"a": (4, 8), "b": (2, 2)}
    circ = {"a": torch.zeros(4, 8, dtype=torch.bool), "b": torch.ones(2, 2, dtype=torch.bool)}
    circ["a"][0, :5] = True
    r = random_like(circ, shapes, 0)
    assert int(r["a"].sum()) == 5 and int(r["b"].sum()) == 4
    c = complement(circ, shapes)
    assert int(c["a"].sum()) == 27 and int(c["b"].sum()) == 0


def test_faithfulness_cli_end_to_end(tmp_path, tiny_dir):
    from circuitq.cli import main
    from test_score import _score, _task

    d, _ = tiny_dir
    task = _task(tmp_path)
    assert _score(d, task, tmp_path / "s", "--group-size", "32") == 0
    out = tmp_path / "f.json"
    assert main(["faithfulness", "--scores", str(tmp_path / "s"), "--units", "heads", "--top", "2", "--random", "2",
                 "--calib-samples", "6", "--eval-samples", "6", "--group-size", "32", "--fraction", "0.05",
                 "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert len(rep["units"]) == 4 and set(rep["spearman"]) == {"score", "atp"}
    assert set(rep["contrasts"]) == {"only circuit", "only random", "all but circuit", "all but random"}
    assert rep["contrasts"]["all but random"]["loss_change"] != 0
    assert main(["faithfulness", "--scores", str(tmp_path / "s"), "--top", "1", "--random", "1",
                 "--out", str(tmp_path / "g.json")]) == 2   # too few units for a rank correlation


def test_weight_level_estimators_reach_the_measurement_as_unit_sums(tmp_path, tiny_dir, monkeypatch):
    """Each weight-level estimator (the scores, atp, ig, a saliency method) is reduced to its unit sums as soon as it
    is made (0.8.8): the measurement holds no [out, in] tensor of any (4 · P_lin each before), and the predictions
    are those sums."""
    import circuitq.pipeline.stages as stages
    from circuitq.circuits.faithfulness import UnitEstimate
    from circuitq.cli import main
    from test_score import _score, _task

    d, _ = tiny_dir
    task = _task(tmp_path)
    assert _score(d, task, tmp_path / "s", "--group-size", "32") == 0
    seen = {}
    real = stages.faithfulness_report

    def spy(model, loss_fn, scores, unit_list, values, estimators, **kw):
        seen.update(estimators)
        return real(model, loss_fn, scores, unit_list, values, estimators, **kw)

    monkeypatch.setattr(stages, "faithfulness_report", spy)
    out = tmp_path / "f.json"
    assert main(["faithfulness", "--scores", str(tmp_path / "s"), "--units", "heads", "--all-units", "--estimators",
                 "score", "atp", "ig", "grad", "--ig-steps", "2", "--calib-samples", "6", "--eval-samples", "6",
                 "--group-size", "32", "--out", str(out)]) == 0
    assert set(seen) == {"score", "atp", "ig", "grad"} and all(isinstance(v, UnitEstimate) for v in seen.values())
    rep = json.loads(out.read_text())
    for u in rep["units"]:
        assert all(u["predicted"][e] == pytest.approx(seen[e].values[u["label"]]) for e in seen)


def test_curve_helpers_worked_examples():
    from circuitq.circuits.faithfulness import curve_area, recovery, unit_order, Unit

    assert curve_area([0, 0.5, 1], [0, 1, 1]) == 0.75
    assert recovery("keep-top", 3.0, 4.0, 0.0) == 0.75 and recovery("replace-top", 3.0, 4.0, 0.0) == 0.25
    assert math.isnan(recovery("keep-top", 1.0, 2.0, 2.0))
    us = [Unit(f"u{i}", {"w": torch.arange(3)[:, None].expand(3, 3) == i}) for i in range(3)]   # row i
    vals = {"w": torch.tensor([[1.0, 1, 1], [-5, -5, -5], [2, 2, 2]])}
    assert unit_order(us, vals) == [2, 0, 1]     # signed: the unit predicted to help comes last
    assert sorted(unit_order(us, None, seed=3)) == [0, 1, 2]


def test_curves_reach_both_ends_and_order_by_the_estimator():
    """On a model whose loss is a weighted sum of its units' replacement, the exact estimator's
    ordering recovers fastest, and both modes end at 0 and 1."""
    from circuitq.circuits.faithfulness import Unit, faithfulness_curves

    w = torch.nn.Parameter(torch.ones(1, 6))
    model = torch.nn.Module()
    model.register_parameter("w", w)
    importance = torch.tensor([5.0, 0.1, 3.0, 0.2, 1.0, 0.3])

    def loss_fn(m):
        loss = float(((1 - m.w.detach()[0]) * importance).sum())
        return loss, -loss

    us = [Unit(f"u{i}", {"w": torch.nn.functional.one_hot(torch.tensor([i]), 6).bool()}) for i in range(6)]
    values = {"w": torch.zeros(1, 6)}
    exact = importance.argsort(descending=True).tolist()
    rep = faithfulness_curves(model, loss_fn, us, values, {"exact": exact, "reverse": exact[::-1]},
                              (0, 1 / 3, 2 / 3, 1), progress=False)
    for name in ("exact", "reverse"):
        for mode in ("keep-top", "replace-top"):
            pts = rep["orderings"][name][mode]["points"]
            assert pts[0]["recovery"] == pytest.approx(0) and pts[-1]["recovery"] == pytest.approx(1)
    assert rep["orderings"]["exact"]["keep-top"]["area"] > rep["orderings"]["reverse"]["keep-top"]["area"]
    assert rep["orderings"]["exact"]["keep-top"]["points"][1]["recovery"] == pytest.approx(8 / 9.6)
    assert torch.equal(model.w.detach(), torch.ones(1, 6))     # restored


def test_faithfulness_all_heads_estimators_and_curves_end_to_end(tmp_path, tiny_dir, capsys):
    from circuitq.cli import main
    from test_score import _score, _task

    d, _ = tiny_dir
    task = _task(tmp_path)
    assert _score(d, task, tmp_path / "s", "--group-size", "32") == 0
    out = tmp_path / "f.json"
    assert main(["faithfulness", "--scores", str(tmp_path / "s"), "--units", "heads", "--all-units",
                 "--estimators", "score", "atp", "atp-local", "atp-local2", "atp-window", "atp-window2", "atp-denoise", "ig",
                 "grad", "--ig-steps", "2", "--window", "1", "--curve", "--curve-grid", "0", "0.5", "1",
                 "--calib-samples", "6", "--eval-samples", "6", "--group-size", "32", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    cfg = json.loads((d / "config.json").read_text())
    assert len(rep["units"]) == cfg["num_hidden_layers"] * cfg["num_attention_heads"]   # every query head
    assert set(rep["spearman"]) == {"score", "atp", "atp-local", "atp-local2", "atp-window", "atp-window2", "atp-denoise",
                                    "ig", "grad"} and rep["units_measured"] == "all"
    assert all(math.isfinite(u["predicted"][e]) for u in rep["units"]
               for e in ("atp-local", "atp-local2", "atp-window", "atp-window2", "atp-denoise"))
    assert rep["window"] == 1
    # layer 0's heads: the window carries their change through layer 1 exactly, so it differs from atp-local
    first = [u for u in rep["units"] if u["label"].startswith("L0.")]
    assert any(u["predicted"]["atp-window"] != pytest.approx(u["predicted"]["atp-local"], rel=1e-4) for u in first)
    assert all(u["predicted"]["atp-window2"] >= u["predicted"]["atp-window"] for u in rep["units"])
    # atp-local2 = atp-local + ½Σt_i²: never below it, above it wherever a head's block changes anything
    gap = [u["predicted"]["atp-local2"] - u["predicted"]["atp-local"] for u in rep["units"]]
    assert all(g >= 0 for g in gap) and sum(g > 0 for g in gap) > len(gap) // 2
    assert rep["completeness"]["ig_steps"] == 2 and math.isfinite(rep["completeness"]["ig"]["gap"])
    # the loss and slope at ig's 2 nodes (0.8.7): the rule over the slopes is Σ attributions, and the diagnosis reads them
    comp = rep["completeness"]
    assert [p["alpha"] for p in comp["path"]] == pytest.approx([0.5 - 3 ** -0.5 / 2, 0.5 + 3 ** -0.5 / 2])
    assert comp["path_diagnosis"]["rule"] == pytest.approx(comp["ig"]["attributed"], rel=1e-4, abs=1e-6)
    assert comp["path_diagnosis"]["variation"] >= abs(comp["path_diagnosis"]["rule"]) - 1e-9
    assert len(comp["path_diagnosis"]["segments"]) == 3 and comp["path_diagnosis"]["worst"] in comp["path_diagnosis"]["segments"]
    # ig's cost: its 2 + 2 passes over the calibration items, timed, with the tokens they hold
    cost = rep["ig_cost"]
    assert cost["passes"] == 4 and cost["calibration_tokens"] > 6 and cost["seconds"] > 0
    assert cost["seconds_per_step"] == pytest.approx(cost["seconds"] / 4)
    assert cost["tokens_per_second"] == pytest.approx(cost["calibration_tokens"] / cost["seconds_per_step"])
    secs = rep["timing"]["seconds"]
    assert {"gradient pass", "measurement (units, contrasts)", "curves"} <= set(secs)
    assert secs["other estimators (ig, atp-denoise, weight-level)"] >= cost["seconds"]
    assert rep["replay"]["span"] == math.ceil(math.sqrt(cfg["num_hidden_layers"])) and rep["replay"]["moves"] >= 0
    assert -1 <= rep["noise_ceiling"]["split_half_spearman"] <= 1 and 0 <= rep["noise_ceiling"]["ceiling"] <= 1
    er = rep["estimator_reliability"]
    # atp-local from its per-item terms; the additive weight-level methods (atp, grad) from two halves of the items
    assert set(er) == {"atp-local", "atp-local2", "atp-window", "atp-window2", "atp", "grad"}
    assert all(er[e]["items"] == 6 and -1 <= er[e]["split_half_spearman"] <= 1 for e in er)
    printed = capsys.readouterr().out
    assert "[circuitq] ig path: the slope dL/dα at the nodes integrates to" in printed
    assert "estimator noise: atp-local over the even and the odd of its 6 calibration items" in printed
    assert "estimator noise: atp over the even and the odd of its 6 calibration items" in printed
    for k, v in (rep["attenuation"] or {}).items():   # only where both reliabilities are positive
        assert er[k]["reliability"] > 0 and v["attainable"] == pytest.approx(
            math.sqrt(er[k]["reliability"] * rep["noise_ceiling"]["reliability"]))
    # the peak memory of each stage, where the kernel gives it (Linux): in the file and one line
    from circuitq.pipeline.budget import PeakMeter
    if PeakMeter().ok:
        peaks = rep["memory"]["measured_peak_bytes"]
        assert {"Q(W) and the replacement", "gradient pass", "unit attribution (atp-local, atp-window)",
                "measurement (units, contrasts)", "curves"} <= set(peaks)
        assert all(v > 0 for v in peaks.values()) and rep["memory"]["process_peak_bytes"] >= max(peaks.values())
        assert "[circuitq] peak memory by stage: Q(W) and the replacement" in printed
    assert "[circuitq] time by stage: Q(W) and the replacement" in printed and "[circuitq] ig cost: " in printed
    assert set(rep["curves"]["orderings"]) == {"score", "atp", "atp-local", "atp-local2", "atp-window", "atp-window2",
                                               "atp-denoise", "ig", "grad", "random"}
    rows = (tmp_path / "f.curves.csv").read_text().splitlines()
    assert len(rows) == 1 + 10 * 2 * 3
    for o in rep["curves"]["orderings"].values():
        for mode in ("keep-top", "replace-top"):
            assert [p["units"] for p in o[mode]["points"]] == [0, len(rep["units"]) // 2, len(rep["units"])]


def test_faithfulness_bad_input_is_one_line(tmp_path, tiny_dir, capsys):
    from circuitq.cli import main
    from test_score import _score, _task

    d, _ = tiny_dir
    task = _task(tmp_path)
    assert _score(d, task, tmp_path / "s", "--group-size", "32") == 0
    base = ["faithfulness", "--scores", str(tmp_path / "s"), "--out", str(tmp_path / "x.json")]
    for extra, needle in ((["--estimators", "atp", "nope"], "unknown estimator nope for --estimators; choose from score, ig"),
                          (["--ig-steps", "0"], "--ig-steps"),
                          (["--window", "-1"], "--window"),
                          (["--estimators", "spqr"], "unknown estimator spqr"),
                          (["--curve-grid", "0", "1.5"], "--curve-grid takes fractions in [0, 1]")):
        capsys.readouterr()
        assert main(base + extra) == 2, extra
        err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("Loading weights")]
        assert len(err) == 1 and needle in err[0], (extra, err)
    assert not (tmp_path / "x.json").exists()


def test_layer_replay_gives_the_same_losses_with_less_work(tiny_dir):
    """A unit in the last layer measured with the layers below it replayed from the recorded
    evaluation gives the same loss as the full forward; a mismatch in calls is refused."""
    from circuitq.circuits.faithfulness import LayerReplay, first_layer, measure
    from circuitq.model.loading import load_model

    d, _ = tiny_dir
    lm = load_model(str(d))
    model = lm.model
    ids = torch.randint(0, 100, (3, 12))

    def loss_fn(m):
        with torch.no_grad():
            out = m(input_ids=ids, labels=ids)
        return float(out.loss), None

    geo = Geometry.from_config(model.config)
    shapes = {n: tuple(model.get_parameter(n).shape) for n in target_shapes(model)}
    last = [u for u in units(shapes, geo, "heads") if u.label.startswith(f"L{geo.n_layers - 1}.")][0]
    assert first_layer(last.entries) == geo.n_layers - 1
    values = {n: torch.zeros(s) for n, s in shapes.items()}
    cache = LayerReplay(model.model.layers)
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))   # inside layer 0
    with cache.record():
        base = loss_fn(model)
    full = measure(model, loss_fn, last.entries, values)
    n0 = len(calls)
    fast = measure(model, loss_fn, last.entries, values, cache)
    assert len(calls) == n0                      # layer 0 was replayed, not run
    assert fast[0] == pytest.approx(full[0], abs=1e-6) and fast[0] != pytest.approx(base[0], abs=1e-6)
    assert loss_fn(model) == base                # everything restored
    with pytest.raises(RuntimeError, match="differently"):
        with cache.replay(geo.n_layers - 1):
            pass                                 # no call at all: not what was recorded


def test_layer_replay_window_holds_few_layers_and_gives_every_units_loss():
    """With a window of one layer the replay holds at most two layers' outputs, moves once per layer
    going up (and from scratch going down), and every unit's loss equals a full forward's; a move
    whose unchanged loss does not reproduce is refused."""
    from circuitq.circuits.faithfulness import LayerReplay, first_layer, measure

    model = tiny_model(layers=5)
    batches = [torch.randint(0, 100, (2, 10)), torch.randint(0, 100, (3, 7))]

    def loss_fn(m):
        with torch.no_grad():
            losses = [float(m(input_ids=b, labels=b).loss) for b in batches]
        return sum(losses) / len(losses), None

    geo = Geometry.from_config(model.config)
    shapes = {n: tuple(model.get_parameter(n).shape) for n in target_shapes(model)}
    heads = sorted(units(shapes, geo, "heads"), key=lambda u: first_layer(u.entries))
    per_layer = [[u for u in heads if first_layer(u.entries) == layer][0] for layer in range(geo.n_layers)]
    values = {n: torch.randn(s) for n, s in shapes.items()}
    full = [measure(model, loss_fn, u.entries, values)[0] for u in per_layer]
    cache = LayerReplay(model.model.layers, span=1)
    assert LayerReplay(model.model.layers).span == math.ceil(math.sqrt(geo.n_layers))
    with cache.record():
        base = loss_fn(model)
    cache.reference = base[0]
    held = []
    for u, want in zip(per_layer, full):             # up: one move per layer above the first window
        got = measure(model, loss_fn, u.entries, values, cache)[0]
        assert got == pytest.approx(want, abs=1e-6) and got != pytest.approx(base[0], abs=1e-6)
        held.append(sorted(cache.outputs))
        assert all(len(v) == len(batches) for v in cache.outputs.values())
    assert max(len(h) for h in held) <= 1 and cache.moves == geo.n_layers - 2
    moves = cache.moves
    got = measure(model, loss_fn, per_layer[1].entries, values, cache)[0]   # down: from scratch
    assert got == pytest.approx(full[1], abs=1e-6) and cache.moves == moves + 1 and sorted(cache.outputs) == [0]
    assert loss_fn(model) == base                    # everything restored
    cache.reference = base[0] + 1.0                  # a replay that would not reproduce the unchanged model
    with pytest.raises(RuntimeError, match="moved"):
        cache.ensure(geo.n_layers - 1, lambda: loss_fn(model))
    with pytest.raises(RuntimeError, match="not held"):
        with LayerReplay(model.model.layers, span=1).replay(1):
            pass
    # planned: only the layers below the units that will be measured, no move when they fit in one window
    planned = LayerReplay(model.model.layers, span=2)
    planned.plan([0, 3])                             # units of layers 1 and 4
    with planned.record():
        loss_fn(model)
    assert sorted(planned.outputs) == [0, 3]
    for layer in (1, 4):
        got = measure(model, loss_fn, per_layer[layer].entries, values, planned)[0]
        assert got == pytest.approx(full[layer], abs=1e-6)
    assert planned.moves == 0 and sorted(planned.outputs) == [0, 3]
    got = measure(model, loss_fn, per_layer[3].entries, values, planned)[0]   # unplanned: moved there
    assert got == pytest.approx(full[3], abs=1e-6) and planned.moves == 1 and 2 in planned.outputs


def test_curves_and_report_with_a_one_layer_replay_equal_full_forwards():
    """Curves and the per-unit report measured through a replay window of one layer (units taken in
    layer order, the window moving up and starting again) give the numbers of full forwards, in the
    order asked for."""
    from circuitq.circuits.faithfulness import LayerReplay, faithfulness_curves, faithfulness_report, unit_order

    model = tiny_model(layers=4)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))

    def loss_fn(m):
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss), None

    geo = Geometry.from_config(model.config)
    shapes = {n: tuple(model.get_parameter(n).shape) for n in target_shapes(model)}
    us = units(shapes, geo, "heads")
    values = {n: torch.randn(s, generator=torch.Generator().manual_seed(1)) for n, s in shapes.items()}
    scores = {n: torch.rand(s, generator=torch.Generator().manual_seed(2)) for n, s in shapes.items()}
    orderings = {"random": unit_order(us, None, seed=1), "reverse": unit_order(us, None, seed=1)[::-1]}
    grid = (0, 0.25, 0.5, 1)
    plain = faithfulness_curves(model, loss_fn, us, values, orderings, grid, progress=False)
    plain_rep = faithfulness_report(model, loss_fn, scores, us, values, {"score": scores}, top=3, n_random=3,
                                    fraction=0.05, seed=0, progress=False)
    cache = LayerReplay(model.model.layers, span=1)
    rep = faithfulness_report(model, loss_fn, scores, us, values, {"score": scores}, top=3, n_random=3, fraction=0.05,
                              seed=0, cache=cache, progress=False)
    assert [u["label"] for u in rep["units"]] == [u["label"] for u in plain_rep["units"]]
    assert [u["measured_loss"] for u in rep["units"]] == pytest.approx([u["measured_loss"] for u in plain_rep["units"]],
                                                                       abs=1e-6)
    moves = cache.moves
    fast = faithfulness_curves(model, loss_fn, us, values, orderings, grid, cache=cache, progress=False)
    assert cache.moves > moves and len(cache.outputs) == 1
    for name in orderings:
        for mode in ("keep-top", "replace-top"):
            a, b = plain["orderings"][name][mode]["points"], fast["orderings"][name][mode]["points"]
            assert [p["loss"] for p in b] == pytest.approx([p["loss"] for p in a], abs=1e-6)


def test_noise_ceiling_from_split_halves():
    from circuitq.circuits.faithfulness import UnitResult, noise_ceiling

    g = torch.Generator().manual_seed(0)
    truth = torch.randn(40, generator=g)
    rows = lambda noise: [UnitResult(f"u{i}", 1, {}, float(t), None, (float(t + noise * torch.randn(1, generator=g)),
                                                                     float(t + noise * torch.randn(1, generator=g))))
                          for i, t in enumerate(truth)]
    clean, noisy = noise_ceiling(rows(0.01)), noise_ceiling(rows(3.0))
    assert clean["split_half_spearman"] > 0.99 and clean["ceiling"] > 0.99
    assert noisy["ceiling"] < 0.8 and noisy["reliability"] < clean["reliability"]
    assert noise_ceiling([UnitResult("u", 1, {}, 0.0, None)] * 5) is None


def test_item_statistics_worked_example_and_refusal():
    from circuitq.circuits.faithfulness import item_statistic
    from circuitq.errors import UsageError

    assert item_statistic([9, 0, 1, 0], "median") == pytest.approx(0.5)
    assert item_statistic([0, 0, 1, 9], "trimmed", trim=0.25) == pytest.approx(0.5)
    assert item_statistic([0, 0, 1, 9, 100], "trimmed", trim=0.2) == pytest.approx(10 / 3)
    assert item_statistic(torch.tensor([3.0]), "trimmed", trim=0.5) == pytest.approx(3.0)   # too few to trim: median
    with pytest.raises(UsageError, match="unknown item statistic 'mode'; choose one of median, trimmed"):
        item_statistic([1.0], "mode")


def test_robust_statistics_rank_through_a_few_heavy_items():
    """Each unit's true effect moves every item a little; a few heavy items move some units by a
    lot, at random. The mean follows the heavy items (the estimator of the true effects ranks
    poorly against it, and the two halves of the items disagree), the median and the trimmed mean
    do not; an estimator's per-item terms summarised by the same statistic are scored too."""
    from circuitq.circuits.faithfulness import UnitResult, robust_measurements, spearman

    g = torch.Generator().manual_seed(0)
    n_units, n_items = 40, 200
    truth = torch.randn(n_units, generator=g, dtype=torch.float64)
    items = truth[:, None] * 0.01 + 0.002 * torch.randn(n_units, n_items, generator=g, dtype=torch.float64)
    heavy = torch.randint(0, n_items, (3,), generator=g)
    items[:, heavy] += 3 * torch.randn(n_units, 3, generator=g, dtype=torch.float64)   # nats, not hundredths
    rows = [UnitResult(f"u{i}", 1, {"truth": float(truth[i])}, float(items[i].mean()), None,
                       measured_items=tuple(items[i].tolist())) for i in range(n_units)]
    per_item = {"truth-items": {f"u{i}": truth[i] + 0.5 * torch.randn(64, generator=g, dtype=torch.float64)
                                for i in range(n_units)}}
    rob = robust_measurements(rows, per_item)
    by_mean = spearman([r.predicted["truth"] for r in rows], [r.measured_loss for r in rows])
    assert by_mean < 0.6
    for stat in ("median", "trimmed"):
        d = rob["statistics"][stat]
        assert d["spearman"]["truth"] > 0.9 > by_mean + 0.3, stat
        assert d["noise_ceiling"]["ceiling"] > 0.9 and d["spearman_matched"]["truth-items"] > 0.8
        assert set(d["predicted_matched"]["truth-items"]) == {r.label for r in rows}
        assert d["spearman_matched_vs_mean"]["truth-items"] < d["spearman_matched"]["truth-items"]
        assert "spearman_metric" not in d                  # the rows carry no per-item metric
    assert rob["trim"] == 0.1
    assert robust_measurements([r._replace(measured_items=None) for r in rows]) is None   # measured before 0.8.5


def test_attenuation_worked_example_and_when_it_cannot_be_said():
    from circuitq.circuits.faithfulness import attenuation

    out = attenuation({"atp": 0.877, "score": 0.05}, {"atp": {"reliability": 0.971}}, {"reliability": 0.904})
    assert set(out) == {"atp"}                      # score has no reliability of its own
    assert round(out["atp"]["attainable"], 3) == 0.937 and round(out["atp"]["corrected"], 3) == 0.936
    assert attenuation({"atp": 0.9}, {"atp": {"reliability": 0.9}}, None) is None
    assert attenuation({"atp": 0.9}, {"atp": {"reliability": -0.2}}, {"reliability": 0.9}) is None
    assert attenuation({"atp": 0.9}, None, {"reliability": 0.9}) is None


def test_estimator_reliability_from_its_own_items_split_in_half():
    """Per-item terms of a unit estimator: halves of a clean estimate agree (reliability near 1),
    of a noisy one less; Spearman–Brown for the full and for twice the items; the worked example."""
    from circuitq.circuits.faithfulness import estimator_reliability

    g = torch.Generator().manual_seed(0)
    truth = torch.randn(40, generator=g)
    items = lambda noise: {f"u{i}": t / 64 + noise * torch.randn(64, generator=g, dtype=torch.float64)
                           for i, t in enumerate(truth.double())}
    labels = [f"u{i}" for i in range(40)]
    clean, noisy = estimator_reliability(labels, items(1e-4)), estimator_reliability(labels, items(0.1))
    assert clean["split_half_spearman"] > 0.99 and clean["ceiling"] > 0.99 and clean["items"] == 64
    assert noisy["reliability"] < clean["reliability"] and noisy["reliability"] < noisy["reliability_doubled"] < 1
    r = noisy["split_half_spearman"]
    assert noisy["reliability"] == pytest.approx(2 * r / (1 + r))
    assert noisy["reliability_doubled"] == pytest.approx(2 * noisy["reliability"] / (1 + noisy["reliability"]))
    # the worked example: halves agreeing at 0.8 give 0.889, and 0.941 for twice the items
    rel = 2 * 0.8 / 1.8
    assert round(rel, 3) == 0.889 and round(2 * rel / (1 + rel), 3) == 0.941
    assert estimator_reliability(labels[:2], items(0.1)) is None


def test_gradients_of_two_halves_in_turn_equal_those_of_all_items(tiny_dir):
    """The split-half reliability of weight-level estimators collects the even items, then carries
    on with the odd into the same statistics: the result is the one-pass statistics of every item,
    so the estimates (and the Spearman reported) do not change."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitq.pipeline.stages import collect_gradients
    from test_capture import _examples

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    ex = _examples()
    once = collect_gradients(model, tok, ex, stats=("sum", "sum_abs"), progress=False)["stats"]
    half = collect_gradients(model, tok, ex[0::2], stats=("sum", "sum_abs"), progress=False)["stats"]
    first = {n: t.clone() for n, t in half.tensors["sum"].items()}
    both = collect_gradients(model, tok, ex[1::2], stats=("sum", "sum_abs"), state=half, progress=False)["stats"]
    assert both.n_samples == len(ex)
    for s in ("sum", "sum_abs"):
        for n, t in once.tensors[s].items():
            assert torch.allclose(both.tensors[s][n], t, rtol=1e-4, atol=1e-6), (s, n)
    n = next(iter(first))
    assert not torch.allclose(first[n], once.tensors["sum"][n])     # the half is a part, not the whole


def test_split_half_reliability_of_weight_level_halves_over_the_units_measured():
    """``halves`` gives a weight-level estimator's reliability over the units measured, with the
    items they hold together; equal halves agree perfectly, unrelated ones barely."""
    from circuitq.circuits.faithfulness import SplitHalves, UnitResult, _reliabilities

    g = torch.Generator().manual_seed(0)
    rows = [UnitResult(f"u{i}", 1, {}, 0.0, None) for i in range(30)]
    a = {f"u{i}": float(x) for i, x in enumerate(torch.randn(30, generator=g))}
    b = {f"u{i}": float(x) for i, x in enumerate(torch.randn(30, generator=g))}
    out = _reliabilities(rows, {"atp": {}, "grad": {}}, {"atp": SplitHalves(a, a, 8), "grad": SplitHalves(a, b, 8),
                                                          "absent": SplitHalves(a, a, 8)})
    assert set(out) == {"atp", "grad"} and out["atp"]["items"] == 8
    assert out["atp"]["split_half_spearman"] == pytest.approx(1) and out["atp"]["reliability"] == pytest.approx(1)
    assert abs(out["grad"]["split_half_spearman"]) < 0.5 and out["grad"]["reliability"] < out["atp"]["reliability"]


def test_measured_reuses_an_earlier_measurement_and_refuses_another(tmp_path, tiny_dir, capsys, monkeypatch):
    """``--measured`` takes the per-unit measured changes of an earlier JSON (no unit is measured
    again, the changes are equal) while the estimators are computed anew (another calibration
    seed moves atp's predictions); a file of other bits or units, or not a faithfulness JSON, is
    refused in one line naming what differs."""
    import circuitq.circuits.faithfulness as F
    from circuitq.cli import main
    from test_score import _score, _task

    d, _ = tiny_dir
    task = _task(tmp_path)
    assert _score(d, task, tmp_path / "s", "--group-size", "32") == 0
    base = ["faithfulness", "--scores", str(tmp_path / "s"), "--units", "heads", "--all-units", "--estimators", "atp",
            "--calib-samples", "6", "--eval-samples", "6", "--group-size", "32"]
    assert main(base + ["--out", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["measurement"]["bits"] == 3 and a["measurement"]["units"] == "heads"
    assert f"up to {len(a['units']) + 5} evaluation passes" in capsys.readouterr().out   # units, base, 4 contrasts
    calls = {"n": 0}
    real = F.measure

    def counting(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(F, "measure", counting)
    assert main(base + ["--seed", "1", "--measured", str(tmp_path / "a.json"), "--out", str(tmp_path / "b.json")]) == 0
    assert calls["n"] == 4          # the four circuit-vs-random contrasts only; no unit measured again
    printed = capsys.readouterr().out      # the cost said up front counts only what is run
    assert "up to 5 evaluation passes" in printed and "measured earlier (--measured)" in printed
    b = json.loads((tmp_path / "b.json").read_text())
    assert [u["measured_loss"] for u in b["units"]] == [u["measured_loss"] for u in a["units"]]
    assert [u["measured_halves"] for u in b["units"]] == [u["measured_halves"] for u in a["units"]]
    assert [u["measured_items"] for u in b["units"]] == [u["measured_items"] for u in a["units"]]
    assert all(len(u["measured_items"]) == 6 for u in a["units"])      # one loss change per evaluation item
    assert set(a["robust"]["statistics"]) == {"median", "trimmed"} and "spearman" in a["robust"]["statistics"]["median"]
    assert '"measured_items": [' in (tmp_path / "a.json").read_text()     # a vector per line, not a number per line
    assert [u["predicted"]["atp"] for u in b["units"]] != [u["predicted"]["atp"] for u in a["units"]]
    assert b["measured_from"] == str(tmp_path / "a.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for extra, needle in ((["--bits", "2"], "bits differ"), (["--units", "kv-heads"], "units differ"),
                          (["--eval-samples", "5"], "eval, eval_items differ"),
                          ([], "is not readable JSON"), (["--x"], "no such file")):
        src = {"is not readable JSON": bad, "no such file": tmp_path / "none.json"}.get(needle, tmp_path / "a.json")
        capsys.readouterr()
        assert main(base + [e for e in extra if e != "--x"] + ["--measured", str(src), "--overwrite",
                                                              "--out", str(tmp_path / "c.json")]) == 2, extra
        err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("Loading weights")]
        assert len(err) == 1 and needle in err[0], (extra, err)


def test_faithfulness_with_the_metric_objective_end_to_end(tmp_path, tiny_dir, capsys):
    """greater-than (the tiny tokenizer has one token per digit): scores and faithfulness with
    --objective metric; the report names its objective and ranks against the measured metric
    change; the estimator differs from the NLL one; a task without a differentiable metric and
    --loss all are refused in one line before any work."""
    from circuitq.cli import main
    from test_score import _task

    d, _ = tiny_dir
    common = ["--group-size", "32", "--seed", "0"]
    assert main(["score", "--model", str(d), "--task", "greater-than", "--samples", "8", "--seq-len", "32",
                 "--bits", "3", "--objective", "metric", "--out", str(tmp_path / "s"), *common]) == 0
    meta = json.loads((tmp_path / "s" / "score.json").read_text())
    assert meta["objective"] == "metric"
    reps = {}
    for obj in ("metric", "nll"):
        out = tmp_path / f"f-{obj}.json"
        assert main(["faithfulness", "--scores", str(tmp_path / "s"), "--units", "heads", "--all-units",
                     "--estimators", "atp", "atp-denoise", "--objective", obj, "--calib-samples", "8",
                     "--eval-samples", "8", "--out", str(out), *common]) == 0
        reps[obj] = json.loads(out.read_text())
    m = reps["metric"]
    assert m["objective"] == "metric" and m["metric"] == "prob_diff"
    assert set(m["spearman_metric"]) == {"atp", "atp-denoise"}
    nc = m["noise_ceiling_metric"]          # the metric measured on the even and the odd items too
    assert nc is not None and -1 <= nc["split_half_spearman"] <= 1 and 0 <= nc["ceiling"] <= 1
    assert all(len(u["measured_metric_halves"]) == 2 for u in m["units"])
    assert all(-1 <= v <= 1 for v in m["spearman_metric"].values() if v == v)
    pm = [u["predicted"]["atp"] for u in m["units"]]
    pn = [u["predicted"]["atp"] for u in reps["nll"]["units"]]
    assert any(abs(a - b) > 1e-9 for a, b in zip(pm, pn))
    assert "against the measured change of the task metric" in capsys.readouterr().out
    task = _task(tmp_path)
    assert main(["score", "--model", str(d), "--task", f"jsonl:{task}", "--samples", "4", "--objective", "metric",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--objective metric needs a circuit task" in err[0] and "--objective nll" in err[0]
    assert main(["score", "--model", str(d), "--task", "ioi", "--objective", "metric", "--loss", "all",
                 "--out", str(tmp_path / "bad2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --loss answer" in err[0]
    assert main(["faithfulness", "--scores", str(tmp_path / "s"), "--task", f"jsonl:{task}", "--objective", "metric",
                 "--out", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--objective metric needs a circuit task" in err[0]
    # the second-order term is the NLL's empirical Fisher: the metric has none
    assert main(["faithfulness", "--scores", str(tmp_path / "s"), "--estimators", "atp-local2", "--objective", "metric",
                 "--out", str(tmp_path / "bad3.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "atp-local2" in err[0] and "--objective nll" in err[0]
    assert main(["faithfulness", "--scores", str(tmp_path / "s"), "--estimators", "atp-window2", "--objective", "metric",
                 "--out", str(tmp_path / "bad4.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "atp-window2" in err[0] and "--objective nll" in err[0] and "atp-window with" in err[0]
    assert not any((tmp_path / n).exists() for n in ("bad", "bad2", "bad.json", "bad3.json", "bad4.json"))


def test_measured_accepts_a_larger_split_of_the_same_task_on_the_same_items():
    """A measurement of ``ioi:800`` is reusable by ``ioi:1600`` (or ``ioi``) when the evaluation
    items' digest matches (a larger split starts with the smaller one's items); not when the items
    differ, nor across tasks or for tasks that cannot be resized."""
    from circuitq.circuits.faithfulness import reusable_measurements
    from circuitq.errors import UsageError

    was = {"task": "ioi:800", "eval_items": "abc", "units": "heads", "bits": 3}
    prev = {"format": "circuitq.faithfulness", "units": [], "measurement": was}
    for task in ("ioi:1600", "ioi", "ioi:800"):
        assert reusable_measurements(prev, {**was, "task": task}) is prev
    for key, needle in (({**was, "task": "ioi:1600", "eval_items": "abd"}, "eval_items, task differ"),
                        ({**was, "task": "greater-than:800"}, "task differ"),
                        ({**was, "task": "ioi:1600", "bits": 2}, "bits, task differ")):
        with pytest.raises(UsageError, match=needle):
            reusable_measurements(prev, key)
    other = {**prev, "measurement": {**was, "task": "mmlu:anatomy"}}
    with pytest.raises(UsageError, match="task differ"):
        reusable_measurements(other, {**was, "task": "mmlu:astronomy"})
