"""Every ```python example in the README, docs/ and the API docstring runs, as written.

The default suite runs them on a tiny random Llama with a tiny task data set (``circuitq.load_model``
returns the tiny model; nothing else is changed); ``-m real_model`` runs them on the real default
model and the data in ``CIRCUITQ_DATA_DIR``. An example that imports a package this environment lacks
(``gptqmodel``, installed in its own venv) is reported as skipped, by name."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from conftest import make_tiny_dir

ROOT = Path(__file__).resolve().parents[1]


def examples() -> list[tuple[str, str]]:
    files = [ROOT / "README.md", ROOT / "circuitq" / "api.py", *sorted((ROOT / "docs").glob("*.md"))]
    out = []
    for f in files:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", f.read_text(), re.S)):
            out.append((f"{f.relative_to(ROOT)}#{i + 1}", code))
    return out


def missing_imports(code: str) -> list[str]:
    mods = set()
    for n in ast.walk(ast.parse(code)):
        if isinstance(n, ast.Import):
            mods |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            mods.add(n.module.split(".")[0])
    return sorted(m for m in mods if importlib.util.find_spec(m) is None)


def gsm8k_data(root: Path, n: int = 80) -> Path:
    d = root / "data" / "gsm8k"
    d.mkdir(parents=True)
    rows = [json.dumps({"question": f"the fox has {i} dogs and {i + 3} foxes. how many?",
                        "answer": f"the fox has {i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"}) for i in range(n)]
    (d / "train.jsonl").write_text("\n".join(rows) + "\n")
    return d.parent


def run_examples(tmp_path, monkeypatch) -> list[str]:
    ran = []
    for name, code in examples():
        lacking = missing_imports(code)
        if lacking:
            print(f"skipped {name}: needs {', '.join(lacking)}")
            continue
        work = tmp_path / re.sub(r"\W", "_", name)
        work.mkdir()
        monkeypatch.chdir(work)
        try:
            exec(compile(code, name, "exec"), {"__name__": "__docs_example__"})
        except Exception as e:  # noqa: BLE001 - report which example failed, with its error
            raise AssertionError(f"the example {name} fails: {e.__class__.__name__}: {e}") from e
        ran.append(name)
    return ran


def test_every_docs_example_runs_on_a_tiny_model(tmp_path, monkeypatch):
    import circuitq.api as api

    tiny, _ = make_tiny_dir(tmp_path)
    real_load = api.load_model
    monkeypatch.setattr(api, "load_model", lambda *a, **k: real_load(str(tiny)))
    monkeypatch.setenv("CIRCUITQ_DATA_DIR", str(gsm8k_data(tmp_path)))
    ran = run_examples(tmp_path, monkeypatch)
    assert {"README.md#1", "docs/api.md#1", "circuitq/api.py#1"} <= set(ran), ran
    assert (tmp_path / "docs_api_md_1" / "out" / "gsm8k-3bit" / "gptq").is_dir()   # its export was written


@pytest.mark.real_model
def test_every_docs_example_runs_on_the_real_model(tmp_path, monkeypatch):
    if not os.environ.get("CIRCUITQ_DATA_DIR") and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("needs the task data (CIRCUITQ_DATA_DIR)")
    monkeypatch.setenv("CIRCUITQ_DATA_DIR", os.environ.get("CIRCUITQ_DATA_DIR") or str(ROOT.parent / "shared" / "data"))
    ran = run_examples(tmp_path, monkeypatch)
    assert {"README.md#1", "docs/api.md#1"} <= set(ran), ran
