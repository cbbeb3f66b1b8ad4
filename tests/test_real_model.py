"""Tests on the real default model (SmolLM2-135M-Instruct, dequantized from a 4-bit GGUF file).
Opt-in: ``.venv/bin/python -m pytest -q -m real_model`` (a few minutes on 2 CPU cores)."""
import math

import pytest
import torch

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real():
    import argparse

    from circuitq.data.calib import consecutive_windows, example_texts, random_windows, token_stream
    from circuitq.data.tasks import Task
    from circuitq.model.loading import load_model

    lm = load_model()
    task = Task("gsm8k", tokenizer=lm.tokenizer)
    stream = token_stream(example_texts(task.calib_items(64)), lm.tokenizer)
    held = token_stream(example_texts(task.eval_items(64)), lm.tokenizer, 8 * 256 + 1)
    data = argparse.Namespace(calib=random_windows(stream, 8, 256, 0), heldout=consecutive_windows(held, 256, 8))
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
    from circuitq.config import QuantizeConfig
    from circuitq.quant.driver import quantize_model

    _, data = real
    ppl = {}
    for method in ("gptq", "rtn"):
        m = load_model().model
        quantize_model(m, data.calib if method == "gptq" else None, PrecisionPlan(3),
                       QuantizeConfig(bits=3, group_size=-1, method=method), progress=False)
        ppl[method] = perplexity(m, data.heldout)
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["gptq"] < ppl["rtn"], ppl


def test_packed_export_of_real_model_roundtrips(real, tmp_path):
    from transformers import AutoModelForCausalLM

    from circuitq.quant.export import export_all
    from circuitq.model.packed import load_packed
    from circuitq.model.loading import load_model
    from circuitq.quant.plan import PrecisionPlan
    from circuitq.config import QuantizeConfig
    from circuitq.quant.driver import quantize_model

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
    """Quantizing only the 0.35% TaCQ circuit (to its GPTQ values Q(W)) raises the task loss on
    *held-out* items more than quantizing a random 0.35% of the weights: the scores, computed on
    calibration items, point at weights the task uses."""
    from circuitq.config import CalibConfig, MaskConfig, QuantizeConfig
    from circuitq.data.tasks import Task, collate, tokenize_examples
    from circuitq.model.arch import target_shapes
    from circuitq.model.loading import load_model
    from circuitq.pipeline import stages
    from circuitq.saliency.capture import sample_losses

    lm = load_model()
    task = Task("mmlu", tokenizer=lm.tokenizer)
    calib = CalibConfig(samples=16, seq_len=256)
    items = task.calib_items(calib.samples, calib.seed)
    stats = stages.collect_gradients(lm.model, lm.tokenizer, items, calib, progress=False)["stats"]
    q = QuantizeConfig(bits=3, group_size=64, hessian="shared")
    ref = stages.quantized_weights(lm.model, q, stages.calibration_tokens(items, lm.tokenizer, calib))
    circuit = stages.select(stages.score_weights("tacq", lm.model, stats, ref), MaskConfig())
    rand = stages.select(stages.score_weights("random", lm.model), MaskConfig())
    held = task.eval_items(32)
    tok = tokenize_examples(held, lm.tokenizer, 256)
    batch = collate(tok.ids, tok.scored_from, lm.tokenizer.pad_token_id)
    shapes = target_shapes(lm.model)
    W = {n: lm.model.get_parameter(n).detach().clone() for n in shapes}

    def loss_with(mask):
        with torch.no_grad():
            for n in shapes:
                p = lm.model.get_parameter(n)
                p.copy_(torch.where(mask[n], ref.weights[n], W[n]) if mask is not None else W[n])
            logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return float(sample_losses(logits, batch.input_ids, batch.loss_mask).mean())

    base = loss_with(None)
    hurt_circuit, hurt_random = loss_with(circuit) - base, loss_with(rand) - base
    assert hurt_circuit > 2 * abs(hurt_random), (base, hurt_circuit, hurt_random)
