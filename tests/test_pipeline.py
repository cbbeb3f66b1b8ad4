"""The redesign's claims: one settings tree (every CLI default is the library default), one
Q(W) function (``tacq-rtn`` really uses RTN), one pipeline (``score`` and ``run`` give the same
scores for the same settings), one home for the budget, and the Python API on a model in memory."""
from pathlib import Path

import pytest
import torch

from circuitq.cli import main
from circuitq.cli.commands import TABLES, build_parser
from circuitq.cli.flags import build, leaf_paths
from circuitq.config import (DEFAULT_FRACTION, ConfigError, QuantizeConfig, RunConfig, ScoreConfig, from_dict,
                             to_dict)

from conftest import task_data, tiny_model

REQUIRED = {"score": ["--out", "x"], "quantize": ["--out", "x"], "mask": ["--scores", "s", "--out", "x"],
            "eval": ["--model", "m", "--out", "x"], "run": [], "faithfulness": ["--scores", "s", "--out", "x"]}


@pytest.mark.parametrize("command", sorted(TABLES))
def test_every_cli_default_is_the_library_default(command):
    defaults, table = TABLES[command]
    args = build_parser().parse_args([command, *REQUIRED[command]])
    assert build(defaults, args, table) == defaults
    for flag, paths in table:   # and each flag's own default is the field's value
        for path in (paths,) if isinstance(paths, str) else paths:
            value = defaults
            for part in path.split("."):
                value = getattr(value, part)
            got = getattr(args, "cfg__" + ((paths,) if isinstance(paths, str) else paths)[0].replace(".", "__"))
            assert (tuple(got) if isinstance(got, list) else got) == value, (command, flag, path)


def test_a_shared_flag_sets_every_path_and_bad_values_are_refused():
    args = build_parser().parse_args(["run", "--batch-size", "3", "--group-size", "32", "--bits", "2"])
    cfg = build(RunConfig(), args, TABLES["run"][1])
    assert (cfg.calib.batch_size, cfg.quantize.batch_size, cfg.eval.batch_size) == (3, 3, 3)
    assert cfg.quantize.group_size == 32 and cfg.bits == (2,) and cfg.quantize_at(2).bits == 2
    with pytest.raises(ConfigError, match="--samples must be at least 1"):
        build(ScoreConfig(), build_parser().parse_args(["score", "--samples", "0", "--out", "x"]), TABLES["score"][1])


def test_settings_round_trip_and_defaults_have_one_home():
    cfg = RunConfig(tasks=("gsm8k",), bits=(3,))
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    assert "quantize.group_size" in leaf_paths(cfg)
    assert RunConfig().mask.fraction == DEFAULT_FRACTION
    # the budget's literal appears only in config.py
    pkg = Path(__file__).resolve().parent.parent / "circuitq"
    homes = [p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if "0.0035" in p.read_text()]
    assert homes == ["config.py"], homes


def test_tacq_rtn_uses_rtn_and_tacq_uses_gptq(calib_ids):
    from circuitq.pipeline import stages
    from circuitq.quant.driver import quant_spec
    from circuitq.quant.quantizer import rtn_quantize

    model = tiny_model()
    q = QuantizeConfig(bits=3, group_size=32)
    rtn = stages.quantized_weights(model, stages.qw_config("tacq-rtn", q), calib_ids)
    gptq = stages.quantized_weights(model, stages.qw_config("tacq", q), calib_ids, need_hinv=True)
    assert rtn.config.method == "rtn" and gptq.config.method == "gptq"
    n_diff = 0
    for n, w in rtn.weights.items():
        expect = rtn_quantize(model.get_parameter(n).detach().float(), quant_spec(q)).dequantize()
        assert torch.equal(w.float(), expect), n
        n_diff += int((gptq.weights[n] != w).sum())
    assert n_diff > 0   # the two quantizers differ, so the check above could fail
    with pytest.raises(ValueError, match="contrasts with rtn"):
        stages.score_weights("tacq-rtn", model, {"sum_abs": {}}, gptq)
    with pytest.raises(ValueError, match="needs Q\\(W\\)"):
        stages.score_weights("tacq", model, {"sum_abs": {}}, None)


def test_run_with_tacq_rtn_baseline_scores_against_rtn(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitq.config import CalibConfig, DataConfig, EvalConfig
    from circuitq.model.loading import LoadedModel
    from circuitq.pipeline.run import Runner
    from circuitq.quant.driver import quant_spec
    from circuitq.quant.quantizer import rtn_quantize

    d, _ = tiny_dir
    lm = LoadedModel(AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d), str(d), str(d))
    cfg = RunConfig(model=str(d), tasks=("gsm8k",), bits=(3,), baselines=("tacq-rtn",),
                    data=DataConfig(data_dir=str(task_data(tmp_path))), calib=CalibConfig(samples=4, seq_len=64),
                    quantize=QuantizeConfig(group_size=32, hessian="shared"), eval=EvalConfig(samples=3))
    from circuitq.pipeline.plan import MaskRecipe
    from circuitq.saliency.masks import select_topk

    r = Runner(lm, cfg, tmp_path / "run", progress=False)
    stats = r.grad_stats("gsm8k").tensors["sum_abs"]
    mask = r.mask(MaskRecipe("tacq-rtn", "gsm8k"), 3)   # scored and selected one module at a time
    expect = {}
    for n in mask:
        w = lm.model.get_parameter(n).detach().float()
        expect[n] = stats[n] * (w - rtn_quantize(w, quant_spec(cfg.quantize_at(3))).dequantize()).abs() * w.abs()
    want = select_topk(expect, cfg.mask.fraction)
    assert all(torch.equal(mask[n], want[n]) for n in want)
    assert sum(int(m.sum()) for m in mask.values()) == int(cfg.mask.fraction * sum(m.numel() for m in mask.values()))


def test_score_and_run_give_identical_scores_for_identical_settings(tmp_path, tiny_dir):
    from circuitq.saliency.files import load_scores

    d, _ = tiny_dir
    data = task_data(tmp_path)
    common = ["--model", str(d), "--data-dir", str(data), "--group-size", "32", "--hessian", "shared",
              "--batch-size", "4", "--bits", "3"]
    assert main(["run", *common, "--tasks", "mmlu", "--baselines", "--calib-samples", "6", "--calib-seq-len", "64",
                 "--eval-samples", "3", "--out", str(tmp_path / "run")]) == 0
    assert main(["score", *common, "--task", "mmlu", "--method", "tacq", "--samples", "6", "--seq-len", "64",
                 "--out", str(tmp_path / "score")]) == 0
    run_dir = next((tmp_path / "run" / "steps").glob("scores-*"))
    a, b = load_scores(run_dir)["scores"], load_scores(tmp_path / "score")["scores"]
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert any(bool((a[n] > 0).any()) for n in a)


def test_python_api_on_a_model_in_memory(tmp_path, tiny_dir):
    import circuitq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _ = tiny_dir
    model, tok = AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
    task = circuitq.Task("gsm8k", circuitq.DataConfig(data_dir=str(task_data(tmp_path))), tok)
    calib = circuitq.CalibConfig(samples=4, seq_len=64)
    items = task.calib_items(calib.samples, calib.seed)
    assert not {e.prompt for e in items} & {e.prompt for e in task.eval_items()}   # disjoint by construction
    stats = circuitq.collect_gradients(model, tok, items, calib, progress=False)["stats"]
    q = circuitq.QuantizeConfig(bits=3, group_size=32, hessian="shared")
    windows = circuitq.calibration_tokens(items, tok, calib)
    ref = circuitq.quantized_weights(model, q, windows)
    scores = circuitq.score_weights("tacq", model, stats, ref)
    mask = circuitq.select(scores, circuitq.MaskConfig(fraction=0.02))
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == int(0.02 * sum(m.numel() for m in mask.values()))
    before = {n: p.clone() for n, p in model.named_parameters()}
    qmodel, report = circuitq.quantize(model, q, windows, masks=mask, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())   # the original is untouched
    assert report.bits.nnz == kept
    res = circuitq.evaluate(qmodel, tok, task.eval_items(3), task.kind, reference=model, progress=False)
    assert res.metrics["kl"] > 0 and 0 <= res.metrics["top1_agreement"] <= 1
    cmp = circuitq.compare(scores, circuitq.score_weights("grad", model, stats), 0.02,
                           geometry=circuitq.Geometry.from_config(model.config))
    assert 0 <= cmp["masks"]["global"]["iou"] <= 1
    assert circuitq.circuit_map(mask, model).total == kept
    from circuitq.model.packed import load_packed

    out = circuitq.export(tmp_path / "q", qmodel, tok, report, {"bits": 3, "group_size": 32})
    packed = load_packed(out)
    for n in mask:
        assert torch.equal(packed.get_parameter(n), qmodel.get_parameter(n)), n


def test_quantize_calibrates_only_on_the_tasks_calibration_items(tmp_path, tiny_dir, monkeypatch):
    """`circuitq quantize --calib TASK` (and the explorer's export, which calls the same function)
    never calibrates on an item that `circuitq eval --task TASK` scores."""
    import circuitq.data.calib as C
    import circuitq.pipeline.stages as S
    from circuitq.data.tasks import Task

    d, _ = tiny_dir
    data = task_data(tmp_path)
    seen, real = [], C.calibration_sequences

    def spy(examples, tokenizer, seq_len):
        seen.extend(e.prompt for e in examples)
        return real(examples, tokenizer, seq_len)

    monkeypatch.setattr(S, "calibration_sequences", spy)   # where the quantize stage looks it up
    assert main(["quantize", "--model", str(d), "--calib", "gsm8k", "--data-dir", str(data), "--samples", "100",
                 "--seq-len", "32", "--group-size", "32", "--ppl-windows", "2", "--out", str(tmp_path / "q")]) == 0
    from circuitq.config import DataConfig

    task = Task("gsm8k", DataConfig(data_dir=str(data)))
    assert set(seen) == {e.prompt for e in task.split("calib")}
    assert not set(seen) & {e.prompt for e in task.eval_items()}


def test_loss_scope_is_in_every_step_key_and_old_keys_migrate():
    from dataclasses import replace

    from circuitq.config import CalibConfig
    from circuitq.pipeline.run import StepKeys, migrate_key

    cfg = RunConfig()
    keys = StepKeys(cfg, "fp", {"mmlu": "x"}, {"mmlu": "y"})
    assert keys.calib("mmlu")["loss"] == "answer"    # at its default too (key format 2)
    old = {k: v for k, v in keys.calib("mmlu").items() if k not in ("loss", "tokens", "template")}
    assert migrate_key(old) == keys.calib("mmlu")    # a format-1 key (defaults left out) completed
    all_tokens = StepKeys(replace(cfg, calib=CalibConfig(samples=32, loss="all")), "fp", {"mmlu": "x"}, {"mmlu": "y"})
    assert all_tokens.calib("mmlu")["loss"] == "all" and all_tokens.score("mmlu", 3, "tacq") != keys.score("mmlu", 3, "tacq")
    with pytest.raises(ConfigError, match="loss"):
        CalibConfig(loss="everything")
