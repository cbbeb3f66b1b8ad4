import json
import subprocess
import sys

import pytest
import torch

from circuitq.cli import main
from circuitq.saliency.masks import MaskError, load_masks, save_masks, validate_masks
from circuitq.quant.plan import PrecisionPlan
from circuitq.model.arch import target_shapes
from conftest import tiny_model


def test_mask_roundtrip_with_metadata(tmp_path):
    m = {"model.layers.0.mlp.up_proj.weight": torch.rand(4, 8) < 0.3}
    save_masks(tmp_path / "m.safetensors", m, {"task": "mmlu", "fraction": 0.0035})
    mf = load_masks(tmp_path / "m.safetensors")
    assert torch.equal(mf.masks["model.layers.0.mlp.up_proj.weight"], m["model.layers.0.mlp.up_proj.weight"])
    assert mf.metadata["task"] == "mmlu" and json.loads(mf.metadata["fraction"]) == 0.0035
    with pytest.raises(FileExistsError):
        save_masks(tmp_path / "m.safetensors", m, {})


def test_tacq_torch_format_is_read_without_unpickling(tmp_path):
    m = {"model.layers.0.mlp.up_proj": torch.rand(4, 8) < 0.3}  # module name, no .weight
    torch.save(m, tmp_path / "tacq.pt")
    mf = load_masks(tmp_path / "tacq.pt")
    assert list(mf.masks) == ["model.layers.0.mlp.up_proj.weight"] and mf.metadata["format"] == "tacq-torch"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MaskError, match="never unpickles"):
        load_masks(tmp_path / "evil.pt")


def test_mismatched_mask_lists_first_mismatches():
    shapes = target_shapes(tiny_model())
    bad = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3, dtype=torch.bool),
           "model.layers.9.mlp.nope.weight": torch.zeros(1, 1, dtype=torch.bool)}
    with pytest.raises(MaskError) as e:
        validate_masks(bad, shapes)
    assert "model.layers.9.mlp.nope.weight" in str(e.value) and "(3, 3)" in str(e.value)
    missing = validate_masks({}, shapes)
    assert len(missing) == len(shapes)


def test_plan_parse_errors():
    assert PrecisionPlan.parse(3, [".*down_proj.weight=4"]).bits_for("model.layers.0.mlp.down_proj.weight") == 4
    with pytest.raises(ValueError, match="PATTERN=BITS"):
        PrecisionPlan.parse(3, ["down_proj"])
    with pytest.raises(ValueError, match="unsupported bits 5"):
        PrecisionPlan.parse(3, ["x=5"])


def test_cli_quantize_end_to_end_with_mask(tmp_path, tiny_dir, capsys):
    d, text = tiny_dir
    shapes = target_shapes(tiny_model())
    g = torch.Generator().manual_seed(0)
    save_masks(tmp_path / "mask.safetensors", {k: torch.rand(s, generator=g) < 0.01 for k, s in shapes.items()}, {"task": "t"})
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(d), "--mask", str(tmp_path / "mask.safetensors"), "--bits", "4",
               "--group-size", "32", "--calib", f"text:{text}", "--samples", "4", "--seq-len", "16",
               "--ppl-windows", "2", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "circuitq.json").read_text())
    assert doc["metadata"]["bits"] == 4 and doc["metadata"]["mask_metadata"]["task"] == "t"
    assert doc["bits"]["nnz_16bit"] > 0 and 4 < doc["bits"]["average_bits"] < 5
    assert doc["heldout_perplexity"]["quantized"] > 0
    assert (out / "hf" / "tokenizer.json").exists() and (out / "gptq" / "circuitq_sparse" / "outliers.safetensors").exists()
    # refused without --overwrite: a clear message and exit 2, nothing touched
    rc = main(["quantize", "--model", str(d), "--bits", "4", "--calib", f"text:{text}", "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--group-size", "48"], "does not divide"),
    (["--mask", "MISSING"], "mask file not found"),
    (["--calib", "text:/nonexistent.txt"], "not found"),
    (["--plan", "oops"], "PATTERN=BITS"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, tiny_dir, capsys, args, needle):
    d, text = tiny_dir
    base = ["quantize", "--model", str(d), "--calib", f"text:{text}", "--samples", "2", "--seq-len", "16",
            "--out", str(tmp_path / "o")]
    rc = main(base + args)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_unknown_model_dir_is_clear(tmp_path, capsys):
    rc = main(["quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
