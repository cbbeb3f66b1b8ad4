"""Reliability, round 3 (issue 22): hostile names in every HTML and file name, concurrent writers,
real faults (a full tmpfs, a read-only bind mount, truncated and damaged files) and unclear
input. Each case ends in a correct result or one clear line with a nonzero exit: no traceback,
nothing lost, nothing written outside its folder. Real mounts need root; without it those cases
skip and the simulated ones below still run."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_dir, task_data, tiny_model
from circuitq.cli import main

HOSTILE_IMG = "<img src=x onerror=alert(1)>"
HOSTILE_SCRIPT = "</script><script>alert(2)</script>"


def _rows(path: Path, n: int = 12) -> None:
    words = "the quick brown fox jumps over the lazy dog".split()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps({"prompt": " ".join(words[: 2 + i % 6]), "completion": " " + " ".join(words[i % 4:])})
                              for i in range(n)) + "\n")


def _one_line_error(err: str) -> list[str]:
    """The error lines of a command's stderr (progress bars and notes aside); never a traceback."""
    assert "Traceback" not in err, err
    return [ln for ln in err.replace("\r", "\n").splitlines() if re.match(r"circuitq \S+: error: ", ln)]


# ---- injection and confinement ---------------------------------------------------------------
def test_report_escapes_hostile_task_names(tmp_path, tiny_dir):
    d, _ = tiny_dir
    task = tmp_path / HOSTILE_IMG / f"{HOSTILE_SCRIPT}.jsonl"      # '/' inside the name makes folders
    _rows(task, 16)
    out = tmp_path / "run"
    rc = main(["run", "--model", str(d), "--tasks", f"jsonl:{task}", "--bits", "3", "--no-transfer", "--baselines",
               "random", "--calib-samples", "4", "--calib-seq-len", "48", "--eval-samples", "4", "--eval-seq-len", "64",
               "--fraction", "0.02", "--group-size", "32", "--out", str(out)])
    assert rc == 0
    page = (out / "report.html").read_text()
    assert HOSTILE_IMG not in page and "<script>alert(2)" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page          # shown as text, not dropped


def test_every_html_writer_escapes(tmp_path):
    import plotly.graph_objects as go

    from circuitq.circuits.plots import write_report

    fig = go.Figure(go.Bar(name=HOSTILE_SCRIPT, x=[HOSTILE_IMG], y=[1]))
    fig.update_layout(title=HOSTILE_SCRIPT)
    write_report(tmp_path / "r.html", HOSTILE_IMG, [(HOSTILE_SCRIPT, [{HOSTILE_IMG: HOSTILE_SCRIPT}]), (HOSTILE_IMG, fig)],
                 {"task": HOSTILE_SCRIPT})
    page = (tmp_path / "r.html").read_text()
    assert HOSTILE_IMG not in page and "<script>alert(2)" not in page


def test_explorer_markdown_is_escaped():
    from circuitq.app.catalog import md

    for hostile in (HOSTILE_IMG, "[click](javascript:alert(1))", "![x](http://evil/p.png)", "**bold** $x^2$ `code`"):
        out = md(hostile)
        # every markdown/HTML control character is escaped, so nothing can open a tag, link or formula
        assert not re.search(r"(?<!\\)[<>\[\]()*`$!]", out), out
    assert md("line\nbreak") == "line break"


def test_job_files_never_leave_the_job_folder(tmp_path, tiny_dir):
    """A task name from a crafted score.json used to pick the eval file's path."""
    from circuitq.app.jobs import export_spec, run_spec
    from circuitq.config import CalibConfig, DataConfig, EvalConfig, QuantizeConfig, QuantizeJob
    from circuitq.model.arch import target_shapes
    from circuitq.saliency.masks import save_masks

    d, text = tiny_dir
    evil = tmp_path / "x" / "evil.jsonl"
    _rows(evil)
    hops = "/".join([".."] * len(tmp_path.parts))
    task = f"jsonl:/{hops}{evil}"                      # resolves to tmp_path/x/evil.jsonl
    shapes = target_shapes(tiny_model(vocab=120))
    save_masks(tmp_path / "m.safetensors", {k: torch.zeros(s, dtype=torch.bool) for k, s in shapes.items()}, {})
    out = tmp_path / "runs" / "r" / "models" / "job"
    job = QuantizeJob(model=str(d), task=f"text:{text}", data=DataConfig(),
                      calib=CalibConfig(samples=2, seq_len=32), quantize=QuantizeConfig(bits=4, group_size=32),
                      eval=EvalConfig(ppl_windows=1))
    run_spec(export_spec(str(d), tmp_path / "m.safetensors", out, job, [task], 4), tmp_path / "status.json")
    written = sorted(p for p in tmp_path.rglob("*.json") if "eval" in p.name)
    assert written and all(out in p.parents for p in written), written
    assert not any(p.name.startswith("evil") for p in (tmp_path / "x").iterdir() if p != evil)


def test_safe_names_and_confinement():
    from circuitq.artifacts import OutputNotWritable, inside, safe_name

    a, b = safe_name("jsonl:/../../etc/passwd"), safe_name("jsonl:/..-..-etc-passwd")
    assert "/" not in a and not a.startswith(".") and a != b
    assert safe_name("gsm8k") == "gsm8k"
    with pytest.raises(OutputNotWritable, match="outside"):
        inside("/tmp/job", "../escape.json")


# ---- data loss: concurrent writers -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["dir", "file"])
def test_an_output_created_meanwhile_is_never_replaced(tmp_path, kind):
    """Both writers pass the existence check at the start; the one that finishes second used to
    replace the first one's finished output."""
    from circuitq.artifacts import OutputExists, atomic_dir, atomic_file

    out = tmp_path / "export"
    writer = atomic_dir if kind == "dir" else atomic_file

    def put(tmp: Path, text: str) -> None:
        (tmp / "f").write_text(text) if kind == "dir" else tmp.write_text(text)

    with pytest.raises(OutputExists, match="created by another process"):
        with writer(out) as slow:                     # the 3-bit export starts ...
            put(slow, "3-bit")
            with writer(out) as fast:                 # ... the 4-bit one starts and finishes first
                put(fast, "4-bit")
    assert ((out / "f") if kind == "dir" else out).read_text() == "4-bit"
    assert not [p for p in tmp_path.iterdir() if p.name != "export"], "a temporary was left behind"
    with writer(out, overwrite=True) as tmp:          # with the flag it is replaced
        put(tmp, "new")
    assert ((out / "f") if kind == "dir" else out).read_text() == "new"


def test_two_runs_on_one_out_are_refused(tmp_path, tiny_dir, capsys):
    from circuitq.artifacts import exclusive

    d, _ = tiny_dir
    out = tmp_path / "run"
    with exclusive(out):                              # another run holds the folder
        rc = main(["run", "--model", str(d), "--tasks", "mmlu:philosophy", "--bits", "3", "--no-transfer",
                   "--baselines", "random", "--data-dir", str(task_data(tmp_path)), "--calib-samples", "3",
                   "--calib-seq-len", "48", "--eval-samples", "3", "--eval-seq-len", "64", "--group-size", "32",
                   "--out", str(out)])
    lines = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and f"pid {os.getpid()}" in lines[0] and "another circuitq process" in lines[0]
    assert not (out / "steps").exists()


# ---- real faults: a full disk and a read-only place ------------------------------------------
@contextlib.contextmanager
def _mount(target: Path, *opts: str):
    target.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", *opts, str(target)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount here ({e.__class__.__name__})")
    if r.returncode:
        pytest.skip(f"cannot mount here ({r.stderr.decode().strip()[:80]}): needs root")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    import shutil

    free = shutil.disk_usage(disk).free
    with (disk / "filler").open("ab") as fh:
        fh.write(b"\0" * max(free - leave, 0))


@pytest.mark.parametrize("command", ["quantize", "score", "eval", "run"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_dir, capsys, command):
    d, text = tiny_dir
    task = tmp_path / "t.jsonl"
    _rows(task, 24)
    with _mount(tmp_path / "disk", "-t", "tmpfs", "-o", "size=2m", "tmpfs") as disk:
        _fill(disk, 24 * 1024)
        out = disk / "out"
        common = ["--model", str(d)]
        argv = {"quantize": ["quantize", *common, "--bits", "4", "--group-size", "32", "--calib", f"text:{text}",
                             "--samples", "2", "--seq-len", "16", "--ppl-windows", "1", "--out", str(out)],
                "score": ["score", *common, "--task", f"jsonl:{task}", "--samples", "4", "--seq-len", "32", "--bits", "3",
                          "--method", "grad", "--out", str(out)],
                "eval": ["eval", *common, "--task", f"jsonl:{task}", "--limit", "4", "--out", str(out)],
                "run": ["run", *common, "--tasks", f"jsonl:{task}", "--bits", "3", "--no-transfer", "--baselines",
                        "random", "--calib-samples", "3", "--calib-seq-len", "48", "--eval-samples", "3",
                        "--eval-seq-len", "64", "--group-size", "32", "--out", str(out)]}[command]
        if command == "eval":
            _fill(disk, 0)
        rc = main(argv)
        lines = _one_line_error(capsys.readouterr().err)
        # a run estimates its disk before any work and refuses there; the others find out while writing
        needle = "free there" if command == "run" else "no space left on device"
        assert rc != 0 and len(lines) == 1 and needle in lines[0], lines
        left = sorted(p.name for p in disk.iterdir() if p.name != "filler")
        assert left in ([], ["out"]) if command == "run" else left == [], left
        if command == "run" and left:     # a run keeps its finished steps to resume from, nothing half-written
            assert not list((disk / "out").rglob(".*tmp-*"))


def test_out_of_space_inside_a_writer_names_the_output(tmp_path):
    """The same path without root: ENOSPC raised while writing (as the kernel or safetensors do)."""
    import errno

    from circuitq.artifacts import atomic_dir
    from circuitq.errors import OutOfSpace

    for exc in (OSError(errno.ENOSPC, "No space left on device"),
                RuntimeError("SafetensorError: Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                             "message: \"No space left on device\" })")):
        with pytest.raises(OutOfSpace, match=r"no space left on device while writing .*out \(needed about 5 MB, .* free there\)"):
            with atomic_dir(tmp_path / "out", need_bytes=5_000_000) as tmp:
                (tmp / "part").write_bytes(b"x" * 1000)
                raise exc
        assert list(tmp_path.iterdir()) == []


def test_run_on_a_read_only_out_is_refused_before_any_work(tmp_path, tiny_dir, capsys):
    d, _ = tiny_dir
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        ctx = _mount(ro, "--bind", "-o", "ro", str(ro))
    else:
        ro.chmod(0o500)
        ctx = contextlib.nullcontext(ro)
    with ctx:
        rc = main(["run", "--model", str(d), "--tasks", "mmlu:philosophy", "--data-dir", str(task_data(tmp_path)),
                   "--out", str(ro / "run")])
    ro.chmod(0o700)
    cap = capsys.readouterr()
    lines = _one_line_error(cap.err)
    assert rc == 2 and len(lines) == 1 and "writable" in lines[0]
    assert "evaluating" not in cap.out and "Hessians" not in cap.out


# ---- damaged files ---------------------------------------------------------------------------
def test_a_damaged_model_cache_is_converted_again(tmp_path, monkeypatch, capsys):
    from circuitq.model import loading

    monkeypatch.setenv("CIRCUITQ_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf, dest):   # stands in for the 40-second GGUF conversion: writes a model the same way
        calls.append(dest)
        tmp = dest.parent / ".tmp-x"
        tiny_model().save_pretrained(tmp)
        loading.write_manifest(tmp, "fake.gguf")
        if dest.exists():
            import shutil
            shutil.rmtree(dest)
        os.replace(tmp, dest)

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: Path("fake.gguf"))
    monkeypatch.setitem(loading.EMBEDDED, loading.DEFAULT_MODEL,
                        loading.Embedded(lambda: Path("fake.gguf"), "note"))
    d = loading.embedded_model_dir()
    assert len(calls) == 1 and loading.cache_damage(d) is None
    assert loading.embedded_model_dir() == d and len(calls) == 1            # a sound entry is reused
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])                 # truncated
    loading.embedded_model_dir()
    assert len(calls) == 2 and "truncated" in capsys.readouterr().out
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0xFF                                                         # same size, edited a second later
    mtime = w.stat().st_mtime_ns
    w.write_bytes(bytes(raw))
    os.utime(w, ns=(mtime + 10**9, mtime + 10**9))
    assert "checksum" in loading.cache_damage(d)
    w.unlink()                                                              # missing
    assert "missing" in loading.cache_damage(d)
    loading.embedded_model_dir()
    assert len(calls) == 3 and loading.cache_damage(d) is None
    raw = w.read_bytes()                                                    # copied (new mtime), not changed:
    os.utime(w, ns=(mtime + 2 * 10**9, mtime + 2 * 10**9))                  # hashed once, then trusted
    assert loading.cache_damage(d) is None
    assert json.loads((d / loading.MANIFEST).read_text())["files"]["model.safetensors"]["mtime_ns"] == mtime + 2 * 10**9


def test_truncated_weights_in_a_model_dir_are_one_line(tmp_path, tiny_dir, capsys):
    import shutil

    d, text = tiny_dir
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    rc = main(["eval", "--model", str(bad), "--task", f"text:{text}", "--limit", "2", "--out", str(tmp_path / "e.json")])
    lines = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and "damaged or incomplete" in lines[0]


def test_a_pickled_model_is_refused_recommending_safetensors(tmp_path, capsys):
    m = tiny_model()
    d = tmp_path / "pickled"
    m.config.save_pretrained(d)
    torch.save(m.state_dict(), d / "pytorch_model.bin")
    _rows(tmp_path / "t.jsonl")
    rc = main(["eval", "--model", str(d), "--task", f"jsonl:{tmp_path / 't.jsonl'}", "--out", str(tmp_path / "e.json")])
    lines = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and "safetensors" in lines[0] and "weights_only" not in lines[0]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from circuitq.model.arch import target_shapes
    from circuitq.saliency.masks import save_masks

    root = tmp_path_factory.mktemp("export")
    d, text = make_tiny_dir(root)
    g = torch.Generator().manual_seed(0)
    shapes = target_shapes(tiny_model(vocab=120))
    save_masks(root / "m.safetensors", {k: torch.rand(s, generator=g) < 0.02 for k, s in shapes.items()}, {})
    assert main(["quantize", "--model", str(d), "--mask", str(root / "m.safetensors"), "--bits", "4", "--group-size",
                 "32", "--calib", f"text:{text}", "--samples", "2", "--seq-len", "16", "--ppl-windows", "1",
                 "--out", str(root / "q")]) == 0
    return root / "q"


def _damage_export(src: Path, dest: Path, what: str) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    g = dest / "gptq"
    side = g / "circuitq_sparse" / "outliers.safetensors"
    if what == "missing sidecar":
        side.unlink()
        return
    f = side if what in ("sidecar shape", "sidecar index") else g / "model.safetensors"
    t = load_file(f)
    meta = {"format": "pt"}
    if f == side:
        from safetensors import safe_open
        with safe_open(str(side), "pt") as fh:
            meta = fh.metadata()
    name = "model.layers.0.self_attn.q_proj"
    if what == "sidecar shape":
        t[f"{name}.vals"] = torch.cat([t[f"{name}.vals"], t[f"{name}.vals"][:1]])
    elif what == "sidecar index":
        t[f"{name}.rows"] = t[f"{name}.rows"].clone()
        t[f"{name}.rows"][0] = 10_000
    elif what == "qweight shape":
        t[f"{name}.qweight"] = t[f"{name}.qweight"][:-1].contiguous()
    save_file(t, str(f), metadata=meta)


@pytest.mark.parametrize("what,needle", [
    ("sidecar shape", "rows, cols and vals of one length"),
    ("sidecar index", "outliers.safetensors: the 16-bit sidecar of model.layers.0.self_attn.q_proj has an index outside"),
    ("qweight shape", "q_proj.qweight has shape"),
    ("missing sidecar", "outliers.safetensors is missing"),
])
def test_a_damaged_export_is_refused_naming_file_and_tensor(tmp_path, export_dir, capsys, what, needle):
    bad = tmp_path / "bad"
    _damage_export(export_dir, bad, what)
    rc = main(["eval", "--model", str(bad / "gptq"), "--task", "text:" + str(export_dir.parent / "corpus.txt"),
               "--limit", "2", "--out", str(tmp_path / "e.json")])
    lines = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "e.json").exists()


def test_the_sound_export_still_loads(export_dir):
    from circuitq.model.loading import load_model

    packed, plain = load_model(str(export_dir / "gptq")).model, load_model(str(export_dir / "hf")).model
    for (n, a), (_, b) in zip(packed.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_deeply_nested_run_json_is_listed_as_unreadable(tmp_path):
    from circuitq.app.catalog import scan_runs

    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "fine").mkdir()
    (tmp_path / "fine" / "run.json").write_text(json.dumps({"format": "circuitq.run"}))
    runs = {r.name: r for r in scan_runs(tmp_path)}
    assert runs["deep"].kind == "unreadable" and "nested too deeply" in runs["deep"].error
    assert runs["fine"].ok


# ---- unclear input ---------------------------------------------------------------------------
def test_rows_with_an_empty_completion_are_refused_by_line(tmp_path, tiny_dir, capsys):
    d, _ = tiny_dir
    task = tmp_path / "t.jsonl"
    _rows(task, 8)
    with task.open("a") as fh:
        fh.write("\n" + json.dumps({"prompt": "", "completion": ""}) + "\n")
    for argv in (["eval", "--model", str(d), "--task", f"jsonl:{task}", "--out", str(tmp_path / "e.json")],
                 ["score", "--model", str(d), "--task", f"jsonl:{task}", "--samples", "4", "--seq-len", "32",
                  "--out", str(tmp_path / "s")]):
        rc = main(argv)
        lines = _one_line_error(capsys.readouterr().err)
        assert rc == 2 and len(lines) == 1 and "t.jsonl: line 10 has an empty \"completion\"" in lines[0], lines


def test_bad_jsonl_lines_are_named_by_their_real_line(tmp_path):
    from circuitq.data.readers import DataError, read_gsm8k, read_prompt_completion

    data = task_data(tmp_path)
    f = data / "gsm8k" / "train.jsonl"
    lines = f.read_text().splitlines()
    lines[2] = '{"question": "unterminated'
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:3: not valid JSON \(Unterminated string"):
        read_gsm8k(data)
    lines[2] = json.dumps({"question": ["a", "list"], "answer": "#### 1"})
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:3: \"question\" must be a string, got list"):
        read_gsm8k(data)
    j = tmp_path / "t.jsonl"
    j.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + json.dumps({"prompt": [1], "completion": "b"}))
    with pytest.raises(DataError, match=r"t\.jsonl:3: \"prompt\" must be a string, got list"):
        read_prompt_completion(j)


def test_an_empty_mmlu_file_is_named(tmp_path, capsys):
    from circuitq.data.readers import read_mmlu

    data = task_data(tmp_path)
    (data / "mmlu" / "val" / "anatomy_val.csv").write_text("")
    rows = read_mmlu(data, "val")
    assert {r["subject"] for r in rows} == {"high_school_physics", "philosophy"}
    assert "anatomy_val.csv" in capsys.readouterr().err


def test_float_indices_in_a_mask_are_refused(tmp_path):
    from safetensors.torch import save_file

    from circuitq.saliency.masks import MaskError, load_masks, open_masks

    p = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.tensor([0.0, 2.7, 5.5])}, str(p),
              metadata={"format": "circuitq.mask", "encoding": "indices", "shapes": json.dumps({"a.weight": [4, 4]})})
    for read in (lambda: load_masks(p), lambda: open_masks(p)["a.weight"]):
        with pytest.raises(MaskError, match="stored as float32.*integer"):
            read()


@pytest.mark.parametrize("target", ["40", "nan", "1.5"])
def test_mask_target_bits_out_of_range_names_the_flag(tmp_path, tiny_dir, capsys, target):
    from test_score import _score, _task

    d, _ = tiny_dir
    assert _score(d, _task(tmp_path), tmp_path / "s", "--method", "grad") == 0
    capsys.readouterr()
    rc = main(["mask", "--scores", str(tmp_path / "s"), "--target-bits", target, "--out", str(tmp_path / "m.safetensors")])
    lines = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and "--target-bits must be between" in lines[0] and "and 16" in lines[0]
    assert not (tmp_path / "m.safetensors").exists()


def test_readme_names_only_what_exists():
    """Every dotted ``circuitq.x.y`` the README names resolves (it named ``circuitq.masks.load_masks``)."""
    import importlib

    root = Path(__file__).resolve().parent.parent
    text = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    names = sorted(set(re.findall(r"`(circuitq(?:\.[A-Za-z_]\w*)+)", text)))
    assert "circuitq.load_masks" in names
    for dotted in names:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                assert hasattr(obj, attr), f"README names {dotted}, which does not exist"
                obj = getattr(obj, attr)
            break


# ---- one error type (issue 24) -----------------------------------------------------------------
def test_every_domain_error_is_a_circuitq_error():
    from circuitq.app.catalog import PathOutsideRuns
    from circuitq.artifacts import OutputExists, OutputNotWritable
    from circuitq.circuits.compare import CompareError
    from circuitq.config import ConfigError
    from circuitq.data.readers import DataError
    from circuitq.errors import CircuitqError, UsageError
    from circuitq.evals import TokenizerMismatch
    from circuitq.model.arch import UnsupportedArchitecture
    from circuitq.model.loading import ModelLoadError
    from circuitq.model.packed import ExportError
    from circuitq.quant.gptq import HessianError
    from circuitq.saliency.masks import MaskError

    for cls in (PathOutsideRuns, OutputExists, OutputNotWritable, CompareError, ConfigError, DataError, UsageError,
                TokenizerMismatch, UnsupportedArchitecture, ModelLoadError, ExportError, HessianError, MaskError):
        assert issubclass(cls, CircuitqError), cls


def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(monkeypatch, capsys):
    import circuitq.cli.commands as C
    from circuitq.errors import UsageError

    def buggy(a):
        return {}["missing"]          # a plain bug

    def refused(a):
        raise UsageError("--thing must be positive, got -1")

    for fn, rc_want, traceback_shown in ((buggy, 1, True), (refused, 2, False)):
        monkeypatch.setattr(C, "cmd_mask", fn)
        rc = main(["mask", "--scores", "x", "--out", "y"])
        err = capsys.readouterr().err
        assert rc == rc_want and ("Traceback" in err) is traceback_shown, err
        lines = [ln for ln in err.splitlines() if ln.startswith("circuitq mask: error: ")]
        assert len(lines) == 1 and (("this is a bug in circuitq" in lines[0]) is traceback_shown), lines


def test_flags_are_never_abbreviated_and_the_equals_form_counts_as_given():
    from circuitq.cli.commands import build_parser
    from circuitq.cli.flags import given_flags

    with pytest.raises(SystemExit):
        build_parser().parse_args(["faithfulness", "--scores", "s", "--bit", "3", "--out", "o"])
    assert "--bits" in given_flags(["faithfulness", "--bits=3"]) and "--bits" in given_flags(["--bits", "3"])


# ---- a package that installs like one (issue 24) -----------------------------------------------
def test_every_import_the_core_needs_is_a_dependency():
    """Third-party imports outside the optional parts (the explorer, figures, the hub fallback)
    are declared dependencies in pyproject.toml; the optional ones belong to an extra."""
    import ast
    import sys
    import tomllib

    from circuitq.errors import EXTRAS

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ ;\[]", d)[0].lower().replace("-", "_") for d in project["dependencies"]}
    optional = {m for mods in EXTRAS.values() for m in mods} | {"datasets"}   # datasets: the hub fallback only
    extras = {re.split(r"[<>=!~ ;\[]", d)[0].lower().replace("-", "_")
              for ds in project["optional-dependencies"].values() for d in ds}
    used = set()
    for f in (root / "circuitq").rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module] if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module else []
            used |= {x.split(".")[0] for x in names}
    third = used - set(sys.stdlib_module_names) - {"circuitq"}
    assert "transformer_lens" in declared
    assert third - optional <= declared, third - optional - declared
    assert (optional - {"datasets"}) <= extras


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "plotly" else real(name, *a))
    rc = main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r.html")])
    lines = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and lines == ["circuitq compare: error: circuitq compare (an HTML report with figures) needs "
                                 "plotly: pip install 'circuitq[plots]'"]


def test_every_python_example_in_the_docs_parses():
    """The README's, docs/'s and the API docstring's ```python blocks are valid Python (the API's
    example did not parse: a comment swallowed a closing parenthesis)."""
    import ast

    root = Path(__file__).resolve().parent.parent
    files = [root / "README.md", root / "circuitq" / "api.py", *sorted((root / "docs").glob("*.md"))]
    blocks = [(f.name, b) for f in files for b in re.findall(r"```python\n(.*?)```", f.read_text(), re.S)]
    assert blocks
    for name, code in blocks:
        try:
            ast.parse(code)
        except SyntaxError as e:
            pytest.fail(f"{name}: {e}")


# ---- docs a newcomer can follow (issue 24) -----------------------------------------------------
def test_the_cli_reference_is_generated_from_the_parsers():
    from circuitq.cli.reference import markdown

    page = Path(__file__).resolve().parent.parent / "docs" / "cli-reference.md"
    assert page.read_text() == markdown(), "regenerate: python -m circuitq.cli.reference > docs/cli-reference.md"


def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    import shutil
    import sys

    exe = Path(sys.executable).with_name("mkdocs")
    if not exe.exists() and shutil.which("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install 'circuitq[dev]')")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([str(exe if exe.exists() else "mkdocs"), "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "site" / "index.html").exists() and (tmp_path / "site" / "cli-reference" / "index.html").exists()


def test_the_front_page_stays_a_front_page():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for cmd in ("bash setup.sh && .venv/bin/circuitq run --out runs/main", "bash setup.sh && .venv/bin/python -m pytest -q"):
        assert cmd in text
    for link in re.findall(r"\]\((docs/[^)]+|analyses/[^)]+)\)", text):
        assert (Path(__file__).resolve().parent.parent / link).exists(), link
