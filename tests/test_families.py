"""Every supported model family end to end on a tiny random config: per-sample gradients equal
autograd, TaCQ scores, a mask, masked GPTQ (kept weights exact, the rest on the grid), the export
loads in transformers and the packed checkpoint decodes to the same weights, circuit maps sum to
the totals, and faithfulness units cover every head's weights. Unsupported families get one line
naming the supported ones."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from circuitq.circuits.faithfulness import units
from circuitq.circuits.explore import layer_module_counts, top_index
from circuitq.circuits.maps import aggregate, compare_masks
from circuitq.config import CalibConfig, MaskConfig, QuantizeConfig
from circuitq.errors import UsageError
from circuitq.model.arch import (ARCHITECTURES, MODULE_TYPES, Geometry, UnsupportedArchitecture, arch_for, as_linear,
                                 expected_shape, module_name, module_parts, parse_name)
from circuitq.model.packed import load_packed
from circuitq.pipeline import stages
from conftest import make_tiny_dir
from test_capture import _autograd_per_sample, _examples

FAMILIES = sorted(ARCHITECTURES)


def tiny_family(tmp_path, model_type: str):
    """A tiny random model of ``model_type`` saved with a real byte-level tokenizer."""
    tok_dir, _ = make_tiny_dir(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=model_type.startswith("gemma"))   # Gemma ties its embeddings
    if model_type.startswith("gemma"):
        kw["head_dim"] = 32                                     # head_dim ≠ d / n_heads, as in Gemma
    if model_type == "gpt2":                                    # GPT-2: MLP width is n_inner, no KV heads
        kw["n_inner"] = kw.pop("intermediate_size")
        kw.pop("num_key_value_heads")
        kw.update(bos_token_id=1, eos_token_id=1)               # its defaults (50256) lie beyond a tiny vocabulary
    if model_type == "gpt_neox":
        kw.pop("num_key_value_heads")                           # multi-head attention only (q, k, v interleaved per head)
    if model_type == "phi3":
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=1)   # Phi-3's defaults lie beyond a tiny vocabulary
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()
    d = tmp_path / model_type
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval(), tok


@pytest.mark.parametrize("model_type", FAMILIES)
def test_whole_path_on_a_tiny_model(tmp_path, model_type):
    d, model, tok = tiny_family(tmp_path, model_type)
    as_linear(model)     # GPT-2's Conv1D read as nn.Linear ([out, in]) before the reference gradients (stages do it too)
    ex = _examples()
    geo = Geometry.from_config(model.config)
    # per-sample gradients through the TransformerLens bridge equal plain autograd
    ref_abs, ref_sum = _autograd_per_sample(model, tok, ex, 64)
    calib = CalibConfig(samples=len(ex), seq_len=64, batch_size=4, attention="eager")
    st = stages.collect_gradients(model, tok, ex, calib, ("sum_abs", "sum"), progress=False, model_path=str(d))["stats"]
    for n in ref_abs:
        assert torch.allclose(st.tensors["sum_abs"][n], ref_abs[n], rtol=1e-4, atol=1e-6), n
        assert torch.allclose(st.tensors["sum"][n], ref_sum[n], rtol=1e-4, atol=1e-6), n
    # scores and a mask
    qcfg = QuantizeConfig(bits=3, group_size=8, hessian="shared")
    windows = stages.calibration_tokens(ex, tok, calib)
    qw = stages.quantized_weights(model, qcfg, windows)
    scores = stages.score_weights("tacq", model, st, qw)
    mask = stages.select(scores, MaskConfig(fraction=0.02))
    assert sum(int(m.sum()) for m in mask.values()) == int(0.02 * sum(s.numel() for s in scores.values()))
    # masked GPTQ: the masked weights are the 16-bit ones, the rest on the grid; the error drops;
    # the export loads in transformers and the packed checkpoint decodes to the same model
    qmodel, report = stages.quantize(model, qcfg, windows, masks=mask, progress=False)
    plain, plain_report = stages.quantize(model, qcfg, windows, progress=False)
    for n, m in mask.items():
        qw_n = report.qweights[module_name(n)]
        assert qw_n.nnz == int(m.sum()), n
        grid = qw_n.dequantize_grid()
        assert torch.equal(qmodel.get_parameter(n).detach()[~m], grid[~m]), n
    assert sum(r.output_rel_error for r in report.records) < sum(r.output_rel_error for r in plain_report.records)
    out = stages.export(tmp_path / "out", qmodel, tok, report, {"bits": 3, "group_size": 8})
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", attn_implementation="eager").eval()
    from circuitq.circuits.explore import load_weight      # the explorer reads a weight as circuitq lays it out
    n0 = next(iter(mask))
    assert torch.equal(load_weight(out / "hf", n0), qmodel.get_parameter(n0).detach()), n0
    packed = load_packed(out / "gptq")
    ids = torch.tensor([[1, 5, 9, 17, 3, 8]])
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (qmodel, hf, packed))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(b, c, atol=1e-5)
    # circuit maps sum to the totals; faithfulness units cover every head's weights
    cmap = aggregate(scores, geo)
    total = sum(float(s.double().sum()) for s in scores.values())
    assert cmap.total == pytest.approx(total, rel=1e-9)
    attn = sum(float(s.double().sum()) for n, s in scores.items()
               if arch_for(model_type).linear(parse_name(n)[1]).attention)
    assert float(cmap.head.sum()) == pytest.approx(attn, rel=1e-9)
    assert float(cmap.neuron.sum()) == pytest.approx(
        float(cmap.layer_module[:, [MODULE_TYPES.index(k) for k in ("gate_proj", "up_proj", "down_proj")]].sum()), rel=1e-9)
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    heads = units(shapes, geo, "heads")
    assert len(heads) == geo.n_layers * geo.n_heads
    # the query heads of layer 0 tile the query rows (of q_proj, or of the fused qkv_proj's q block) exactly
    q0, _, _, _, qrows = next((n, *p[1:]) for n in shapes for p in module_parts(n, geo)
                              if p[0] == 0 and p[1] == "q_proj")
    cover = torch.zeros(shapes[q0], dtype=torch.bool)
    for u in heads:
        if q0 in u.entries:
            assert not (cover & u.entries[q0]).any()
            cover |= u.entries[q0]
    want = torch.zeros(shapes[q0], dtype=torch.bool)
    want[qrows] = True
    assert torch.equal(cover, want) and len(units(shapes, geo, "kv-heads")) == geo.n_layers * geo.n_kv_heads
    modules = units(shapes, geo, "modules")
    kinds = [p[0] for lin in arch_for(model_type).linears for p in lin.parts(geo)]   # the family's module kinds
    assert len(modules) == geo.n_layers * len(kinds)          # a fused module: one unit per module it holds
    assert set(kinds) <= set(MODULE_TYPES) and len(set(kinds)) == len(kinds)
    # mask overlaps and the explorer's counts place a fused module's blocks under their modules
    kept = sum(int(m.sum()) for m in mask.values())
    cm = compare_masks(mask, mask, geo)
    assert set(cm["per_module_type"]) == set(kinds) and cm["global"]["a"] == kept
    counts = layer_module_counts(top_index(scores, model_type, 0.05), 0.02, geo.n_layers, geo)
    assert int(counts.sum()) == kept
    for layer, mod, _, _, rows in (p for n in mask for p in module_parts(n, geo)):
        n = next(x for x in mask if (layer, mod) in {(q[0], q[1]) for q in module_parts(x, geo)})
        assert int(counts[layer, MODULE_TYPES.index(mod)]) == int(mask[n][rows].sum()), (layer, mod)


@pytest.mark.parametrize("model_type", ["phi3", "gpt_neox", "gpt2"])
def test_a_run_on_a_fused_family_goes_end_to_end(tmp_path, model_type):
    """``circuitq run`` (quantize, TaCQ, baselines, the attribution map, faithfulness of every head)
    on a family whose attention projections are fused: stacked (Phi-3), interleaved per head
    (GPT-NeoX), stacked in a transposed Conv1D (GPT-2)."""
    import json

    from circuitq.circuits.maps import read_map
    from circuitq.cli import main
    from conftest import task_data

    d, model, _ = tiny_family(tmp_path, model_type)
    out = tmp_path / "run"
    assert main(["run", "--model", str(d), "--tasks", "gsm8k", "--bits", "3", "--data-dir", str(task_data(tmp_path)),
                 "--calib-samples", "6", "--calib-seq-len", "64", "--eval-samples", "5", "--eval-seq-len", "96",
                 "--fraction", "0.02", "--group-size", "32", "--batch-size", "4", "--baselines", "random",
                 "--no-transfer", "--faithfulness", "heads", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {r["method"] for r in rows} >= {"gptq", "tacq", "random"}
    rep = json.loads((out / "faithfulness-gsm8k-heads.json").read_text())
    geo = Geometry.from_config(model.config)
    assert len(rep["units"]) == geo.n_layers * geo.n_heads
    doc = json.loads((out / "run.json").read_text())
    cmap, meta = read_map(out / doc["maps"]["gsm8k"] / "map.safetensors")
    assert cmap.head.shape == (geo.n_layers, geo.n_heads) and bool((cmap.head != 0).all())   # every head has weights there
    assert "Attribution patching per attention head" in (out / "report.html").read_text()


def test_phi3_refuses_the_bridge_attention_whose_split_copies_its_hooks_do_not_see(tmp_path):
    d, model, tok = tiny_family(tmp_path, "phi3")
    calib = CalibConfig(samples=2, seq_len=32, attention="bridge")
    with pytest.raises(UsageError, match="--attention bridge runs phi3's fused attention projection"):
        stages.collect_gradients(model, tok, _examples()[:2], calib, ("sum_abs",), progress=False, model_path=str(d))


def test_fused_rows_split_by_the_geometry():
    """The Phi-3 row's qkv_proj holds q, k, v blocks of n_heads·head_dim, n_kv·head_dim rows each, in
    that order; gate_up_proj gate then up, d_mlp rows each (as HF's Phi3 slices them)."""
    geo = Geometry(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=96, model_type="phi3")
    qkv = module_parts("model.layers.1.self_attn.qkv_proj.weight", geo)
    assert [(p[0], p[1], p[2], p[4]) for p in qkv] == [(1, "q_proj", "q_heads", slice(0, 64)),
                                                       (1, "k_proj", "kv_heads", slice(64, 96)),
                                                       (1, "v_proj", "kv_heads", slice(96, 128))]
    gu = module_parts("model.layers.0.mlp.gate_up_proj.weight", geo)
    assert [(p[1], p[4]) for p in gu] == [("gate_proj", slice(0, 96)), ("up_proj", slice(96, 192))]
    assert module_parts("model.layers.0.self_attn.q_proj.weight", geo) == []   # not a Phi-3 weight
    assert parse_name("model.layers.3.self_attn.qkv_proj.weight") == (3, "qkv_proj")


def test_neox_rows_are_interleaved_per_head_as_hf_runs_them(tmp_path):
    """GPT-NeoX's query_key_value holds q, k, v per head (q0 k0 v0 q1 …): zeroing the rows (and bias)
    the row calls head 1's queries makes exactly that head's attention uniform over the prefix in
    HF's own forward, and leaves the other heads' patterns as they were."""
    _, model, _ = tiny_family(tmp_path, "gpt_neox")
    geo = Geometry.from_config(model.config)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    (_, q, _, _, q_rows), (_, k, _, _, k_rows), _ = module_parts(name, geo)
    assert (q, k) == ("q_proj", "k_proj") and q_rows.tolist()[:16] == list(range(16)) and k_rows.tolist()[:2] == [16, 17]
    ids = torch.tensor([[3, 9, 4, 7, 11, 2]])
    with torch.no_grad():
        before = model(input_ids=ids, output_attentions=True).attentions[0][0]
        head1 = q_rows.view(geo.n_heads, geo.head_dim)[1]
        qkv = model.get_submodule("gpt_neox.layers.0.attention.query_key_value")
        qkv.weight[head1] = 0
        qkv.bias[head1] = 0
        after = model(input_ids=ids, output_attentions=True).attentions[0][0]   # [heads, T, T]
    T = ids.shape[1]
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    assert torch.allclose(after[1], uniform, atol=1e-6) and not torch.allclose(before[1], uniform, atol=1e-3)
    assert torch.allclose(after[[0, 2, 3]], before[[0, 2, 3]], atol=1e-6)


@pytest.mark.parametrize("model_type", ["phi3", "gpt_neox", "gpt2"])
def test_a_fused_module_of_another_size_is_one_line(tmp_path, model_type):
    """A checkpoint whose fused module does not have the rows its config implies is refused in one
    line naming the weight, its shape and the expected one."""
    from circuitq.model.arch import target_shapes

    _, model, _ = tiny_family(tmp_path, model_type)
    lin = arch_for(model_type).linears[0]
    mod = model.get_submodule(f"{arch_for(model_type).layers}.1.{lin.path}")
    if lin.transposed:   # GPT-2's Conv1D: output features are the stored columns
        mod.weight = torch.nn.Parameter(mod.weight[:, :-16].clone())
    else:
        mod.weight = torch.nn.Parameter(mod.weight[:-16].clone())    # 16 output rows short
    out_f = mod.weight.shape[1] if lin.transposed else mod.weight.shape[0]
    with pytest.raises(UnsupportedArchitecture) as e:
        target_shapes(model)
    msg = str(e.value)
    assert f"{lin.path}.weight is {[out_f, model.config.hidden_size]} ([out, in])" in msg
    assert str([out_f + 16, model.config.hidden_size]) in msg and "\n" not in msg


def test_a_mask_of_another_family_or_layout_is_one_line(tmp_path):
    """A Phi-3 mask (fused qkv_proj) on a Llama, or a GPT-2 mask in the stored Conv1D layout
    ([in, out]): one line naming the weights and the expected names or shape."""
    from circuitq.model.arch import target_shapes
    from circuitq.saliency.masks import MaskError, validate_masks

    shapes = {t: target_shapes(tiny_family(tmp_path / t, t)[1]) for t in ("phi3", "llama", "gpt2")}
    phi3_mask = {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes["phi3"].items()}
    with pytest.raises(MaskError) as e:
        validate_masks(phi3_mask, shapes["llama"])
    assert "self_attn.qkv_proj.weight" in str(e.value) and "expected names like model.layers.0.self_attn.q_proj.weight" \
        in str(e.value) and "\n" not in str(e.value)
    stored = {n: torch.zeros(s[::-1], dtype=torch.bool) for n, s in shapes["gpt2"].items()}   # [in, out]
    with pytest.raises(MaskError) as e:
        validate_masks(stored, shapes["gpt2"])
    assert "transformer.h.0.attn.c_attn.weight: mask (64, 192) vs weight (192, 64) (the transpose" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_family_circuitq_does_not_support_is_one_line():
    with pytest.raises(UnsupportedArchitecture) as e:
        arch_for("bloom")                     # a family TransformerLens bridges and circuitq does not
    msg = str(e.value)
    assert "'bloom' is not supported" in msg and ", ".join(FAMILIES) in msg and "\n" not in msg


def test_a_gguf_split_over_packages_is_joined_once_and_checked(tmp_path, monkeypatch):
    """The packages are found on sys.path (not imported), their pieces joined in order into the
    cache; a wrong SHA-256 is refused in one line and leaves nothing behind; a missing package is
    named."""
    import hashlib
    import sys

    from circuitq.model.loading import ModelLoadError, split_gguf_path

    pieces = [b"GGUF" + bytes(range(7)), b"middle" * 3, b"end"]
    for i, data in enumerate(pieces, 1):
        pkg = tmp_path / "site" / f"fakemodel_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CIRCUITQ_CACHE", str(tmp_path / "cache"))
    whole = b"".join(pieces)
    with pytest.raises(ModelLoadError, match="do not match its SHA-256"):
        split_gguf_path("fakemodel_part", 3, "fakemodel-part", "m.gguf", piece="*.gguf.part*", sha256="0" * 64)
    assert not (tmp_path / "cache" / "gguf" / "m.gguf").exists() and not list((tmp_path / "cache" / "gguf").glob(".*"))
    p = split_gguf_path("fakemodel_part", 3, "fakemodel-part", "m.gguf", piece="*.gguf.part*",
                        sha256=hashlib.sha256(whole).hexdigest())
    assert p.read_bytes() == whole and "fakemodel_part1" not in sys.modules
    with pytest.raises(ModelLoadError, match="fakemodel-part1 fakemodel-part2 fakemodel-part3 fakemodel-part4"):
        split_gguf_path("fakemodel_part", 4, "fakemodel-part", "n.gguf", piece="*.gguf.part*")


def test_a_model_that_wants_bos_gets_it_and_keeps_it_when_truncated():
    """Gemma-style tokenizers start every text with BOS; circuitq's items do too (and keep it in
    front when an item is cut), while tokenizers that add none (SmolLM2, Qwen2) are unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from circuitq.data.tasks import Example, tokenize_examples, wants_bos

    vocab = {"<bos>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(20)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    gemma_like = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")
    assert wants_bos(gemma_like) and not wants_bos(plain)
    ex = [Example("w1 w2 w3", " w4 w5")]
    g, p = tokenize_examples(ex, gemma_like, 64), tokenize_examples(ex, plain, 64)
    assert g.ids == [[0, 3, 4, 5, 6, 7]] and g.scored_from == [4]
    assert p.ids == [[3, 4, 5, 6, 7]] and p.scored_from == [3]
    cut = tokenize_examples(ex, gemma_like, 4)          # BOS stays first, the end is kept
    assert cut.ids == [[0, 5, 6, 7]] and cut.scored_from == [2] and cut.truncated == 1


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_row_agrees_with_the_transformerlens_adapter(tmp_path, model_type):
    """Every module a row describes is where TransformerLens's own adapter for the family puts it:
    an unfused module is the HF submodule the adapter's bridge component wraps; a fused module's
    block of rows is the block the adapter's conversion cuts out of the same HF weight for that
    component (applied to a column of row indices)."""
    from circuitq.saliency.capture import bridged

    d, model, tok = tiny_family(tmp_path, model_type)
    spec, geo = arch_for(model_type), Geometry.from_config(model.config)
    llama = arch_for("llama")                                  # the bridge component of each module kind
    with bridged(model, tok, str(d)) as bridge:
        adapter = bridge.adapter
        blocks = adapter.component_mapping["blocks"]
        checked = 0
        for lin in spec.linears:
            if not lin.segments:
                owner, comp = lin.tl.split(".")
                assert blocks.submodules[owner].submodules[comp].name == lin.path.split(".")[-1], lin.path
                checked += 1
                continue
            weight = spec.weight_name(0, lin.path)
            n_rows = expected_shape(lin, geo, model.config.hidden_size)[0]   # output features ([out, in])
            if lin.interleaved:
                # GPT-NeoX: the adapter's weight-processing conversion cuts q|k|v as stacked thirds, which is
                # not HF's layout (TransformerLens 4.x); the split its bridge runs attention with is
                # ``split_qkv_matrix`` (per head q, k, v), and that is the one the row must match
                from types import SimpleNamespace
                w = torch.arange(n_rows, dtype=torch.float32)[:, None].repeat(1, model.config.hidden_size)
                fake = SimpleNamespace(query_key_value=SimpleNamespace(weight=w, bias=torch.zeros(n_rows)))
                split = dict(zip(("q_proj", "k_proj", "v_proj"), adapter.split_qkv_matrix(fake)))
            for kind, _, _, rows in lin.parts(geo):
                want = torch.arange(n_rows)[rows].tolist()
                if lin.interleaved:
                    assert split[kind].weight[:, 0].long().tolist() == want, kind
                    checked += 1
                    continue
                convs = adapter.weight_processing_conversions
                key = f"blocks.{{i}}.{llama.linear(kind).tl}"
                conv = convs.get(key) or convs[f"{key}.weight"]        # GPT-2's adapter names the weight
                # the source is the HF weight, or (GPT-2) the bridge component that wraps it
                assert conv.source_key.replace("{i}", "0") in (weight, f"blocks.0.{lin.tl}.weight"), (kind, conv.source_key)
                rows_in = torch.arange(n_rows, dtype=torch.float32)
                # a transposed (Conv1D) weight is stored [in, out]: its output features are columns
                got = conv.tensor_conversion.handle_conversion(rows_in[None, :] if lin.transposed else rows_in[:, None])
                assert got.flatten().long().tolist() == want, kind
                checked += 1
        assert checked == len({p[0] for lin in spec.linears for p in lin.parts(geo)})   # every module kind, fused or not
