"""`circuitq run` end to end on a tiny random model and tiny data; the plan, the step store and
the report tables."""
import csv
import json

import pytest
import torch

from circuitq.cli import main
from circuitq.config import ConfigError, MaskConfig, RunConfig
from circuitq.model.arch import Geometry
from circuitq.pipeline.plan import Job, MaskRecipe, plan_jobs
from circuitq.pipeline.run import check_run_config
from circuitq.pipeline.store import StepStore

from conftest import task_data


def test_plan_has_every_method_transfer_and_union():
    jobs = plan_jobs(RunConfig(tasks=("mmlu", "gsm8k"), bits=(2, 3)))
    assert len(jobs) == 2 * 2 * 8
    labels = {(j.bits, j.task, j.label) for j in jobs}
    assert (2, "mmlu", "tacq[gsm8k]") in labels and (3, "gsm8k", "tacq[mmlu]") in labels
    assert (3, "mmlu", "tacq[union]") in labels and (2, "gsm8k", "gptq") in labels
    assert {j.label for j in jobs} == {"gptq", "tacq", "magnitude", "spqr", "grad", "random", "tacq[mmlu]",
                                       "tacq[gsm8k]", "tacq[union]"}
    assert Job(3, "mmlu", MaskRecipe("grad", "mmlu")) in jobs  # task-dependent baselines use the task's data
    one = plan_jobs(RunConfig(tasks=("mmlu",), bits=(3,), baselines=("random",)))
    assert [j.label for j in one] == ["gptq", "tacq", "random"]


def test_step_store_finds_by_settings_not_name(tmp_path):
    st = StepStore(tmp_path)
    key = {"task": "mmlu", "bits": 3, "nested": {"a": [1, 2]}}
    with st.create("mask", key, "whatever") as tmp:
        (tmp / "x").write_text("1")
    assert StepStore(tmp_path).find("mask", dict(reversed(key.items()))) is not None
    assert StepStore(tmp_path).find("mask", {**key, "bits": 2}) is None
    assert StepStore(tmp_path).find("scores", key) is None
    found = StepStore(tmp_path).find("mask", key)
    found.rename(found.parent / "renamed")  # names do not matter
    assert StepStore(tmp_path).find("mask", key).name == "renamed"


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="unknown baseline"):
        check_run_config(RunConfig(baselines=("nope",)))
    with pytest.raises(ConfigError, match="fraction"):
        RunConfig(mask=MaskConfig(fraction=0))
    with pytest.raises(TypeError):
        RunConfig(("mmlu",))   # keyword construction only


def _args(d, data, out, *extra):
    return ["run", "--model", str(d), "--tasks", "mmlu", "gsm8k", "--bits", "2", "3", "--data-dir", str(data),
            "--calib-samples", "6", "--calib-seq-len", "64", "--eval-samples", "5", "--eval-seq-len", "96",
            "--fraction", "0.02", "--group-size", "32", "--batch-size", "4", "--out", str(out), *extra]


def test_run_end_to_end_writes_every_table_and_resumes(tmp_path, tiny_dir, capsys):
    d, _ = tiny_dir
    data = task_data(tmp_path)
    out = tmp_path / "run"
    assert main(_args(d, data, out)) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    # 2 bits x 2 tasks x 8 methods + the reference row per (task, bits)
    assert len(rows) == 2 * 2 * 8 + 4
    methods = {r["method"] for r in rows}
    assert {"gptq", "tacq", "magnitude", "spqr", "grad", "random", "tacq[mmlu]", "tacq[gsm8k]", "tacq[union]",
            "reference (16-bit)"} == methods
    q = [r for r in rows if r["method"] != "reference (16-bit)"]
    assert all(float(r["kl"]) > 0 for r in q)  # every quantized model differs from the original
    assert all(0 <= float(r["top1_agreement"]) <= 1 for r in q)
    for r in q:  # 16-bit weights cost bits: masked runs sit above plain GPTQ at the same width
        base = next(x for x in q if x["method"] == "gptq" and x["bits"] == r["bits"] and x["task"] == r["task"])
        if r["method"] != "gptq":
            assert float(r["average_bits"]) > float(base["average_bits"])
            assert int(r["n_16bit"]) > 0
    mm = [r for r in rows if r["task"] == "mmlu"]
    assert all(r["accuracy"] != "" for r in mm) and all(r["flips_lost"] != "" for r in mm if r in q)
    transfer = list(csv.DictReader((out / "transfer.csv").open()))
    assert {t["circuit"] for t in transfer} == {"mmlu", "gsm8k", "union", "none (gptq)"}
    html = (out / "report.html").read_text()
    for needle in ("Results: mmlu, 2-bit", "Results: gsm8k, 3-bit", "Transfer matrix at 2 bits", "KL by method",
                   "TaCQ selection mass per attention head", "Attribution patching per attention head",
                   "Circuit overlap by layer", "Commands", "circuitq run --model"):
        assert needle in html, needle
    assert (out / "report.kl.png").stat().st_size > 1000 and (out / "report.heads.png").stat().st_size > 1000
    assert (out / "report.circuits.png").stat().st_size > 1000
    doc = json.loads((out / "run.json").read_text())
    assert doc["steps"]["computed"] > 0
    sdir = out / next(iter(doc["score_dirs"].values()))
    smeta = json.loads((sdir / "score.json").read_text())
    assert smeta["model"] == str(d) and smeta["method"] == "tacq" and smeta["geometry"]["n_layers"] == 2
    # a rerun reuses every step and gives the same table
    capsys.readouterr()
    assert main(_args(d, data, out)) == 0
    doc2 = json.loads((out / "run.json").read_text())
    assert doc2["steps"]["computed"] == 0 and doc2["steps"]["reused"] > 0
    assert list(csv.DictReader((out / "results.csv").open())) == rows
    # changing only the fraction recomputes masks and evaluations, not statistics or scores
    assert main(_args(d, data, out, "--fraction", "0.03", "--bits", "3", "--no-transfer", "--baselines", "magnitude")) == 0
    doc3 = json.loads((out / "run.json").read_text())
    kinds = [l for l in doc3["log"] if "per-sample gradients" in l]
    assert kinds == [] and doc3["steps"]["computed"] > 0


def test_run_refuses_foreign_out_dir(tmp_path, tiny_dir, capsys):
    d, _ = tiny_dir
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(_args(d, task_data(tmp_path), out)) == 2
    assert "not a circuitq run directory" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_reference_logits_cache_gives_the_same_metrics(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitq.evals import evaluate
    from circuitq.data.tasks import Example

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    ref = AutoModelForCausalLM.from_pretrained(d).eval()
    q = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ex = [Example(f"the fox {i}", f" jumps over the lazy dog {i}") for i in range(7)]
    direct = evaluate(q, tok, ex, "jsonl", reference=ref, batch_size=3, seq_len=64, progress=False).metrics
    cache: dict = {}
    evaluate(ref, tok, ex, "jsonl", batch_size=3, seq_len=64, progress=False, logits_out=cache)
    cached = evaluate(q, tok, ex, "jsonl", batch_size=3, seq_len=64, progress=False, reference_logits=cache).metrics
    assert direct["kl"] > 0
    assert cached["kl"] == pytest.approx(direct["kl"], rel=1e-6)
    assert cached["top1_agreement"] == direct["top1_agreement"]


def test_interrupted_run_resumes_from_finished_steps(tmp_path, tiny_dir, monkeypatch, capsys):
    from circuitq.pipeline import run as run_mod

    d, _ = tiny_dir
    data = task_data(tmp_path)
    out = tmp_path / "run"
    args = _args(d, data, out, "--bits", "3", "--baselines", "random")
    real, calls = run_mod.Runner.run_job, []

    def dying(self, job):
        calls.append(job)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, job)

    monkeypatch.setattr(run_mod.Runner, "run_job", dying)
    assert main(args) == 130
    assert not (out / "results.csv").exists()
    finished = len(list((out / "steps").glob("eval-*")))
    assert finished >= 3 + 2  # three jobs and the two reference evaluations survived
    monkeypatch.setattr(run_mod.Runner, "run_job", real)
    assert main(args) == 0
    doc = json.loads((out / "run.json").read_text())
    assert doc["steps"]["reused"] >= 3 and (out / "results.csv").exists()
    assert not list(out.rglob(".*.tmp-*"))  # nothing half-written left behind


def test_damaged_steps_are_moved_aside_and_computed_again(tmp_path, tiny_dir, capsys):
    """Truncated statistics, an edited eval.json and a deleted scores step: the rerun says what
    it found, recomputes exactly those, and the report keeps its circuit section."""
    import shutil

    d, _ = tiny_dir
    data = task_data(tmp_path)
    out = tmp_path / "run"
    args = _args(d, data, out, "--bits", "3", "--baselines", "grad")
    assert main(args) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    steps = out / "steps"
    stats = next(steps.glob("stats-mmlu-*")) / "stats.safetensors"   # needed again: its scores are gone
    stats.write_bytes(stats.read_bytes()[:100])
    ev = next(steps.glob("eval-grad-mmlu-*")) / "eval.json"
    doc = json.loads(ev.read_text())
    doc["metrics"]["kl"] = 0.0          # an edited result is not trusted
    ev.write_text(json.dumps(doc))
    shutil.rmtree(next(steps.glob("scores-mmlu-tacq-*")))
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "stats.safetensors does not match its checksum" in log and "eval.json does not match" in log
    assert len(list(steps.glob(".damaged-*"))) == 2
    again = list(csv.DictReader((out / "results.csv").open()))
    grad = [r for r in again if r["method"] == "grad" and r["task"] == "mmlu"][0]
    assert float(grad["kl"]) > 0
    diff = [(a["method"], a["task"], k) for a, b in zip(again, rows) for k in a if a[k] != b[k] and "seconds" not in k]
    assert diff == [], diff
    html = (out / "report.html").read_text()
    assert "TaCQ selection mass per attention head" in html and "Attribution patching per attention head" in html


def test_run_with_faithfulness_checks_each_circuit_and_reports_it(tmp_path, tiny_dir):
    d, _ = tiny_dir
    data = task_data(tmp_path)
    out = tmp_path / "run"
    args = ["run", "--model", str(d), "--tasks", "mmlu", "--bits", "3", "--data-dir", str(data),
            "--calib-samples", "6", "--calib-seq-len", "64", "--eval-samples", "5", "--eval-seq-len", "96",
            "--fraction", "0.02", "--group-size", "32", "--batch-size", "4", "--baselines", "--no-transfer",
            "--faithfulness", "heads", "--out", str(out)]
    assert main(args) == 0
    rep = json.loads((out / "faithfulness-mmlu-heads.json").read_text())
    assert rep["format"] == "circuitq.faithfulness" and rep["units_kind"] == "heads" and rep["bits"] == 3
    assert len(rep["units"]) == 2 * 4  # tiny model: 2 layers x 4 heads, all of them (10 top + 10 random asked)
    assert set(rep["contrasts"]) == {"only circuit", "only random", "all but circuit", "all but random"}
    html = (out / "report.html").read_text()
    assert "Faithfulness: mmlu, 3-bit circuit vs real ablation" in html and "best estimator" in html
    assert "Measured faithfulness on mmlu (this run)" in html and "atp" in html   # beside the map it measures
    # each unit's per-item changes, and the ranking against their median, in the file and the report
    assert all(len(u["measured_items"]) == rep["items"] for u in rep["units"])
    assert "measured as each unit&#x27;s median item change" in html     # escaped, as every table cell
    # atp's own split-half reliability over its calibration items, in the file and the report's table
    assert rep["estimator_reliability"]["atp"]["items"] == rep["calib_items"] > 1
    assert f"reliability of atp over its {rep['calib_items']} calibration items" in html
    doc = json.loads((out / "run.json").read_text())
    assert doc["config"]["faithfulness"] == "heads"
    # a rerun reuses the faithfulness step
    assert main(args) == 0
    assert json.loads((out / "run.json").read_text())["steps"]["computed"] == 0
    assert json.loads((out / "faithfulness-mmlu-heads.json").read_text())["spearman"] == rep["spearman"]
    with pytest.raises(ConfigError, match="--faithfulness"):
        RunConfig(faithfulness="blocks")


def test_run_without_plot_packages_writes_tables_and_a_report_without_figures(tmp_path, tiny_dir, monkeypatch, capsys):
    """plotly/matplotlib are the optional `plots` extra: a run on a machine without them (a bare
    GPU box, say) must not lose its results at the last step."""
    from circuitq.pipeline import report

    monkeypatch.setattr(report, "missing_plot_packages", lambda: ["plotly"])
    d, _ = tiny_dir
    out = tmp_path / "run"
    assert main(_args(d, task_data(tmp_path), out, "--bits", "3", "--baselines", "grad", "--no-transfer")) == 0
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 2 * 3 + 2
    assert json.loads((out / "run.json").read_text())["steps"]["computed"] > 0
    html = (out / "report.html").read_text()
    assert "Figures skipped: plotly not installed" in html and "Results: gsm8k, 3-bit" in html
    assert not (out / "report.kl.png").exists()
    assert "report without figures" in capsys.readouterr().out


def test_run_on_a_split_smaller_than_eval_samples_says_so_and_finishes(tmp_path, tiny_dir, capsys):
    """A subject with fewer evaluation items than --eval-samples (most MMLU subjects at the
    defaults) runs on all of them; before 0.6 it crashed: Runner reported before its log existed."""
    d, _ = tiny_dir
    data = task_data(tmp_path)
    out = tmp_path / "small"
    args = ["run", "--model", str(d), "--tasks", "mmlu:philosophy", "--bits", "3", "--no-transfer", "--baselines",
            "random", "--data-dir", str(data), "--calib-samples", "3", "--calib-seq-len", "64", "--eval-samples", "48",
            "--eval-seq-len", "96", "--fraction", "0.02", "--group-size", "32", "--out", str(out)]
    assert main(args) == 0
    assert "fewer than --eval-samples 48; using all of it" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} == {"reference (16-bit)", "gptq", "tacq", "random"}
    assert not list((out / "steps").glob(".originals-*")), "the weight backup outlived the run"


def test_run_that_will_not_fit_is_refused_before_any_work(tmp_path, tiny_dir, capsys, monkeypatch):
    from circuitq.pipeline import budget

    d, _ = tiny_dir
    monkeypatch.setattr(budget, "available_memory", lambda: 1e6)
    out = tmp_path / "nofit"
    assert main(_args(d, task_data(tmp_path), out)) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in l]
    assert len(err) == 1 and "needs about" in err[0] and "--batch-tokens" in err[0] and "Traceback" not in err[0]
    assert not (out / "steps").exists() or not any((out / "steps").iterdir())
    monkeypatch.setattr(budget, "available_memory", lambda: 1e12)
    monkeypatch.setattr(budget, "free_disk", lambda p: 1e3)
    assert main(_args(d, task_data(tmp_path / "b"), out)) == 2
    assert "free there" in capsys.readouterr().err


# ---- step keys: every setting a step depends on (issue 24) ------------------------------------
def _format1(key, defaults):
    """The key as circuitq <= 0.6.1 wrote it: calibration ``loss``/``tokens``/``template``, the
    evaluation ``template`` and the quantizer's extra settings only when not the default (a
    reference writer of the old format, independent of ``migrate_key``)."""
    if isinstance(key, list):
        return [_format1(k, defaults) for k in key]
    if not isinstance(key, dict):
        return key
    out = {k: _format1(v, defaults) for k, v in key.items()}
    if "seed" in out and "samples" in out:
        for k, v in (("loss", "answer"), ("tokens", 0), ("template", "auto")):
            if out.get(k) == v:
                del out[k]
    if "all_tokens" in out and out.get("template") == "auto":
        del out["template"]
    if "hessian_rows" in out or ("mask" in out and isinstance(out.get("hessian"), dict)):
        for k, v in defaults.items():
            if out.get(k) == v:
                del out[k]
    return out


def test_old_step_keys_are_migrated_and_a_changed_default_recomputes(tmp_path, tiny_dir, capsys):
    """A run directory written with format-1 keys (settings at their default left out) is reused
    when today's settings are those defaults, and recomputed when a setting it left out differs:
    before, a step keyed without a field matched whatever that field's default had become."""
    from circuitq.config import QuantizeConfig
    from circuitq.pipeline.run import QUANT_IN_KEY

    d, _ = tiny_dir
    data = task_data(tmp_path)
    out = tmp_path / "run"
    args = _args(d, data, out, "--bits", "3", "--no-transfer", "--baselines", "grad")
    assert main(args) == 0
    defaults = {k: getattr(QuantizeConfig(), f) for f, k in QUANT_IN_KEY.items()}
    n_old = 0
    for f in (out / "steps").glob("*/step.json"):          # rewrite every step as 0.6.1 wrote it
        doc = json.loads(f.read_text())
        old = _format1(doc["key"], defaults)
        n_old += old != doc["key"]
        doc = {**doc, "key": old, "circuitq_version": "0.6.1"}
        doc.pop("key_format")
        f.write_text(json.dumps(doc))
    assert n_old >= 5
    import shutil

    from circuitq.pipeline import run as R

    shutil.copytree(out, tmp_path / "older")                  # the same steps, as if written when ...
    legacy = {**R.LEGACY_DEFAULTS, "calib": {**R.LEGACY_DEFAULTS["calib"], "loss": "all"}}
    monkey = pytest.MonkeyPatch()
    monkey.setattr(R, "LEGACY_DEFAULTS", legacy)              # ... the default loss was "all"
    try:
        older = _args(d, data, tmp_path / "older", "--bits", "3", "--no-transfer", "--baselines", "grad")
        assert main(older) == 0                               # today's default differs: recomputed
        log = json.loads((tmp_path / "older" / "run.json").read_text())["log"]
        assert any("per-sample gradients" in line for line in log)
    finally:
        monkey.undo()
    assert main(args) == 0                                    # same settings: every step reused
    assert json.loads((out / "run.json").read_text())["steps"]["computed"] == 0
    # a setting the old keys left out at its default now differs ("a default that changed")
    assert main(args + ["--loss", "all"]) == 0
    log = json.loads((out / "run.json").read_text())["log"]
    assert any("per-sample gradients" in line for line in log)
    assert main(args + ["--sym"]) == 0
    assert any("Hessians" in line or "GPTQ" in line for line in json.loads((out / "run.json").read_text())["log"]) \
        or json.loads((out / "run.json").read_text())["steps"]["computed"] > 0


def test_run_draws_attribution_maps_equal_to_the_direct_computation(tmp_path, tiny_dir):
    """The run's attribution map (streamed with the TaCQ scores' Q(W), one module at a time) equals
    ΣG · (Q(W) − W) computed directly from the same Σ G and a mask-free GPTQ at the same settings,
    and the report draws it signed."""
    from circuitq.circuits.maps import aggregate, read_map
    from circuitq.config import from_dict
    from circuitq.model.loading import load_model
    from circuitq.pipeline import stages
    from circuitq.pipeline.run import Runner

    d, _ = tiny_dir
    data = task_data(tmp_path)
    out = tmp_path / "run"
    assert main(["run", "--model", str(d), "--tasks", "gsm8k", "--bits", "3", "--data-dir", str(data),
                 "--calib-samples", "6", "--calib-seq-len", "64", "--eval-samples", "5", "--eval-seq-len", "96",
                 "--fraction", "0.02", "--group-size", "32", "--baselines", "random", "--no-transfer",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "run.json").read_text())
    cmap, meta = read_map(out / doc["maps"]["gsm8k"] / "map.safetensors")
    assert meta["estimator"] == "atp" and meta["bits"] == 3
    cfg = from_dict(RunConfig, doc["config"])
    lm = load_model(str(d))
    r = Runner(lm, cfg, out, progress=False)
    g = r.grad_sum("gsm8k").tensors["sum"]                 # the stored step, reused
    qw = stages.quantized_weights(lm.model, cfg.quantize_at(3), r.calib_sequences("gsm8k")).weights
    atp = {n: g[n] * (qw[n] - lm.model.get_parameter(n).detach()) for n in qw}
    want = aggregate(atp, Geometry.from_config(lm.model.config))
    assert torch.allclose(cmap.head, want.head, rtol=1e-4, atol=1e-7)
    assert torch.allclose(cmap.neuron, want.neuron, rtol=1e-4, atol=1e-7)
    assert (cmap.head < 0).any() and (cmap.head > 0).any()   # signed: some heads are predicted to help
    html = (out / "report.html").read_text()
    assert "Attribution patching per attention head" in html and "not measured in this run" in html
    # off: no map step and no Σ G pass
    assert main(["run", "--model", str(d), "--tasks", "gsm8k", "--bits", "3", "--data-dir", str(data),
                 "--calib-samples", "6", "--calib-seq-len", "64", "--eval-samples", "5", "--eval-seq-len", "96",
                 "--fraction", "0.02", "--group-size", "32", "--baselines", "random", "--no-transfer",
                 "--head-maps", "off", "--out", str(tmp_path / "off")]) == 0
    assert json.loads((tmp_path / "off" / "run.json").read_text())["maps"] == {}
    assert not list((tmp_path / "off" / "steps").glob("stats-sum-*"))


def test_head_maps_of_the_task_metric(tmp_path, tiny_dir):
    """``--head-maps atp-metric`` on greater-than: the map's Σ G is the gradient of minus the task's
    metric (equal to a direct ``--objective metric`` pass, unlike the NLL one), its meta says so, the
    run's faithfulness check uses the same objective and the report reads the Spearman against the
    metric; a task without a differentiable metric keeps atp of the NLL."""
    from dataclasses import replace

    from circuitq.circuits.maps import read_map
    from circuitq.config import from_dict
    from circuitq.model.loading import load_model
    from circuitq.pipeline import stages
    from circuitq.pipeline.run import Runner

    d, _ = tiny_dir
    out = tmp_path / "run"
    assert main(["run", "--model", str(d), "--tasks", "greater-than", "--bits", "3", "--calib-samples", "6",
                 "--calib-seq-len", "64", "--eval-samples", "6", "--fraction", "0.02", "--group-size", "32",
                 "--baselines", "random", "--no-transfer", "--head-maps", "atp-metric", "--faithfulness", "heads",
                 "--map-samples", "6", "--out", str(out)]) == 0
    doc = json.loads((out / "run.json").read_text())
    _, meta = read_map(out / doc["maps"]["greater-than"] / "map.safetensors")
    assert meta["objective"] == "metric" and "minus the task's metric" in meta["values"]
    cfg = from_dict(RunConfig, doc["config"])
    lm = load_model(str(d))
    r = Runner(lm, cfg, out, progress=False)
    g = r.grad_sum("greater-than").tensors["sum"]           # the stored step
    items = r.items("greater-than", "calib")[:6]
    direct = {o: stages.collect_gradients(lm.model, lm.tokenizer, items, replace(cfg.calib, objective=o), ("sum",),
                                          progress=False, model_path=str(d))["stats"].tensors["sum"]
              for o in ("metric", "nll")}
    n = next(iter(g))
    assert torch.allclose(g[n], direct["metric"][n], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(g[n], direct["nll"][n], rtol=1e-2, atol=1e-6)
    faith = json.loads(next(out.glob("faithfulness-greater-than-*.json")).read_text())
    assert faith["objective"] == "metric" and faith["spearman_metric"]
    html = (out / "report.html").read_text()
    assert "atp of −metric" in html and "sign flipped" in html
    assert cfg.map_objective("gsm8k") == "nll" and cfg.map_objective("ioi") == "metric"
    assert replace(cfg, head_maps="atp").map_objective("ioi") == "nll"


def test_run_with_an_attribution_baseline_collects_the_signed_sum_too(tmp_path, tiny_dir):
    """``--baselines atp atp-abs`` reads Σ_s G_s besides Σ|G_s|: the run's gradient pass collects both
    in one pass (a step keyed by them), and the atp rows are evaluated (0.7.0 failed with KeyError)."""
    from circuitq.saliency.files import open_stats

    d, _ = tiny_dir
    out = tmp_path / "run"
    assert main(_args(d, task_data(tmp_path), out, "--bits", "3", "--no-transfer", "--baselines", "atp",
                      "atp-abs")) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} >= {"atp", "atp-abs", "tacq", "gptq"}
    assert all(float(r["kl"]) >= 0 for r in rows if r["method"].startswith("atp"))
    steps = sorted((out / "steps").glob("stats-mmlu-*"))
    st = open_stats(steps[0] / "stats.safetensors")
    assert {"sum_abs", "sum"} <= set(st.tensors)


def test_report_rows_of_a_faithfulness_check_name_every_figure():
    """The run report's faithfulness table: per estimator Spearman against the mean and the median
    item change, the noise ceilings, the attainable Spearman and its correction."""
    from circuitq.pipeline.report import faithfulness_rows

    rep = {"spearman": {"atp": 0.8}, "units": [{}] * 30, "units_kind": "heads", "best_estimator": "atp",
           "noise_ceiling": {"ceiling": 0.95}, "estimator_reliability": {"atp": {"items": 64, "reliability": 0.9,
                                                                                  "reliability_doubled": 0.947}},
           "attenuation": {"atp": {"attainable": 0.9, "corrected": 0.889}},
           "robust": {"trim": 0.1, "statistics": {"median": {"spearman": {"atp": 0.93}, "noise_ceiling": {"ceiling": 0.99}}}},
           "contrasts": {"only circuit": {"loss_change": 0.2}}, "only_circuit_over_only_random": 3.0, "ablation": "quantize"}
    rows = {r["what"]: r["value"] for r in faithfulness_rows(rep)}
    assert rows["Spearman(predicted by atp, measured) over 30 heads units"] == 0.8
    assert rows["Spearman(predicted by atp, measured as each unit's median item change; robust to a few heavy items)"] == 0.93
    assert rows["noise ceiling of the median item change"] == 0.99
    assert rows["attainable Spearman for atp with both samples this noisy (√ of the two reliabilities); atp corrected "
                "for them: 0.889"] == 0.9
