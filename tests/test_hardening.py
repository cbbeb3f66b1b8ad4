"""Hardening: GPTQ v1 zero points as the runtimes read them, outputs that never leak or get
owner-only modes, refusals that name the problem and the fix."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import tiny_model


# ---- GPTQ v1 zero points: an independent reference of the runtimes' word-level convention ----
def _ref_write_v1(zeros: list[list[int]], bits: int) -> list[list[int]]:
    """AutoGPTQ/gptqmodel v1: pack the zero points, then subtract 0x..111 from the whole word."""
    per = 32 // bits
    ones = int("".join(["0" * (bits - 1) + "1"] * per), 2)
    out = []
    for row in zeros:
        words = []
        for w in range(len(row) // per):
            v2 = 0
            for j, z in enumerate(row[w * per:(w + 1) * per]):
                v2 += z << (bits * j)
            v1 = (v2 - ones) % 2 ** 32
            words.append(v1 - 2 ** 32 if v1 >= 2 ** 31 else v1)
        out.append(words)
    return out


def _ref_read_v1(qzeros: list[list[int]], bits: int) -> list[list[int]]:
    """gptqmodel's v1 -> v2 conversion (add 0x..111 to the word), then unpack the fields."""
    per, maxq = 32 // bits, 2 ** bits - 1
    ones = int("".join(["0" * (bits - 1) + "1"] * per), 2)
    out = []
    for row in qzeros:
        vals = []
        for word in row:
            v2 = (word + ones) % 2 ** 32
            vals += [(v2 >> (bits * j)) & maxq for j in range(per)]
        out.append(vals)
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_point_zero_round_trips_the_runtimes_v1_convention(bits):
    from circuitq.model.packed import pack_zeros_v1, unpack_zeros_v1

    maxq = 2 ** bits - 1
    g = torch.Generator().manual_seed(bits)
    zeros = torch.randint(0, maxq + 1, (3, 64), generator=g)
    zeros[:, ::3] = 0                                     # zero points of 0 next to others
    if bits == 4:
        zeros[0, :8] = torch.tensor([0, 9, 12, 0, 14, 1, 0, 13])
    z = zeros.to(torch.uint8)
    ours = pack_zeros_v1(z, bits)
    assert ours.dtype == torch.int32 and ours.shape == (3, 64 * bits // 32)
    assert ours.tolist() == _ref_write_v1(zeros.tolist(), bits)          # written as the runtimes write
    assert _ref_read_v1(ours.tolist(), bits) == zeros.tolist()           # read back by the runtimes
    theirs = torch.tensor(_ref_write_v1(zeros.tolist(), bits), dtype=torch.int32)
    assert torch.equal(unpack_zeros_v1(theirs, bits), z)                  # and theirs read by circuitq


def test_three_bit_zero_points_round_trip():
    from circuitq.model.packed import pack_zeros_v1, unpack_zeros_v1

    z = torch.randint(0, 8, (2, 64), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    z[:, ::2] = 0
    assert torch.equal(unpack_zeros_v1(pack_zeros_v1(z, 3), 3), z)


# ---- outputs -------------------------------------------------------------------------------------
def test_outputs_follow_the_umask(tmp_path):
    from circuitq.artifacts import atomic_dir, write_json

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_compact_json_puts_number_lists_on_one_line_and_keeps_the_value(tmp_path):
    """Only lists of numbers fold; a string that looks like one, and nested lists' layout, stay."""
    import json

    from circuitq.artifacts import write_json

    obj = {"v": [1, -2.5e-05, None, 3.0], "s": "x [\n 1,\n 2\n]", "m": [[1, 2], [3]], "e": [], "d": [{"a": 1}]}
    write_json(tmp_path / "c.json", obj, compact_lists=True)
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == obj
    assert '"v": [1, -2.5e-05, null, 3.0]' in text and '\n    [1, 2],\n    [3]\n' in text
    write_json(tmp_path / "p.json", obj)
    assert json.loads((tmp_path / "p.json").read_text()) == obj and '"v": [\n' in (tmp_path / "p.json").read_text()


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_writer(tmp_path):
    import subprocess
    import sys

    from circuitq.artifacts import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-abc123"
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"0" * 1000)
    mine = tmp_path / f".out.tmp-{os.getpid()}-live"     # a live writer's folder is left alone
    mine.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("ok")
    assert not stale.exists() and mine.exists() and (tmp_path / "out" / "f").read_text() == "ok"


def test_unwritable_out_is_refused_before_any_work(tmp_path):
    from circuitq.artifacts import OutputNotWritable, check_writable

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        with pytest.raises(OutputNotWritable, match="writable folder"):
            check_writable(ro / "out", False)
    finally:
        ro.chmod(0o700)


def test_export_refuses_nan_in_an_untargeted_weight(tmp_path):
    from transformers import AutoTokenizer  # noqa: F401

    from circuitq.config import QuantizeConfig
    from circuitq.pipeline.stages import export, quantize
    from circuitq.model.packed import ExportError

    model = tiny_model(seed=4)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    q, res = quantize(model, QuantizeConfig(bits=4, group_size=32), ids, progress=False)
    with torch.no_grad():
        q.model.embed_tokens.weight[3, 5] = float("nan")
    with pytest.raises(ExportError, match="embed_tokens"):
        export(tmp_path / "out", q, None, res, {"bits": 4, "group_size": 32})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_app_passes_the_port_only_when_asked():
    from circuitq.cli.commands import app_command

    assert "--server.port" not in app_command("e.py", "runs", "localhost", None)
    cmd = app_command("e.py", "runs", "localhost", 9000)
    assert cmd[cmd.index("--server.port") + 1] == "9000" and cmd[-2:] == ["--runs", "runs"]


def test_resume_never_replaces_a_finished_out(tmp_path, tiny_dir, capsys):
    """`score --resume` on a finished --out without a checkpoint used to replace it (exit 0)."""
    from test_score import _score, _task

    from circuitq.saliency.files import load_scores

    d, _ = tiny_dir
    task = _task(tmp_path)
    assert _score(d, task, tmp_path / "s", "--method", "grad") == 0
    before = load_scores(tmp_path / "s")["scores"]
    assert _score(d, task, tmp_path / "s", "--method", "magnitude", "--resume") == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    after = load_scores(tmp_path / "s")
    assert after["meta"]["method"] == "grad"
    assert all(torch.equal(before[k], after["scores"][k]) for k in before)


def test_resume_under_another_model_names_the_checkpoint(tmp_path, tiny_dir, capsys):
    from conftest import make_tiny_dir
    from test_score import _score, _task

    from circuitq.saliency.files import save_stats

    d, _ = tiny_dir
    other, _ = make_tiny_dir(tmp_path / "other", seed=7)
    task = _task(tmp_path)
    ckpt = tmp_path / ".s.ckpt-rank0.safetensors"
    # a checkpoint made under the first model ...
    assert _score(d, task, tmp_path / "s0", "--method", "grad") == 0
    from circuitq.saliency.files import load_stats

    st, meta = load_stats(tmp_path / "s0" / "stats.safetensors")
    save_stats(ckpt, st, {**meta, "done": 4})
    # ... is refused under the second, before any scoring, naming the checkpoint
    assert _score(other, task, tmp_path / "s", "--method", "grad", "--resume") == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "model_fingerprint" in err and not (tmp_path / "s").exists()


def test_bad_task_files_are_named(tmp_path):
    from circuitq.data.readers import DataError, read_prompt_completion, read_text_corpus

    with pytest.raises(DataError, match="is a folder"):
        read_text_corpus(tmp_path)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(bad byte at offset 3\)"):
        read_text_corpus(bad)
    j = tmp_path / "t.jsonl"
    j.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: \"prompt\" must be a string, got int"):
        read_prompt_completion(j)


def test_pickle_refusal_never_suggests_unsafe_loading(tmp_path):
    import pickle

    from circuitq.saliency.masks import MaskError, load_masks

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"x": Boom()}, protocol=2))
    with pytest.raises(MaskError) as e:
        load_masks(p)
    assert "weights_only" not in str(e.value) and "never unpickles" in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_absurd_index_mask_shapes_are_refused_without_allocating(tmp_path):
    import json

    from safetensors.torch import save_file

    from circuitq.saliency.masks import MaskError, load_masks

    for shape in ([1 << 20, 1 << 20], [-3, 4], ["a"], [2.5, 3]):
        p = tmp_path / "m.safetensors"
        save_file({"model.layers.0.mlp.up_proj.weight": torch.tensor([0, 1], dtype=torch.int32)}, str(p),
                  {"encoding": "indices", "shapes": json.dumps({"model.layers.0.mlp.up_proj.weight": shape})})
        with pytest.raises(MaskError, match="damaged"):
            load_masks(p)


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--model", "x", "--limit", "0", "--out", "o"], "--limit"),
    (["run", "--calib-samples", "0"], "--calib-samples"),
    (["score", "--samples", "-1", "--out", "o"], "--samples"),
    (["quantize", "--seq-len", "1", "--out", "o"], "--seq-len"),
    (["run", "--calib-tokens", "-5"], "--calib-tokens"),
])
def test_out_of_range_values_name_the_flag_typed(argv, flag, capsys):
    from circuitq.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err
