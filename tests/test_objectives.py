"""The objective of the per-sample gradients (issue 23): ``nll`` or minus a circuit task's metric;
the metric objective equals ``evals.CircuitMetric`` and its gradients are autograd's."""
from __future__ import annotations

import pytest
import torch

from circuitq.config import CalibConfig, ConfigError
from circuitq.data.tasks import Example
from circuitq.errors import UsageError
from circuitq.evals import CircuitMetric
from circuitq.saliency.objectives import Objective, check_objective, first_completion_logits


def test_first_completion_logits_picks_each_items_first_scored_position():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    lmask = torch.zeros(2, 6, dtype=torch.bool)
    lmask[0, 2:4] = True                       # item 0 scored from position 2
    lmask[1, 3:5] = True                       # item 1 from position 3
    pos = torch.tensor([2, 3, 4])
    out = first_completion_logits(logits, lmask, pos)
    assert torch.equal(out[0], logits[0, 0]) and torch.equal(out[1], logits[1, 1])


@pytest.mark.parametrize("kind", ["ioi", "greater-than", "capitals"])
def test_metric_objective_is_minus_the_evaluated_metric(kind, tiny_dir):
    from transformers import AutoTokenizer

    from circuitq.data.tasks import load_examples

    tok = AutoTokenizer.from_pretrained(tiny_dir[0])
    exs = load_examples(kind, "eval", n=5)
    assert all(e.meta["kind"] == kind for e in exs)
    if kind != "greater-than":   # the tiny tokenizer knows the fixture's words, not first names or capitals
        words = ["fox", "dog", "cat", "sun", "lazy", "quick"]
        exs = [Example(e.prompt, e.completion, {**e.meta, "target": words[i], "distractor": words[i + 1]})
               for i, e in enumerate(exs)]
    obj, ref = Objective("metric", tok), CircuitMetric(kind, tok)
    if kind == "greater-than":
        try:
            obj.digits()
        except UsageError:
            pytest.skip("the tiny tokenizer has no single-token digits")
    g = torch.Generator().manual_seed(0)
    first = torch.randn(len(exs), tok.vocab_size, generator=g)
    got = obj.metric(first, exs)
    key = {"ioi": "logit_diff", "greater-than": "prob_diff", "capitals": "logit_margin"}[kind]
    want = [ref.record(first[b], None, None, e)[key] for b, e in enumerate(exs)]
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert sum(abs(w) > 1e-6 for w in want) >= 3          # the tokens differ: a real comparison
    # as a loss: logits at each item's first scored position, sign flipped
    lmask = torch.zeros(len(exs), 4, dtype=torch.bool)
    lmask[:, 2] = True
    loss = obj(first[:, None, :], None, lmask, torch.tensor([2]), exs)
    assert loss.tolist() == pytest.approx([-w for w in want], rel=1e-5, abs=1e-6)


def test_metric_objective_refuses_tasks_without_a_differentiable_metric():
    obj = Objective("metric")
    with pytest.raises(UsageError, match="--objective nll"):
        obj.metric(torch.zeros(1, 5), [Example("q", " a", {"kind": "induction"})])
    with pytest.raises(UsageError, match="--objective nll"):
        check_objective("metric", "gsm8k")
    with pytest.raises(UsageError, match="--loss answer"):
        check_objective("metric", "ioi", "all")
    with pytest.raises(UsageError, match="choose one of nll, metric"):
        Objective("logit")
    with pytest.raises(ConfigError, match="--objective"):
        CalibConfig(objective="kl")
    check_objective("metric", "ioi")
    check_objective("nll", "gsm8k", "all")


def test_metric_gradients_are_autograds(tmp_path, tiny_dir):
    """Per-sample statistics under --objective metric: their sum is the autograd gradient of
    Σ_items −logit_diff on a tiny model (IOI items, names as they tokenize)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitq.data.tasks import collate, scored_positions, tokenize_examples
    from circuitq.pipeline.stages import collect_gradients

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    exs = [Example(f"When {a} and {b} went out, {b} gave it to", f" {a}",
                   {"kind": "ioi", "target": a, "distractor": b})
           for a, b in (("fox", "dog"), ("dog", "cat"), ("cat", "fox"), ("sun", "dog"))]
    calib = CalibConfig(samples=4, seq_len=64, batch_size=2, objective="metric")
    st = collect_gradients(model, tok, exs, calib, ("sum",), progress=False, model_path=str(d))["stats"]
    # reference: plain autograd on the HF model, one batch of all items
    tk = tokenize_examples(exs, tok, 64)
    ids, attn, lmask = collate(tk.ids, tk.scored_from, tok.pad_token_id or 0)
    pos = scored_positions(lmask)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attn.long(), logits_to_keep=pos).logits
    Objective("metric", tok)(logits, ids, lmask, pos, exs).sum().backward()
    for n, g in st.tensors["sum"].items():
        ref = model.get_parameter(n).grad
        assert torch.allclose(g, ref, atol=1e-5, rtol=1e-3), n
    assert any(float(g.abs().sum()) > 0 for g in st.tensors["sum"].values())
    # nll gives other gradients
    st2 = collect_gradients(model, tok, exs, CalibConfig(samples=4, seq_len=64, batch_size=2), ("sum",),
                            progress=False, model_path=str(d))["stats"]
    n0 = next(iter(st.tensors["sum"]))
    assert not torch.allclose(st.tensors["sum"][n0], st2.tensors["sum"][n0])
