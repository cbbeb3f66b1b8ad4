"""Tests on the real default model (SmolLM2-135M-Instruct, dequantized from a 4-bit GGUF file).
Opt-in: ``.venv/bin/python -m pytest -q -m real_model`` (a few minutes on 2 CPU cores)."""
import math

import pytest
import torch

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real():
    from circuitq.calib import CalibConfig, build_calibration
    from circuitq.models import load_model

    lm = load_model()
    data = build_calibration(CalibConfig("gsm8k", 8, 256, 0), lm.tokenizer, None, heldout_windows=8)
    return lm, data


def test_default_model_shape(real):
    lm, _ = real
    c = lm.model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == ("llama", 30, 576, 9, 3, 1536)
    assert "4-bit" in lm.note


def test_gptq_3bit_beats_rtn_3bit_on_heldout_perplexity(real):
    from circuitq.evals import perplexity
    from circuitq.models import load_model
    from circuitq.plan import PrecisionPlan
    from circuitq.quantize import QuantizeConfig, quantize_model

    _, data = real
    ppl = {}
    for method in ("gptq", "rtn"):
        m = load_model().model
        quantize_model(m, data.calib if method == "gptq" else None, PrecisionPlan(3),
                       QuantizeConfig(bits=3, method=method), progress=False)
        ppl[method] = perplexity(m, data.heldout)
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["gptq"] < ppl["rtn"], ppl


def test_packed_export_of_real_model_roundtrips(real, tmp_path):
    from transformers import AutoModelForCausalLM

    from circuitq.export import export_all, load_packed
    from circuitq.models import load_model
    from circuitq.plan import PrecisionPlan
    from circuitq.quantize import QuantizeConfig, quantize_model

    lm, data = real
    m = load_model().model
    res = quantize_model(m, None, PrecisionPlan(4), QuantizeConfig(bits=4, group_size=64, method="rtn"), progress=False)
    out = export_all(tmp_path / "q", m, lm.tokenizer, res.qweights, {"bits": 4, "group_size": 64}, res.summary())
    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    packed = load_packed(out)
    ids = data.heldout[:1, :64]
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, packed(ids).logits)
