"""Canonical circuit tasks: deterministic generators, disjoint splits, exact metrics."""
from __future__ import annotations

import re

import pytest
import torch

from circuitq.data.circuit_tasks import CIRCUIT_TASKS, NAMES


@pytest.mark.parametrize("kind", CIRCUIT_TASKS)
def test_generators_are_deterministic_and_splits_disjoint(kind):
    from circuitq.data.tasks import load_examples

    a = load_examples(kind, "calib", seed=3)
    assert [(e.prompt, e.completion) for e in a] == [(e.prompt, e.completion) for e in load_examples(kind, "calib", seed=3)]
    assert [e.prompt for e in a] != [e.prompt for e in load_examples(kind, "calib", seed=4)]
    ev = load_examples(kind, "eval", seed=3)
    assert len(a) > 10 and len(ev) > 10 and not {e.prompt for e in a} & {e.prompt for e in ev}
    if kind == "ioi":   # no name is shared between the splits
        names = lambda xs: {w for e in xs for w in re.findall(r"[A-Z][a-z]+", e.prompt) if w in NAMES}  # noqa: E731
        assert not names(a) & names(ev) and len(names(a)) >= 50 and len(names(ev)) >= 50
        assert not any(m != n and m.startswith(n) for m in NAMES for n in NAMES)   # no name inside another
        assert all(e.completion == e.meta["target"] and e.meta["target"] != e.meta["distractor"] for e in a)
        assert all(e.prompt.count(e.meta["distractor"].strip()) == 2 for e in a)   # S is repeated, IO is not
    if kind == "greater-than":
        assert not {e.meta["start_year"] for e in a} & {e.meta["start_year"] for e in ev}
        assert all(int(e.completion) > e.meta["start_year"] - 1700 for e in a)
    if kind == "capitals":
        assert not {e.completion for e in a} & {e.completion for e in ev}


@pytest.mark.parametrize("kind", ["ioi", "greater-than", "induction"])
def test_larger_splits_extend_the_default_ones(kind):
    """``ioi:800``: twice the items per split; the held-out items begin with the default split's own
    (a larger measurement extends the smaller one), the splits stay disjoint; a fixed pool
    (capitals) or a bad count is refused in one line naming the form."""
    from circuitq.data.circuit_tasks import SIZED_TASKS
    from circuitq.data.tasks import DataError, TaskSpec, load_examples

    n = SIZED_TASKS[kind]
    small, big = load_examples(kind, "eval", seed=0), load_examples(f"{kind}:{2 * n}", "eval", seed=0)
    assert len(small) == n and len(big) == 2 * n
    assert [(e.prompt, e.completion) for e in big[:n]] == [(e.prompt, e.completion) for e in small]
    cal = load_examples(f"{kind}:{2 * n}", "calib", seed=0)
    assert len(cal) == 2 * n and not {e.prompt for e in cal} & {e.prompt for e in big}
    for bad, needle in ((f"{kind}:0", f"e.g. {kind}:800"), (f"{kind}:many", "number of items per split"),
                        ("capitals:40", "takes no argument")):
        with pytest.raises(DataError, match=needle):
            TaskSpec.parse(bad)


def test_metrics_on_fixed_logits():
    from types import SimpleNamespace

    from circuitq.evals import CircuitMetric

    class Tok:
        vocab = {" Mary": 5, " John": 7, " Paris": 9, **{str(d): 20 + d for d in range(10)}}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab[text]]}

    logits = torch.zeros(40)
    logits[5], logits[7] = 3.0, 1.0
    ex = SimpleNamespace(meta={"target": " Mary", "distractor": " John"})
    assert CircuitMetric("ioi", Tok()).record(logits, None, None, ex) == {"logit_diff": 2.0, "correct": True}
    gt = torch.full((40,), -1e9)
    gt[20 + 5], gt[20 + 2] = 0.0, 0.0        # equal mass on tens digit 5 (greater) and 2 (smaller) than start 3
    rec = CircuitMetric("greater-than", Tok()).record(gt, None, None, SimpleNamespace(meta={"start": 3}))
    assert rec["prob_diff"] == pytest.approx(0.0, abs=1e-6) and not rec["correct"]
    gt[20 + 5] = 1.0
    e = torch.e
    rec = CircuitMetric("greater-than", Tok()).record(gt, None, None, SimpleNamespace(meta={"start": 3}))
    assert rec["prob_diff"] == pytest.approx((e - 1) / (e + 1), rel=1e-5) and rec["correct"]
    cap = torch.zeros(40)
    cap[9], cap[3] = 2.5, 2.0
    rec = CircuitMetric("capitals", Tok()).record(cap, None, None, SimpleNamespace(meta={"target": " Paris"}))
    assert rec["logit_margin"] == pytest.approx(0.5) and rec["correct"]
    seq = torch.eye(4)[[1, 2, 3, 0]] * 5
    rec = CircuitMetric("induction", Tok()).record(None, seq, torch.tensor([1, 2, 0, 0]), None)
    assert rec["token_accuracy"] == 0.75   # argmaxes 1, 2, 3, 0 vs targets 1, 2, 0, 0


@pytest.mark.parametrize("kind", CIRCUIT_TASKS)
def test_eval_reports_each_tasks_metric(kind, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitq.data.tasks import Task
    from circuitq.evals import CIRCUIT_METRIC, evaluate

    tok = AutoTokenizer.from_pretrained(tiny_dir[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_dir[0]).eval()
    items = Task(kind).eval_items(6)
    m = evaluate(model, tok, items, kind, reference=model, batch_size=3, progress=False).metrics
    assert m["task_metric"] == CIRCUIT_METRIC[kind] and 0 <= m["accuracy"] <= 1
    assert m["kl"] == pytest.approx(0.0, abs=1e-6) and m["top1_agreement"] == 1.0


def test_run_with_circuit_tasks_reports_their_metric_and_transfer(tmp_path, tiny_dir):
    import csv
    import json

    from circuitq.cli import main
    from conftest import task_data

    d, _ = tiny_dir
    out = tmp_path / "run"
    assert main(["run", "--model", str(d), "--tasks", "gsm8k", "ioi", "--bits", "3", "--data-dir",
                 str(task_data(tmp_path)), "--calib-samples", "6", "--calib-seq-len", "64", "--eval-samples", "5",
                 "--fraction", "0.02", "--group-size", "32", "--baselines", "grad", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    ioi = [r for r in rows if r["task"] == "ioi"]
    assert ioi and all(r["task_metric"] == "logit_diff" and r["task_metric_value"] != "" for r in ioi)
    assert {r["method"] for r in ioi} >= {"tacq", "tacq[gsm8k]", "tacq[union]", "gptq", "grad"}
    doc = json.loads((out / "run.json").read_text())
    assert doc["data_sources"]["ioi"]["mode"] == "generated"
    assert doc["diagonal_dominance"]["3"]["dominant"] in (True, False)
