import json

import pytest
import torch

from circuitq.quant.export import export_all
from circuitq.model.packed import load_packed, pack_rows, unpack_rows, pack_gptq_v1, unpack_gptq_v1
from circuitq.quant.plan import PrecisionPlan
from circuitq.config import QuantizeConfig
from circuitq.model.arch import target_shapes
from circuitq.quant.driver import quantize_model
from circuitq.quant.quantizer import QuantSpec, rtn_quantize
from conftest import tiny_model


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2 ** bits, (96, 40), generator=g)
    p = pack_rows(v, bits)
    assert p.dtype == torch.int32 and p.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_rows(p, bits).long(), v)


def test_pack_matches_standard_4bit_and_3bit_layouts():
    v = torch.arange(32).remainder(16).view(32, 1)
    p = pack_rows(v, 4)
    word0 = sum(int(v[j]) << (4 * j) for j in range(8))
    assert (int(p[0, 0]) & 0xFFFFFFFF) == word0
    # 3-bit: values 0..9 in bits 0..29 of word 0, value 10 split over words 0 and 1
    v3 = torch.tensor([5, 1, 2, 3, 4, 5, 6, 7, 0, 1, 6] + [0] * 21).view(32, 1)
    p3 = pack_rows(v3, 3).long() & 0xFFFFFFFF
    assert (int(p3[0, 0]) >> 30) & 3 == 6 & 3 and int(p3[1, 0]) & 1 == (6 >> 2) & 1
    assert int(p3[0, 0]) & 7 == 5


@pytest.mark.parametrize("bits,gs,sym", [(3, -1, False), (4, 32, True), (2, 32, False)])
def test_v1_module_roundtrip_exact_with_sparse(bits, gs, sym):
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    keep = torch.rand(64, 96) < 0.02
    qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=gs, sym=sym), keep)
    t = pack_gptq_v1(qw)
    assert t["qweight"].shape == (96 * bits // 32, 64) and t["scales"].dtype == torch.float16
    back = unpack_gptq_v1(t, bits, gs, sym, (qw.rows, qw.cols, qw.vals))
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_export_hf_and_packed_load_identically(tmp_path, model_type, calib_ids):
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type)
    shapes = target_shapes(model)
    g = torch.Generator().manual_seed(2)
    masks = {k: torch.rand(s, generator=g) < 0.01 for k, s in shapes.items()}
    res = quantize_model(model, calib_ids, PrecisionPlan(3), QuantizeConfig(bits=3, group_size=32, act_order=True),
                         masks=masks, progress=False)
    meta = {"bits": 3, "group_size": 32, "act_order": True, "sym": False, "method": "gptq"}
    out = export_all(tmp_path / "q", model, None, res.qweights, meta, res.summary())
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    packed = load_packed(out)
    for (n, a), (_, b) in zip(hf.state_dict().items(), packed.state_dict().items()):
        assert torch.equal(a, b), n
    ids = calib_ids[:2]
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)
    cfg = json.loads((out / "gptq" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"], q["checkpoint_format"]) == ("gptq", 3, 32, True, "gptq")
    man = json.loads((out / "gptq" / "circuitq_sparse" / "manifest.json").read_text())
    assert man["semantics"] == "add" and sum(man["nnz_per_module"].values()) == sum(int(m.sum()) for m in masks.values())


def test_existing_output_is_refused_without_overwrite(tmp_path):
    model = tiny_model()
    res = quantize_model(model, None, PrecisionPlan(4), QuantizeConfig(bits=4, method="rtn"), progress=False)
    meta = {"bits": 4, "group_size": -1}
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_all(tmp_path / "q", model, None, res.qweights, meta, res.summary())
    assert (tmp_path / "q" / "mine.txt").read_text() == "keep me"
    export_all(tmp_path / "q", model, None, res.qweights, meta, res.summary(), overwrite=True)
    assert (tmp_path / "q" / "circuitq.json").exists() and not (tmp_path / "q" / "mine.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary leftovers


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v2_zero_points_are_the_zeros_packed_plainly(bits):
    """gptq_v2 stores zero points as they are: field j of word w of a row is zero[w·per + j]
    (for 2/4/8 bits), so a zero point of 0 is a 0 field and neighbours are untouched."""
    from circuitq.model.packed import pack_zeros_v2, unpack_zeros_v2

    maxq = 2 ** bits - 1
    z = torch.randint(0, maxq + 1, (3, 64), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    z[:, ::3] = 0
    packed = pack_zeros_v2(z, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_zeros_v2(packed, bits), z)
    if bits != 3:
        per = 32 // bits
        words = packed.long() & 0xFFFFFFFF
        for j in range(per):
            assert torch.equal((words >> (bits * j)) & maxq, z[:, j::per].long())


@pytest.mark.parametrize("fmt,sym,expect", [("auto", False, "gptq_v2"), ("auto", True, "gptq"),
                                            ("v1", False, "gptq"), ("v2", True, "gptq_v2")])
def test_gptq_format_choice_is_written_and_read_back(tmp_path, fmt, sym, expect, calib_ids):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    res = quantize_model(model, calib_ids, PrecisionPlan(4), QuantizeConfig(bits=4, group_size=32, sym=sym),
                         progress=False)
    zero0 = sum(int((qw.zeros == 0).sum()) for qw in res.qweights.values())
    meta = {"bits": 4, "group_size": 32, "sym": sym, "method": "gptq", "gptq_format": fmt}
    out = export_all(tmp_path / "q", model, None, res.qweights, meta, res.summary())
    q = json.loads((out / "gptq" / "config.json").read_text())["quantization_config"]
    assert q["checkpoint_format"] == expect and q["sym"] == sym
    doc = json.loads((out / "circuitq.json").read_text())
    assert doc["checkpoint_format"] == expect and doc["zero_point_zero_groups"] == zero0
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    packed = load_packed(out)
    for (n, a), (_, b) in zip(hf.state_dict().items(), packed.state_dict().items()):
        assert torch.equal(a, b), n


def test_unknown_checkpoint_format_is_refused(tmp_path):
    from circuitq.model.packed import ExportError, format_of, resolve_gptq_format

    with pytest.raises(ExportError, match="gptq_v2"):
        format_of("marlin")
    with pytest.raises(ExportError, match="auto, v1 or v2"):
        resolve_gptq_format("v3", False)
    assert format_of(None) == "v1"


def test_quantize_job_rejects_a_bad_gptq_format():
    from circuitq.config import ConfigError, QuantizeJob

    with pytest.raises(ConfigError, match="--gptq-format"):
        QuantizeJob(gptq_format="v9")


def test_load_model_reads_an_export_folder_and_its_packed_checkpoint(tmp_path, calib_ids):
    from circuitq.model.loading import load_model
    from conftest import tiny_tokenizer

    model = tiny_model(vocab=128)
    res = quantize_model(model, calib_ids, PrecisionPlan(4), QuantizeConfig(bits=4, group_size=32), progress=False)
    meta = {"bits": 4, "group_size": 32, "sym": False, "method": "gptq", "gptq_format": "auto"}
    out = export_all(tmp_path / "q", model, tiny_tokenizer(128), res.qweights, meta, res.summary())
    whole = load_model(str(out))                       # the export folder -> its hf/
    packed = load_model(str(out / "gptq"))             # the packed checkpoint, decoded by circuitq
    assert "packed GPTQ" in packed.note and whole.source.endswith("hf")
    for (n, a), (_, b) in zip(whole.model.state_dict().items(), packed.model.state_dict().items()):
        assert torch.equal(a, b), n
