"""The streaming stages (scale): each equals the in-memory stage it replaces, exactly or up to
ties, so memory can grow like the model without changing a result."""
import pytest
import torch
from safetensors.torch import load_file

from circuitq.config import QuantizeConfig
from circuitq.model.arch import module_name, target_shapes
from circuitq.pipeline import stages
from circuitq.quant.driver import gptq_stream, quantize_model, qw_quantization, qw_stream
from circuitq.quant.hessians import HessianFile, collect_hessians, write_hessians
from circuitq.quant.plan import PrecisionPlan
from circuitq.saliency.masks import (TopK, rank_normalize, select_rank_max, select_rank_max_stream, select_topk,
                                     select_topk_stream)
from circuitq.storage import LazyTensors, ParameterBackup, TensorWriter
from conftest import tiny_model


def test_tensor_writer_round_trips_every_dtype_and_is_plain_safetensors(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.arange(6).view(2, 3),
          "d": torch.tensor([True, False]), "e": torch.randn(2, 2).bfloat16(), "f": torch.zeros(0, 4)}
    with TensorWriter(tmp_path / "x.safetensors") as w:
        for k, v in ts.items():
            w[k] = v
        w.close({"format": "test", "n": 3})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(ts) and all(torch.equal(back[k], ts[k]) for k in ts)
    lazy = LazyTensors(tmp_path / "x.safetensors")
    assert lazy.metadata() == {"format": "test", "n": "3"}
    assert torch.equal(lazy.slice("a", 1, 3), ts["a"][1:3]) and lazy.shape("c") == (2, 3)
    assert not (tmp_path / "x.safetensors.data").exists()


def test_tensor_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with TensorWriter(tmp_path / "x.safetensors") as w:
            w["a"] = torch.ones(3)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_lazy_prefix_view(tmp_path):
    with TensorWriter(tmp_path / "s.safetensors") as w:
        w["sum_abs/x"], w["sum/x"] = torch.ones(2), torch.zeros(2)
        w.close()
    v = LazyTensors(tmp_path / "s.safetensors", prefix="sum_abs")
    assert list(v) == ["x"] and torch.equal(v["x"], torch.ones(2)) and "sum/x" not in v


@pytest.mark.parametrize("fraction", [0.0, 0.003, 0.05, 0.5, 1.0])
def test_running_topk_equals_global_topk(fraction):
    g = torch.Generator().manual_seed(0)
    sc = {f"w{i}": torch.rand(20 + i, 9, generator=g) for i in range(6)}
    a = select_topk(sc, fraction)
    b = select_topk_stream(sc.items(), {n: t.shape for n, t in sc.items()}, fraction)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert sum(int(m.sum()) for m in b.values()) == int(fraction * sum(t.numel() for t in sc.values()))


def test_topk_ranks_equal_rank_normalize_with_ties():
    sc = {"a": torch.tensor([[0.5, 0.1, 0.5], [0.9, 0.5, 0.2]]), "b": torch.tensor([[0.9, 0.3]])}
    sel = TopK({n: t.shape for n, t in sc.items()}, 0.5)
    for n, t in sc.items():
        sel.add(n, t)
    ids, ranks = sel.ranks()
    full = torch.cat([t.flatten() for t in rank_normalize(sc).values()])
    assert torch.allclose(full[ids], ranks)


def test_rank_max_stream_differs_from_the_global_ranking_only_at_boundary_ties():
    g = torch.Generator().manual_seed(3)
    sets = [{f"w{i}": torch.rand(15, 11, generator=g) for i in range(4)} for _ in range(3)]
    for fraction in (0.01, 0.1, 0.3):
        a, b = select_rank_max(sets, fraction), select_rank_max_stream(sets, fraction)
        ranked = [rank_normalize(s) for s in sets]
        best = {n: torch.stack([r[n] for r in ranked]).amax(0) for n in ranked[0]}
        flat = torch.cat([best[n].flatten() for n in best])
        kth = float(torch.topk(flat, int(fraction * flat.numel())).values[-1])
        for n in a:
            assert int(a[n].sum()) == int(a[n].sum())
            diff = a[n] ^ b[n]
            assert torch.all(best[n][diff] == kth), "a difference away from the k-th value"
        assert sum(int(m.sum()) for m in b.values()) == sum(int(m.sum()) for m in a.values())


def test_layer_by_layer_hessians_equal_the_one_pass(model_type, calib_ids, tmp_path):
    model = tiny_model(model_type)
    one = collect_hessians(model, calib_ids, batch_size=3, progress=False)
    write_hessians(model, calib_ids, tmp_path, batch_size=3, progress=False)
    disk = HessianFile(tmp_path)
    assert set(disk) == set(one)
    for n in one:
        assert torch.allclose(disk[n].H, one[n].H, rtol=1e-5, atol=1e-6) and disk[n].n == one[n].n


def test_stored_factors_give_the_same_gptq(calib_ids, tmp_path):
    """Quantizing against a HessianFile (stored factors, chunks read from disk) equals quantizing
    against the same Hessians in memory, mask included."""
    model = tiny_model()
    write_hessians(model, calib_ids, tmp_path, batch_size=4, progress=False)
    disk = HessianFile(tmp_path)
    mem = {n: disk[n] for n in disk}
    cfg = QuantizeConfig(bits=3, group_size=16, hessian="shared")
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(s, generator=g) < 0.05 for n, s in target_shapes(model).items()}
    a, b = tiny_model(), tiny_model()
    ra = quantize_model(a, None, PrecisionPlan(3), cfg, masks=masks, progress=False, hessians=mem)
    rb = quantize_model(b, None, PrecisionPlan(3), cfg, masks=masks, progress=False, hessians=disk, output_error=False,
                        pack=False)
    for n in target_shapes(model):
        assert torch.equal(a.get_parameter(n), b.get_parameter(n)), n
    assert rb.qweights == {} and ra.bits.average_bits == rb.bits.average_bits


def test_reference_stream_equals_reference_and_leaves_the_model_alone(calib_ids):
    model = tiny_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    for cfg in (QuantizeConfig(bits=3, group_size=16, hessian="shared"), QuantizeConfig(bits=3, group_size=16),
                QuantizeConfig(bits=2, method="rtn")):
        ref = qw_quantization(model, cfg, calib_ids, need_hinv=cfg.method == "gptq")
        for r in qw_stream(model, cfg, calib_ids, need_hinv=cfg.method == "gptq"):
            assert torch.equal(r.quantized, ref.weights[r.name]), (cfg, r.name)
            if cfg.method == "gptq":
                assert torch.equal(r.hinv_diag, ref.hinv_diag[r.name]) and torch.equal(r.errors, ref.errors[r.name])
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), cfg


def test_stream_scores_equal_score_weights(calib_ids):
    model = tiny_model()
    cfg = QuantizeConfig(bits=3, group_size=16, hessian="shared")
    g = torch.Generator().manual_seed(0)
    stats = {"sum_abs": {n: torch.rand(s, generator=g) for n, s in target_shapes(model).items()}}
    ref = stages.quantized_weights(model, cfg, calib_ids, need_hinv=True)
    whole = {m: stages.score_weights(m, model, stats, ref) for m in ("tacq", "spqr")}
    for n, sc in stages.stream_scores(["tacq", "spqr"], model, stats,
                                      stages.qw_stream(model, cfg, calib_ids, need_hinv=True)):
        for m in sc:
            assert torch.equal(sc[m], whole[m][n]), (m, n)


def test_parameter_backup_restores_exactly(tmp_path):
    model = tiny_model()
    names = list(target_shapes(model))
    before = {n: model.get_parameter(n).clone() for n in names}
    b = ParameterBackup(model, names, tmp_path / "o.safetensors")
    with torch.no_grad():
        for n in names:
            model.get_parameter(n).mul_(0.5)
    b.restore()
    assert all(torch.equal(model.get_parameter(n), before[n]) for n in names)
    b.close()
    assert not (tmp_path / "o.safetensors").exists()


def test_gptq_stream_chunks_do_not_change_results(calib_ids):
    """Batching a chunk of modules or one at a time gives the same codes."""
    model = tiny_model()
    H = collect_hessians(model, calib_ids, batch_size=4, progress=False)
    cfg = QuantizeConfig(bits=3, group_size=16, hessian="shared")
    big = {mq.name: mq.result.weight for mq in gptq_stream(model, H, PrecisionPlan(3), cfg, progress=False)}
    small = {mq.name: mq.result.weight for mq in gptq_stream(model, H, PrecisionPlan(3), cfg, progress=False,
                                                              max_elems=1)}
    assert set(big) == {module_name(n) for n in target_shapes(model)}
    assert all(torch.equal(big[n], small[n]) for n in big)
