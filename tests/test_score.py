import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitq.cli import main
from circuitq.saliency.masks import load_masks
from circuitq.saliency.files import load_scores


def _task(tmp_path, n=12):
    words = "the quick brown fox jumps over the lazy dog".split()
    p = tmp_path / "task.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": " ".join(words[: 2 + i % 6]), "completion": " " + " ".join(words[i % 4:])})
                           for i in range(2 * n)))
    return p


def _score(d, task, out, *extra):
    return main(["score", "--model", str(d), "--task", f"jsonl:{task}", "--samples", "12", "--seq-len", "32",
                 "--batch-size", "4", "--bits", "3", "--out", str(out), *extra])


@pytest.mark.parametrize("method", ["tacq", "spqr", "wanda"])
def test_score_then_mask_cli(tmp_path, tiny_dir, method):
    d, _ = tiny_dir
    task = _task(tmp_path)
    assert _score(d, task, tmp_path / "s", "--method", method) == 0
    sf = load_scores(tmp_path / "s")
    meta = sf["meta"]
    assert meta["method"] == method and meta["n_samples"] == 12 and meta["task"].startswith("jsonl:")
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in sf["scores"].values())
    assert main(["mask", "--scores", str(tmp_path / "s"), "--fraction", "0.01", "--out", str(tmp_path / "m.safetensors")]) == 0
    mf = load_masks(tmp_path / "m.safetensors")
    total = sum(m.numel() for m in mf.masks.values())
    assert sum(int(m.sum()) for m in mf.masks.values()) == int(0.01 * total)
    assert json.loads(mf.metadata["bits"]) == 3 and mf.metadata["method"] == method


def test_resume_after_interruption_equals_uninterrupted(tmp_path, tiny_dir, monkeypatch):
    import circuitq.pipeline.score as score   # the driver that calls save_stats

    d, _ = tiny_dir
    task = _task(tmp_path)
    assert _score(d, task, tmp_path / "full", "--method", "grad") == 0
    real_save = score.save_stats
    calls = {"n": 0}

    def save_then_die(path, st, meta):
        real_save(path, st, meta)
        if ".ckpt-" in path.name:
            calls["n"] += 1
            raise KeyboardInterrupt

    monkeypatch.setattr(score, "save_stats", save_then_die)
    assert _score(d, task, tmp_path / "cut", "--method", "grad", "--checkpoint-every", "4") == 130
    assert calls["n"] == 1 and not (tmp_path / "cut").exists()
    monkeypatch.setattr(score, "save_stats", real_save)
    assert _score(d, task, tmp_path / "cut", "--method", "grad", "--checkpoint-every", "4", "--resume") == 0
    a, b = load_scores(tmp_path / "full"), load_scores(tmp_path / "cut")
    assert b["meta"]["n_samples"] == 12
    for n in a["scores"]:
        assert torch.allclose(a["scores"][n], b["scores"][n], rtol=1e-6, atol=1e-9), n
    assert not list(tmp_path.glob(".cut.ckpt-*"))


def test_two_process_gloo_equals_one_process(tmp_path, tiny_dir):
    d, _ = tiny_dir
    task = _task(tmp_path)
    assert _score(d, task, tmp_path / "one", "--method", "tacq") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "circuitq", "score", "--model", str(d), "--task", f"jsonl:{task}", "--samples", "12",
           "--seq-len", "32", "--batch-size", "4", "--bits", "3", "--method", "tacq", "--out", str(tmp_path / "two")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_scores(tmp_path / "one"), load_scores(tmp_path / "two")
    assert b["meta"]["world_size"] == 2 and b["meta"]["n_samples"] == 12
    for n in a["scores"]:
        assert torch.allclose(a["scores"][n], b["scores"][n], rtol=1e-4, atol=1e-8), n


def test_bad_task_inputs_are_clear(tmp_path, tiny_dir, capsys):
    d, _ = tiny_dir
    for task, needle in (("mmlu:not_a_subject", "unknown MMLU subject"), ("jsonl:/nope.jsonl", "not found"),
                         ("wiki", "unknown task")):
        rc = main(["score", "--model", str(d), "--task", task, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, err
