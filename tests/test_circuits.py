import json

import pytest
import torch

from circuitq.circuits.maps import Geometry, aggregate, compare_masks, overlap, spearman
from circuitq.cli import main


def _names(L=1):
    mods = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return {f"model.layers.{i}.{p}.{m}.weight": None for i in range(L) for m, p in mods.items()}


def test_head_aggregation_under_gqa_hand_checked():
    # H = 4 query heads, KV = 2, head size d = 2, hidden 8, mlp 3
    geo = Geometry(n_layers=1, n_heads=4, n_kv_heads=2, head_dim=2, d_mlp=3)
    z = lambda o, i: torch.zeros(o, i)  # noqa: E731
    v = {n: None for n in _names()}
    v["model.layers.0.self_attn.q_proj.weight"] = z(8, 8)
    v["model.layers.0.self_attn.q_proj.weight"][2:4] = 1.0          # head 1: 2 rows x 8 = 16
    v["model.layers.0.self_attn.k_proj.weight"] = z(4, 8)
    v["model.layers.0.self_attn.k_proj.weight"][0, 0] = 2.0         # kv head 0 -> heads 0, 1 get 1 each
    v["model.layers.0.self_attn.v_proj.weight"] = z(4, 8)
    v["model.layers.0.self_attn.v_proj.weight"][3, 5] = 4.0         # kv head 1 -> heads 2, 3 get 2 each
    v["model.layers.0.self_attn.o_proj.weight"] = z(8, 8)
    v["model.layers.0.self_attn.o_proj.weight"][:, 7] = 0.5         # column 7 = head 3: 8 x 0.5 = 4
    v["model.layers.0.mlp.gate_proj.weight"] = z(3, 8)
    v["model.layers.0.mlp.gate_proj.weight"][1] = 1.0               # neuron 1: 8
    v["model.layers.0.mlp.up_proj.weight"] = z(3, 8)
    v["model.layers.0.mlp.down_proj.weight"] = z(8, 3)
    v["model.layers.0.mlp.down_proj.weight"][:, 2] = 1.0            # neuron 2: 8
    c = aggregate(v, geo)
    assert c.head[0].tolist() == [1.0, 17.0, 2.0, 6.0]
    assert c.neuron[0].tolist() == [0.0, 8.0, 8.0]
    assert c.head.sum() == c.layer_module[0, :4].sum()                 # attention mass conserved
    assert c.total == pytest.approx(16 + 2 + 4 + 4 + 8 + 8)


def test_overlap_metrics_on_hand_made_masks():
    a = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 1, 1, 1, 1, 1], dtype=torch.bool)
    o = overlap(a, b)
    assert (o["intersection"], o["union"]) == (2, 6)
    assert o["iou"] == pytest.approx(2 / 6) and o["iom"] == pytest.approx(2 / 3)
    ma = {"model.layers.0.mlp.up_proj.weight": a.view(2, 3), "model.layers.1.mlp.up_proj.weight": a.view(2, 3)}
    mb = {"model.layers.0.mlp.up_proj.weight": b.view(2, 3), "model.layers.1.mlp.up_proj.weight": a.view(2, 3)}
    cmp = compare_masks(ma, mb)
    assert cmp["per_layer"][0]["iou"] == pytest.approx(1 / 3) and cmp["per_layer"][1]["iou"] == 1.0
    assert cmp["global"]["intersection"] == 5
    with pytest.raises(ValueError, match="different"):
        compare_masks(ma, {"model.layers.0.mlp.up_proj.weight": a.view(2, 3)})


def test_spearman():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x * 10 + 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([5.0, 5.0, 9.0])) == pytest.approx(1.0)


def _two_scored_tasks(tmp_path, d, *method_args) -> None:
    """Score two small JSONL tasks into ``tmp_path/sa`` and ``tmp_path/sb``."""
    words = "the quick brown fox jumps over the lazy dog".split()
    for name, shift in (("a", 0), ("b", 3)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"prompt": " ".join(words[(i + shift) % 5:]),
                                                                      "completion": " " + words[(i * 7 + shift) % 9]})
                                                          for i in range(16)))
        assert main(["score", "--model", str(d), "--task", f"jsonl:{tmp_path / name}.jsonl", *method_args,
                     "--samples", "8", "--seq-len", "32", "--out", str(tmp_path / f"s{name}")]) == 0


def test_compare_cli_writes_report(tmp_path, tiny_dir):
    d, _ = tiny_dir
    _two_scored_tasks(tmp_path, d, "--method", "grad")
    out = tmp_path / "cmp.html"
    assert main(["compare", str(tmp_path / "sa"), str(tmp_path / "sb"), "--fraction", "0.05", "--out", str(out)]) == 0
    text = out.read_text()
    assert "mass per attention head" in text and "IoU" in text and "plotly" in text.lower()
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert 0 <= metrics["masks"]["global"]["iou"] <= 1
    assert out.with_suffix(".heads.png").stat().st_size > 1000 and out.with_suffix(".circuits.png").stat().st_size > 1000


def test_compare_refuses_different_models(tmp_path, tiny_dir, capsys):
    from safetensors.torch import save_file

    d, _ = tiny_dir
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"prompt": "the fox", "completion": " jumps"}) for _ in range(8)))
    assert main(["score", "--model", str(d), "--task", f"jsonl:{tmp_path / 't.jsonl'}", "--method", "magnitude",
                 "--samples", "4", "--seq-len", "16", "--out", str(tmp_path / "s1")]) == 0
    import shutil
    shutil.copytree(tmp_path / "s1", tmp_path / "s2")
    from circuitq.saliency.files import load_scores
    f = load_scores(tmp_path / "s2")
    meta = {"format": "circuitq.scores", **{k: json.dumps(v) for k, v in f["meta"].items()}}
    meta["model_source"] = json.dumps("/some/other/model")
    save_file(f["scores"], str(tmp_path / "s2" / "scores.safetensors"), metadata=meta)
    rc = main(["compare", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "c.html")])
    assert rc == 2 and "different models" in capsys.readouterr().err


def test_budget_ranking_prefixes_equal_topk_selection():
    from circuitq.circuits.explore import budget_table, layer_module_counts, mask_at, mask_for, tile_density, top_index
    from circuitq.saliency.masks import select_topk

    g = torch.Generator().manual_seed(0)
    scores = {f"model.layers.{i}.mlp.down_proj.weight": torch.rand(8, 16, generator=g) for i in range(3)}
    ti = top_index(scores, "llama", 0.5)
    for f in (0.05, 0.2, 0.5):
        a, b = mask_at(ti, f), select_topk(scores, f)
        assert all(torch.equal(a[n], b[n]) for n in scores)
        assert torch.equal(mask_for(ti, f, "model.layers.1.mlp.down_proj.weight"), b["model.layers.1.mlp.down_proj.weight"])
        counts = layer_module_counts(ti, f, 3)
        assert int(counts.sum()) == int(f * 384) and int(counts[1, 6]) == int(b["model.layers.1.mlp.down_proj.weight"].sum())
    rows = budget_table(ti, [0.05, 0.2], 3, -1, reference=0.2)
    assert rows[0]["average_bits"] < rows[1]["average_bits"] and rows[1]["iou_with_0.35%"] == 1.0
    assert rows[0]["iou_with_0.35%"] == pytest.approx(int(0.05 * 384) / int(0.2 * 384))
    with pytest.raises(ValueError, match="exceeds"):
        mask_at(ti, 0.9)
    m = torch.zeros(40, 40, dtype=torch.bool)
    m[:32, :32] = True
    d = tile_density(m, 32)
    assert d.shape == (2, 2) and d[0, 0] == 1 and d[1, 1] == 0 and d[0, 1] == 0


def test_top_weights_name_their_head_or_neuron_under_gqa():
    from circuitq.circuits.maps import Geometry
    from circuitq.circuits.explore import top_weights, unit_of

    geo = Geometry(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=2, d_mlp=12)
    assert unit_of("model.layers.1.self_attn.q_proj.weight", 5, 0, geo) == "L1.H2"
    assert unit_of("model.layers.1.self_attn.k_proj.weight", 3, 0, geo) == "L1.KV1 (H2-H3)"
    assert unit_of("model.layers.0.self_attn.o_proj.weight", 0, 7, geo) == "L0.H3"
    assert unit_of("model.layers.0.mlp.down_proj.weight", 1, 10, geo) == "L0.N10"
    s = torch.zeros(8, 8)
    s[6, 1], s[2, 3] = 5.0, 3.0
    w = torch.arange(64.0).view(8, 8)
    rows = top_weights("model.layers.0.self_attn.q_proj.weight", s, w, w - 0.5, geo, 2)
    assert [(r["row"], r["col"], r["unit"]) for r in rows] == [(6, 1, "L0.H3"), (2, 3, "L0.H1")]
    assert rows[0]["value"] == 49.0 and rows[0]["quant_error"] == 0.5


def test_maps_and_units_follow_the_models_architecture_row(monkeypatch):
    """Which axis of a weight is a head or a neuron comes from ``model/arch.py``'s row for the
    model type, not from HF module names (a family with other names maps the same way)."""
    from circuitq.circuits.explore import unit_of
    from circuitq.model import arch as A

    toy = A.ArchSpec(linears=(A.Linear("attn.c_q", "attn.q", "q_heads", None),
                              A.Linear("attn.c_o", "attn.o", None, "q_heads"),
                              A.Linear("mlp.c_fc", "mlp.in", "neurons", None),
                              A.Linear("mlp.c_proj", "mlp.out", None, "neurons")),
                     groups=(("attn.c_q",), ("attn.c_o",), ("mlp.c_fc",), ("mlp.c_proj",)))
    monkeypatch.setitem(A.ARCHITECTURES, "toy", toy)
    geo = Geometry(n_layers=2, n_heads=4, n_kv_heads=4, head_dim=2, d_mlp=6, model_type="toy")
    assert unit_of("model.layers.1.mlp.c_proj.weight", 3, 5, geo) == "L1.N5"
    assert unit_of("model.layers.0.attn.c_o.weight", 1, 7, geo) == "L0.H3"
    assert unit_of("model.layers.0.attn.c_q.weight", 7, 1, geo) == "L0.H3"


def test_compare_draws_a_signed_attribution_on_a_diverging_scale(tmp_path, tiny_dir):
    """Two atp score directories (signed) are compared as attributions: the figure is centred at
    zero and the top-heads table lists values, not shares of a mass."""
    d, _ = tiny_dir
    _two_scored_tasks(tmp_path, d, "--method", "atp", "--group-size", "32")
    out = tmp_path / "cmp.html"
    assert main(["compare", str(tmp_path / "sa"), str(tmp_path / "sb"), "--fraction", "0.05", "--out", str(out)]) == 0
    text = out.read_text()
    assert "atp attribution per attention head (signed" in text and "mass per attention head" not in text
    assert '"zmid":0' in text.replace(" ", "") and "attribution</th>" in text
    assert out.with_suffix(".heads.png").stat().st_size > 1000
