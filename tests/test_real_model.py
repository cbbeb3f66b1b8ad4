"""Tests on the real default model (SmolLM2-135M-Instruct, dequantized from a 4-bit GGUF file).
Opt-in: ``.venv/bin/python -m pytest -q -m real_model`` (a few minutes on 2 CPU cores)."""
import math

import pytest
import torch

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real():
    from circuitq.data.calib import CalibConfig, build_calibration
    from circuitq.model.loading import load_model

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
    from circuitq.model.loading import load_model
    from circuitq.quant.plan import PrecisionPlan
    from circuitq.quant.driver import QuantizeConfig, quantize_model

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

    from circuitq.quant.export import export_all, load_packed
    from circuitq.model.loading import load_model
    from circuitq.quant.plan import PrecisionPlan
    from circuitq.quant.driver import QuantizeConfig, quantize_model

    lm, data = real
    m = load_model().model
    res = quantize_model(m, None, PrecisionPlan(4), QuantizeConfig(bits=4, group_size=64, method="rtn"), progress=False)
    out = export_all(tmp_path / "q", m, lm.tokenizer, res.qweights, {"bits": 4, "group_size": 64}, res.summary())
    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    packed = load_packed(out)
    ids = data.heldout[:1, :64]
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, packed(ids).logits)


def test_tacq_circuit_hurts_more_than_random_set_of_same_size(real):
    """Quantizing only the 0.35% circuit (to RTN values) raises the task loss more than
    quantizing a random 0.35% of the weights: the scores point at weights the task uses."""
    from circuitq.saliency.capture import collect_stats, sample_losses
    from circuitq.saliency.masks import select_topk
    from circuitq.model.loading import load_model
    from circuitq.quant.driver import target_shapes
    from circuitq.quant.quantizer import QuantSpec, rtn_quantize
    from circuitq.saliency.methods import SaliencyInputs, compute_scores
    from circuitq.data.tasks import collate, load_examples, tokenize_examples

    lm = load_model()
    ex = load_examples("mmlu", "calib", 16, 0, 0, None, lm.tokenizer)
    res = collect_stats(lm.model, lm.tokenizer, ex, lm.source, 8, 256, stats=("sum_abs",), progress=False)
    shapes = target_shapes(lm.model)
    W = {n: lm.model.get_parameter(n).detach().clone() for n in shapes}
    Q = {n: rtn_quantize(w, QuantSpec(3)).dequantize() for n, w in W.items()}
    inp = SaliencyInputs(W, Q, res["stats"].tensors, seed=0)
    circuit = select_topk(compute_scores("tacq-rtn", inp), 0.0035)
    rand = select_topk(compute_scores("random", inp), 0.0035)
    tok = tokenize_examples(ex, lm.tokenizer, 256)
    batch = collate(tok.ids, tok.scored_from, lm.tokenizer.pad_token_id)

    def loss_with(mask):
        with torch.no_grad():
            for n in shapes:
                p = lm.model.get_parameter(n)
                p.copy_(torch.where(mask[n], Q[n], W[n]) if mask is not None else W[n])
            logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return float(sample_losses(logits, batch.input_ids, batch.loss_mask).mean())

    base = loss_with(None)
    hurt_circuit, hurt_random = loss_with(circuit) - base, loss_with(rand) - base
    assert hurt_circuit > 2 * abs(hurt_random), (base, hurt_circuit, hurt_random)
