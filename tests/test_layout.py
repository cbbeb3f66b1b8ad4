"""The package's floors: every import points to a module on its own row of ``docs/layout.md``'s
table or above it, and every module is in the table (so the table stays the map of the code)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_rows() -> list[list[str]]:
    rows = []
    for line in (ROOT / "docs" / "layout.md").read_text().splitlines():
        m = re.match(r"\|.*\|\s*`(circuitq/[^`]+\.py)`", line)
        if m:
            b = re.fullmatch(r"(.*)\{(.*)\}(.*)", m.group(1))
            paths = [b.group(1) + x + b.group(3) for x in b.group(2).split(",")] if b else [m.group(1)]
            rows.append([p.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for p in paths])
    return rows


def module_name(f: Path) -> str:
    return str(f.relative_to(ROOT)).removesuffix(".py").replace("/", ".").removesuffix(".__init__")


def circuitq_imports(tree: ast.AST, rank: dict[str, int]):
    """``(target module, line)`` of every import of a circuitq module, anywhere in the file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("circuitq"):
            names = [a.name for a in node.names if not (node.module == "circuitq" and a.name == "__version__")]
            if not names:
                continue    # the version string at the package root is data, not a floor
            cands = [f"{node.module}.{n}" for n in names] + [node.module]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names if a.name.startswith("circuitq")]
        else:
            continue
        for c in cands:
            if c in rank:
                yield c, node.lineno
                break


def test_every_module_is_on_a_row_and_imports_point_up_the_table():
    rows = table_rows()
    rank = {m: i for i, mods in enumerate(rows) for m in mods}
    rank["circuitq"] = len(rows)          # the package's lazy API entry sits on top
    rank["circuitq.__main__"] = len(rows)
    for init in (ROOT / "circuitq").glob("*/__init__.py"):     # empty package markers import nothing
        rank.setdefault(module_name(init), -1)
    assert len(rank) > 30, "the layout table was not found"
    files = sorted((ROOT / "circuitq").rglob("*.py"))
    missing = [module_name(f) for f in files if module_name(f) not in rank]
    hollow = [module_name(f) for f in files if rank.get(module_name(f)) == -1
              and any(not isinstance(n, ast.Expr) for n in ast.parse(f.read_text()).body)]
    assert not hollow, f"package __init__ files with code but no row in docs/layout.md: {hollow}"
    assert not missing, f"modules not in docs/layout.md's table: {missing}"
    upward = []
    for f in files:
        src = module_name(f)
        if src not in rank:
            continue
        for target, line in circuitq_imports(ast.parse(f.read_text()), rank):
            if rank[target] > rank[src]:
                upward.append(f"{f.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "imports pointing down the table (upwards in the floors): " + "; ".join(upward)


def test_the_checker_sees_an_upward_import():
    rank = {"circuitq.errors": 0, "circuitq.pipeline.run": 5}
    tree = ast.parse("def f():\n    from circuitq.pipeline.run import run\n")
    assert list(circuitq_imports(tree, rank)) == [("circuitq.pipeline.run", 2)]


def test_the_package_lints_clean():
    """No undefined or unused names, every import at the top and sorted (ruff, configured in
    pyproject.toml; the CLI's command bodies and the optional extras import lazily, each marked)."""
    import shutil
    import subprocess
    import sys

    import pytest

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    r = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", "circuitq"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


LAZY_FILES = {"circuitq/cli/commands.py", "circuitq/__init__.py"}   # command bodies; the API on first use
OPTIONAL = ("plotly", "matplotlib", "streamlit", "datasets", "kaleido")


def test_imports_sit_at_the_top_except_the_deliberate_lazy_ones():
    inside = []
    for f in sorted((ROOT / "circuitq").rglob("*.py")):
        rel = str(f.relative_to(ROOT))
        if rel in LAZY_FILES:
            continue
        for fn in ast.walk(ast.parse(f.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, (ast.Import, ast.ImportFrom)):
                        mod = n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
                        if (mod or "").split(".")[0] not in OPTIONAL:
                            inside.append(f"{rel}:{n.lineno} {mod}")
    assert not inside, f"imports inside functions (move them to the top): {sorted(set(inside))}"
