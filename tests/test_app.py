"""The explorer: every page through streamlit's AppTest on a small runs directory made here, and one
end-to-end test of the real server in headless Chromium."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuitq.cli import main
from conftest import make_tiny_dir, task_data

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(Path(__file__).resolve().parent.parent / "circuitq" / "app" / "explorer.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/small (a `circuitq run` on a tiny model), runs/other (scores of a different model) and
    runs/broken (a corrupt run.json)."""
    root = tmp_path_factory.mktemp("app")
    runs = root / "runs"
    d, _ = make_tiny_dir(runs / ".models" / "m1")   # inside the runs dir: the app may read it
    d2, _ = make_tiny_dir(root / "m2", seed=1)      # outside: the app must not
    data = task_data(root)
    assert main(["run", "--model", str(d), "--tasks", "mmlu", "gsm8k", "--bits", "3", "--data-dir", str(data),
                 "--calib-samples", "6", "--calib-seq-len", "64", "--eval-samples", "4", "--eval-seq-len", "96",
                 "--fraction", "0.02", "--group-size", "32", "--batch-size", "4", "--baselines", "magnitude",
                 "--out", str(runs / "small")]) == 0
    assert main(["score", "--model", str(d2), "--task", "mmlu", "--method", "grad", "--samples", "4", "--seq-len", "64",
                 "--data-dir", str(data), "--out", str(runs / "other" / "mmlu")]) == 0
    (runs / "broken").mkdir()
    (runs / "broken" / "run.json").write_text("{not json")
    return runs, data


def _app(runs_dir, monkeypatch):
    monkeypatch.setenv("CIRCUITQ_RUNS", str(runs_dir))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def test_explore_page(runs, monkeypatch):
    at = _app(runs[0], monkeypatch)
    at.sidebar.selectbox(key="run").set_value("small").run()
    assert not at.exception
    n_small = int(_metric(at, "16-bit weights").replace(",", ""))
    assert n_small > 0 and float(_metric(at, "Average bits")) > 3.0
    charts = at.get("plotly_chart")
    assert len(charts) == 3  # head heatmap, module bars, tile density
    assert "heatmap" in charts[0].proto.spec.lower()
    assert '"zmid":0' in charts[0].proto.spec.replace(" ", "")   # the run's attribution map, signed, by default
    assert any("not measured in this run" in c.value for c in at.caption)
    at.radio(key="head_map_kind").set_value(at.radio(key="head_map_kind").options[1]).run()
    assert not at.exception and "selection mass" in at.get("plotly_chart")[0].proto.spec
    at.select_slider(key="budget").set_value(0.02).run()
    assert int(_metric(at, "16-bit weights").replace(",", "")) > n_small
    top = at.dataframe[-1].value
    assert len(top) == 100 and list(top["score"]) == sorted(top["score"], reverse=True)
    assert top["value"].notna().all() and top["quant_error"].notna().all()
    assert top["unit"].str.match(r"L0\.H\d").all()  # layer 0 q_proj rows belong to query heads
    # unreadable run is listed with its reason, the others still work
    assert any("broken" in m.value and "JSON" in m.value for m in at.sidebar.markdown)


def test_compare_page_and_different_models(runs, monkeypatch):
    at = _app(runs[0], monkeypatch)
    at.sidebar.selectbox(key="run").set_value("small").run()
    at.sidebar.radio(key="page").set_value("Compare").run()
    assert not at.exception
    iou = float(_metric(at, "IoU"))
    assert 0 <= iou <= 1
    charts = at.get("plotly_chart")
    assert len(charts) == 3   # both tasks' attribution maps, the selection mass (folded away), overlap by layer
    assert "Attribution patching per attention head" in charts[0].proto.spec
    labels = at.selectbox(key="cmp_b").options
    other = next(i for i, l in enumerate(labels) if l.startswith("other"))
    at.selectbox(key="cmp_b").set_value(other).run()
    assert any("different models" in e.value for e in at.error)


def test_export_page_runs_a_background_job(runs, monkeypatch):
    runs_dir, data = runs
    monkeypatch.setenv("CIRCUITQ_DATA_DIR", str(data))
    at = _app(runs_dir, monkeypatch)
    at.sidebar.selectbox(key="run").set_value("small").run()
    at.sidebar.radio(key="page").set_value("Export").run()
    assert not at.exception
    avg = float(_metric(at, "Predicted average bits"))
    at.radio(key="exp_how").set_value("union").run()
    a_label = at.selectbox(key="exp_a").options[at.selectbox(key="exp_a").index]
    other = next(i for i, l in enumerate(at.selectbox(key="exp_b").options) if l.split(" ")[0] != a_label.split(" ")[0])
    assert "seed 0" in a_label
    at.selectbox(key="exp_b").select_index(other).run()
    assert float(_metric(at, "Predicted average bits")) >= avg  # the union keeps at least as many weights
    at.text_input(key="exp_name").set_value("u1").run()
    at.number_input(key="exp_samples").set_value(4).run()
    at.number_input(key="exp_limit").set_value(8).run()
    at.button(key="exp_go").click().run()
    assert any("Started" in s.value for s in at.success)
    model = runs_dir / "small" / "models" / "u1"
    from circuitq.app import jobs as J

    job = next(j for j in J.list_jobs(runs_dir / "small" / "models") if j.name == "u1")
    deadline = time.time() + 240
    while J.job_status(job)["state"] == "running" and time.time() < deadline:
        time.sleep(1)
    assert J.job_status(job)["state"] == "done", Path(job.log).read_text()[-2000:]
    assert (model / "circuitq.json").exists() and (model / "eval-mmlu.json").exists() and (model / "eval-gsm8k.json").exists()
    at.run()
    table = next(d.value for d in at.dataframe if "model" in d.value.columns)
    assert "u1" in set(table["model"]) and (table["kl"] > 0).all()
    mask = runs_dir / "small" / "masks" / "u1.safetensors"
    from circuitq.saliency.masks import load_masks

    assert load_masks(mask).metadata["combine"] == "union"


def test_export_refuses_a_model_outside_the_runs_dir(runs, monkeypatch):
    at = _app(runs[0], monkeypatch)
    at.sidebar.selectbox(key="run").set_value("other").run()
    at.sidebar.radio(key="page").set_value("Export").run()
    assert any("only reads models from there" in e.value for e in at.error)
    assert not at.button  # nothing to start


def test_no_runs_says_how_to_make_one(tmp_path, monkeypatch):
    at = _app(tmp_path / "empty", monkeypatch)
    assert any("circuitq run" in i.value for i in at.info)


def test_paths_are_confined(tmp_path):
    from circuitq.app.catalog import PathOutsideRuns, confine, scan_runs

    (tmp_path / "runs").mkdir()
    with pytest.raises(PathOutsideRuns):
        confine(tmp_path / "runs", "../etc")
    (tmp_path / "outside").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "outside")
    [entry] = scan_runs(tmp_path / "runs")
    assert not entry.ok and "outside" in entry.error


def test_a_symlink_nested_inside_a_run_that_leads_outside_is_refused(tmp_path):
    """A link deep inside a run (steps/, models/) used to be listed and loaded."""
    import json

    from circuitq.app.catalog import scan_runs

    run = tmp_path / "runs" / "r"
    (run / "steps").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format": "circuitq.run"}))
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "score.json").write_text("{}")
    (run / "steps" / "scores-x").symlink_to(tmp_path / "secret")
    [entry] = scan_runs(tmp_path / "runs")
    assert not entry.ok and "steps/scores-x" in entry.error and "outside the runs directory" in entry.error
    (run / "steps" / "scores-x").unlink()
    (run / "models").symlink_to(tmp_path / "secret")
    [entry] = scan_runs(tmp_path / "runs")
    assert not entry.ok and "r/models" in entry.error
    (run / "models").unlink()
    (run / "steps" / "inside").symlink_to(run / "steps")        # a link that stays inside is fine
    [entry] = scan_runs(tmp_path / "runs")
    assert entry.ok, entry.error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)")
def test_browser_end_to_end(runs, tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    port = _free_port()
    env = {**os.environ, "CIRCUITQ_RUNS": str(runs[0])}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true",
                               "--server.port", str(port), "--server.address", "127.0.0.1",
                               "--browser.gatherUsageStats", "false"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                              "--disable-background-networking", "--disable-component-update",
                                              "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            deadline = time.time() + 60
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}", timeout=5000)
                    break
                except Exception:  # noqa: BLE001 - server still starting
                    if time.time() > deadline:
                        raise
                    time.sleep(1)
            page.get_by_text("Explore a circuit").first.wait_for(timeout=60000)
            page.locator(".js-plotly-plot .heatmaplayer").first.wait_for(timeout=90000)
            shot = Path(os.environ.get("CIRCUITQ_SCREENSHOT", tmp_path / "explorer.png"))
            page.screenshot(path=str(shot), full_page=False)
            n = page.locator(".js-plotly-plot .heatmaplayer image, .js-plotly-plot .heatmaplayer .hm").count()
            browser.close()
        assert n >= 1  # the heatmap is drawn
        assert shot.stat().st_size > 20_000
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_faithfulness_page_draws_blocks_by_layer(runs, monkeypatch):
    """A report over attention and MLP blocks (--units sublayers) adds the by-layer chart."""
    root, data = runs
    out = root / "other" / "mmlu" / "faithfulness-sublayers.json"
    assert main(["faithfulness", "--scores", str(root / "other" / "mmlu"), "--units", "sublayers", "--all-units",
                 "--calib-samples", "4", "--eval-samples", "4", "--group-size", "32", "--data-dir", str(data),
                 "--out", str(out)]) == 0
    at = _app(root, monkeypatch)
    at.sidebar.radio(key="page").set_value("Faithfulness").run()
    at.sidebar.selectbox(key="run").set_value("other").run()
    assert not at.exception, at.exception
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(specs) == 3 and "By layer" in specs[1]      # scatter, by layer, contrasts
    assert "attn: measured" in specs[1] and "mlp: predicted" in specs[1]


def test_faithfulness_page(runs, monkeypatch):
    """A real `circuitq faithfulness` report inside a scores directory is listed and drawn."""
    root, data = runs
    out = root / "other" / "mmlu" / "faithfulness-heads.json"
    assert main(["faithfulness", "--scores", str(root / "other" / "mmlu"), "--units", "heads", "--top", "2",
                 "--random", "2", "--calib-samples", "4", "--eval-samples", "4", "--group-size", "32",
                 "--curve", "--curve-grid", "0", "0.5", "1", "--estimators", "score", "atp", "ig", "--ig-steps", "2",
                 "--data-dir", str(data), "--out", str(out)]) == 0
    at = _app(root, monkeypatch)
    at.sidebar.radio(key="page").set_value("Faithfulness").run()
    at.sidebar.selectbox(key="run").set_value("other").run()
    assert not at.exception, at.exception
    labels = [m.label for m in at.metric]
    assert "Spearman: score" in labels and "Spearman: atp" in labels
    assert len(at.get("plotly_chart")) == 4   # scatter, ig's path, faithfulness curves, contrasts
    assert "Integrated gradients' path" in at.get("plotly_chart")[1].proto.spec
    assert any("∫|dL/dα|" in c.value for c in at.caption)
    assert "Faithfulness curves" in at.get("plotly_chart")[2].proto.spec
    assert any("median item change" in c.value for c in at.caption)   # the robust ranking beside the scatter
    at.radio(key="faith_curve_mode").set_value("replace-top").run()
    assert not at.exception
    at.sidebar.selectbox(key="run").set_value("small").run()
    assert any("circuitq faithfulness --scores" in i.value for i in at.info)
