"""The official TaCQ recipe: few-shot prompt formats, one calibration item per sequence for the
Hessians, the token budget, the tacq-paper preset, all-token evaluation and diagonal dominance."""
from __future__ import annotations

import pytest
import torch

from circuitq.config import CalibConfig, ConfigError, DataConfig, QuantizeConfig, RunConfig
from conftest import task_data, tiny_model


def test_five_shot_mmlu_prompt_format_raw(tmp_path):
    """5 solved dev questions of the same subject, then the question; the completion is ' X'."""
    from circuitq.data.tasks import load_examples

    data = task_data(tmp_path)
    ex = load_examples("mmlu:high_school_physics", "eval", 1, shots=5, data_dir=data, template="raw")[0]
    shot = lambda i: (f"the fox {i} jumps over the dog\nA. the\nB. quick\nC. brown\nD. lazy\nAnswer: "  # noqa: E731
                      f"{'ABCD'[i % 4]}\n\n")
    head = "The following are multiple choice questions (with answers) about high school physics.\n\n"
    assert ex.prompt.startswith(head + "".join(shot(i) for i in range(5)))
    tail = ex.prompt[len(head + "".join(shot(i) for i in range(5))):]
    assert tail.endswith("\nA. the\nB. quick\nC. brown\nD. lazy\nAnswer:") and tail.count("Answer:") == 1
    assert ex.completion == " " + ex.meta["answer"]


def test_gsm8k_eight_shot_cot_format(tmp_path):
    from circuitq.data.prompts import GSM8K_COT_EXEMPLARS
    from circuitq.data.tasks import load_examples

    data = task_data(tmp_path)
    ex = load_examples("gsm8k", "calib", 1, shots=-1, data_dir=data)[0]
    assert ex.prompt.count("Q: ") == 9 and ex.prompt.endswith("\nA:")
    assert ex.prompt.startswith(f"Q: {GSM8K_COT_EXEMPLARS[0][0]}\nA: {GSM8K_COT_EXEMPLARS[0][1]} The answer is 6.\n\n")
    final = ex.meta["final"]
    assert ex.completion.endswith(f"#### {final} The answer is {final}.\n\n")
    zero = load_examples("gsm8k", "calib", 1, shots=0, data_dir=data)[0]
    assert zero.prompt.startswith("Question: ") and "The answer is" not in zero.completion


def test_shots_beyond_the_dev_split_use_the_split_and_say_so(tmp_path, capsys):
    from circuitq.data.tasks import load_examples

    data = task_data(tmp_path)   # philosophy has 8 dev rows, physics 16
    ex = load_examples("mmlu", "eval", 2, shots=20, data_dir=data, template="raw")
    assert "--shots 20" in capsys.readouterr().out
    assert all(e.prompt.count("Answer:") == 9 for e in ex)
    load_examples("gsm8k", "eval", 1, shots=12, data_dir=data)
    assert "holds only 8; using 8" in capsys.readouterr().out


def test_more_calibration_items_than_the_split_uses_the_split_and_says_so(tmp_path, capsys):
    """`circuitq run` asks for 128 items by default; a small task gets all it has, and a note."""
    from circuitq.data.tasks import Task

    task = Task("gsm8k", DataConfig(data_dir=str(task_data(tmp_path)), eval_split="halves"))
    pool = len(task.calib_items())
    items = task.calib_for(CalibConfig(samples=pool + 50))
    assert len(items) == pool
    assert f"--calib-samples {pool + 50}, but the calibration split holds only {pool} items" in capsys.readouterr().out
    assert len(task.calib_for(CalibConfig(samples=pool))) == pool and capsys.readouterr().out == ""


def test_run_defaults_to_128_calibration_items():
    """The run default chosen in analyses/RUN_DEFAULTS.md, the same as `circuitq score`'s."""
    assert RunConfig().calib.samples == CalibConfig().samples == 128


def test_chat_template_without_one_is_a_clear_error(tmp_path):
    from circuitq.data.readers import DataError
    from circuitq.data.tasks import load_examples

    class Tok:
        chat_template = None

    with pytest.raises(DataError, match="--template raw"):
        load_examples("mmlu", "eval", 1, data_dir=task_data(tmp_path), tokenizer=Tok(), template="chat")


def test_token_budget_takes_whole_items_until_the_budget(tmp_path, tiny_dir):
    from transformers import AutoTokenizer

    from circuitq.data.tasks import Task

    tok = AutoTokenizer.from_pretrained(tiny_dir[0])
    task = Task("gsm8k", DataConfig(data_dir=str(task_data(tmp_path))), tok)
    order = task.calib_items(None, 3)
    lens = [len(tok(e.prompt + e.completion, add_special_tokens=False)["input_ids"]) for e in order]
    budget = sum(lens[:3]) + lens[3] // 2
    got = task.calib_for(CalibConfig(tokens=budget, seed=3, seq_len=4096))
    assert [e.prompt for e in got] == [e.prompt for e in order[:3]]


def _hessians(model, calib, batch_size):
    from circuitq.quant.driver import collect_hessians

    return collect_hessians(model, calib, batch_size, progress=False)


def test_padded_items_give_the_hessian_of_each_item_alone():
    """One item per sequence: batching right-padded items gives the same Hessians as running
    each item alone (padding never enters a Hessian)."""
    from circuitq.data.calib import Sequences

    model = tiny_model(seed=2)
    g = torch.Generator().manual_seed(0)
    lens = [20, 17, 11, 6]
    ids = torch.zeros(4, 20, dtype=torch.long)
    mask = torch.zeros(4, 20, dtype=torch.bool)
    for i, n in enumerate(lens):
        ids[i, :n] = torch.randint(1, 128, (n,), generator=g)
        mask[i, :n] = True
    batched = _hessians(model, Sequences(ids, mask), 4)
    alone = _hessians(model, Sequences(ids, mask), 1)   # each batch is cut to its item's length
    for k in batched:
        assert batched[k].n == alone[k].n == sum(lens)
        torch.testing.assert_close(batched[k].H, alone[k].H, rtol=1e-4, atol=1e-5)
    joined = _hessians(model, ids[:, :6], 4)            # and differs from windows that ignore the mask
    assert not torch.allclose(joined[next(iter(joined))].H, batched[next(iter(batched))].H)


def test_sequential_gptq_ignores_padding():
    from circuitq.data.calib import Sequences
    from circuitq.pipeline.stages import quantize

    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (3, 16), generator=g)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, 10:] = False
    mask[2, 5:] = False
    padded = ids.clone()
    padded[1, 10:] = 0
    padded[2, 5:] = 7      # different pad tokens must not matter
    q = QuantizeConfig(bits=3, group_size=32, hessian="sequential")
    a, _ = quantize(model, q, Sequences(ids, mask), progress=False)
    b, _ = quantize(model, q, Sequences(padded, mask), progress=False)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=n)


def test_preset_sets_the_recipe_and_refuses_contradicting_flags():
    from circuitq.cli.commands import QUANTIZE_FLAGS, RUN_FLAGS, SCORE_FLAGS, build_parser
    from circuitq.cli.flags import build
    from circuitq.config import QuantizeJob, ScoreConfig
    from circuitq.presets import PRESETS

    def parse(argv, d, t):
        a = build_parser().parse_args(argv)
        a._argv = argv
        return build(d, a, t)

    paper = PRESETS["tacq-paper"]
    s = parse(["score", "--preset", "tacq-paper", "--out", "x"], ScoreConfig(), SCORE_FLAGS)
    assert (s.calib.loss, s.data.shots, s.data.template) == ("all", -1, "raw")
    assert (s.quantize.group_size, s.quantize.mse, s.quantize.hessian) == (-1, True, "sequential")
    assert s.calib.tokens == paper.scale["calib.tokens"] == 128 * 2048
    q = parse(["quantize", "--preset", "tacq-paper", "--out", "x"], QuantizeJob(), QUANTIZE_FLAGS)
    assert q.quantize.mse and q.quantize.group_size == -1 and q.data.template == "raw"
    r = parse(["run", "--preset", "tacq-paper", "--calib-tokens", "4096", "--mse"], RunConfig(), RUN_FLAGS)
    assert r.calib.tokens == 4096 and r.quantize.hessian == "sequential"   # a size may change, agreeing flags pass
    with pytest.raises(ConfigError, match=r"--preset tacq-paper.*--loss"):
        parse(["score", "--preset", "tacq-paper", "--loss", "answer", "--out", "x"], ScoreConfig(), SCORE_FLAGS)
    with pytest.raises(ConfigError, match=r"--preset tacq-paper.*--hessian"):
        parse(["run", "--preset", "tacq-paper", "--hessian", "shared"], RunConfig(), RUN_FLAGS)


def test_preset_error_is_one_line_from_the_cli(capsys):
    from circuitq.cli import main

    assert main(["run", "--preset", "tacq-paper", "--group-size", "64", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "--preset tacq-paper" in err and "--group-size" in err and "Traceback" not in err


def test_all_token_evaluation_matches_a_direct_computation(tmp_path, tiny_dir):
    """kl_all is the token-weighted KL over every position of every MMLU item, and the cached
    reference gives the same numbers as running the reference alongside."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitq.data.tasks import load_examples, tokenize_examples
    from circuitq.evals import evaluate, kl_divergence

    tok = AutoTokenizer.from_pretrained(tiny_dir[0])
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir[0]).eval()
    q = AutoModelForCausalLM.from_pretrained(tiny_dir[0]).eval()
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ex = load_examples("mmlu", "eval", 5, data_dir=task_data(tmp_path), template="raw")
    direct = evaluate(q, tok, ex, "mmlu", reference=ref, batch_size=2, progress=False, all_tokens=True).metrics
    cache: dict = {}
    evaluate(ref, tok, ex, "mmlu", batch_size=2, progress=False, logits_out=cache, all_tokens=True)
    cached = evaluate(q, tok, ex, "mmlu", batch_size=2, progress=False, reference_logits=cache,
                      all_tokens=True).metrics
    ids = tokenize_examples(ex, tok, 1024).ids
    num = den = 0.0
    with torch.no_grad():
        for s in ids:
            t = torch.tensor([s])
            kl = kl_divergence(ref(t).logits[0, :-1], q(t).logits[0, :-1])
            num, den = num + float(kl.sum()), den + kl.numel()
    assert direct["scored_tokens_all"] == den
    assert direct["kl_all"] == pytest.approx(num / den, rel=1e-4)
    assert cached["kl_all"] == pytest.approx(direct["kl_all"], rel=1e-2)   # float16 cache
    assert cached["kl"] == pytest.approx(direct["kl"], rel=1e-5)
    assert direct["kl_all"] != pytest.approx(direct["kl"], rel=1e-3)


def test_diagonal_dominance_verdict():
    from circuitq.pipeline.report import diagonal_dominance, weighted_mean_diff_ci

    assert weighted_mean_diff_ci([1, 1], [2, 2], [3, 5]) == (1.0, 1.0, 1.0)
    n = 40
    own = ([0.1 + 0.001 * i for i in range(n)], [5] * n)
    worse = ([0.3 + 0.001 * i for i in range(n)], [5] * n)
    item = {(3, "tacq", "a"): own, (3, "tacq[b]", "a"): worse, (3, "tacq", "b"): own, (3, "tacq[a]", "b"): worse}
    d = diagonal_dominance(item, 3, ["a", "b"])
    assert d["dominant"] is True and all(p["margin"] == pytest.approx(0.2) for p in d["pairs"])
    item[(3, "tacq[a]", "b")] = ([x - 0.05 for x in own[0]], own[1])   # b is better served by a's circuit
    d = diagonal_dominance(item, 3, ["a", "b"])
    assert d["dominant"] is False and not d["pairs"][1]["beyond_noise"]
    del item[(3, "tacq[a]", "b")]
    assert diagonal_dominance(item, 3, ["a", "b"])["dominant"] is None


def test_generation_parses_the_cot_answer():
    from circuitq.evals import parse_final_number

    assert parse_final_number(" 3 + 4 = 7. The answer is 7.\n\nQ: Tom has 9 cats") == "7"
    assert parse_final_number("4 + 5 = 9\n#### 9 The answer is 9.") == "9"
    assert parse_final_number("so 1,200 apples.") == "1200"


def test_calibration_keys_follow_the_recipe():
    from dataclasses import replace

    from circuitq.pipeline.run import StepKeys

    base = StepKeys(RunConfig(), "fp", {"mmlu": "x"}, {"mmlu": "y"})
    assert base.quantizer()["hessian_rows"] == "one-item-each"
    for cfg in (replace(RunConfig(), data=DataConfig(template="raw")),
                replace(RunConfig(), calib=CalibConfig(samples=32, tokens=4096))):
        other = StepKeys(cfg, "fp", {"mmlu": "x"}, {"mmlu": "y"})
        assert other.calib("mmlu") != base.calib("mmlu")
    with pytest.raises(ConfigError):
        DataConfig(shots=-2)


def _add_test_splits(data):
    import json as _json

    (data / "mmlu" / "test").mkdir()
    rows = [f'"the dog {i} sleeps",the,quick,brown,lazy,{"ABCD"[(i + 1) % 4]}' for i in range(10)]
    (data / "mmlu" / "test" / "high_school_physics_test.csv").write_text("\n".join(rows) + "\n")
    lines = [_json.dumps({"question": f"the dog has {i} foxes. how many?", "answer": f"{i}\n#### {i}"})
             for i in range(6)]
    (data / "gsm8k" / "test.jsonl").write_text("\n".join(lines) + "\n")


def test_standard_test_splits_are_used_when_present(tmp_path):
    from circuitq.data.readers import DataError
    from circuitq.data.tasks import Task

    data = task_data(tmp_path)
    halves = Task("gsm8k", DataConfig(data_dir=str(data)))
    assert halves.sources["mode"] == "halves" and "no test split" in halves.sources["note"]
    with pytest.raises(DataError, match="gsm8k/test.jsonl not found"):
        Task("gsm8k", DataConfig(data_dir=str(data), eval_split="test")).eval_items()
    _add_test_splits(data)
    for name, n_test, n_calib in (("gsm8k", 6, 24), ("mmlu", 10, 24)):
        t = Task(name, DataConfig(data_dir=str(data)))
        assert t.sources["mode"] == "test"
        ev, cal = t.eval_items(), t.split("calib")
        assert len(ev) == n_test and len(cal) == n_calib    # evaluation = test; calibration = all of val/train
        assert not {e.prompt for e in ev} & {e.prompt for e in cal}
        old = Task(name, DataConfig(data_dir=str(data), eval_split="halves"))
        assert len(old.eval_items()) + len(old.split("calib")) == n_calib


def test_eval_split_flag_on_eval_and_run():
    from circuitq.cli.commands import EVAL_FLAGS, RUN_FLAGS

    assert ("--eval-split", "data.eval_split") in EVAL_FLAGS and ("--eval-split", "data.eval_split") in RUN_FLAGS


def test_run_with_the_paper_preset_end_to_end(tmp_path, tiny_dir):
    """The whole recipe through `circuitq run` (sequential per-channel MSE GPTQ for Q(W) and the
    final model, all-token loss, few-shot raw prompts, a token budget) at a tiny size."""
    import json

    from circuitq.cli import main

    d, _ = tiny_dir
    out = tmp_path / "run"
    assert main(["run", "--preset", "tacq-paper", "--model", str(d), "--tasks", "mmlu", "gsm8k", "--bits", "3",
                 "--data-dir", str(task_data(tmp_path)), "--calib-tokens", "640", "--calib-seq-len", "64",
                 "--eval-samples", "4", "--eval-seq-len", "96", "--fraction", "0.02", "--baselines", "grad",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "run.json").read_text())
    cfg = doc["config"]
    assert cfg["quantize"]["hessian"] == "sequential" and cfg["quantize"]["group_size"] == -1 and cfg["quantize"]["mse"]
    assert cfg["calib"]["loss"] == "all" and cfg["calib"]["tokens"] == 640 and cfg["data"]["template"] == "raw"
    assert any("one per sequence" in line for line in doc["log"])
    assert any("per-sample gradients of" in line and "calibration items" in line for line in doc["log"])
