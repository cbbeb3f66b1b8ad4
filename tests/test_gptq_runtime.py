"""Exports loaded by a real GPTQ runtime: gptqmodel (its CPU torch kernel) in its own venv.

Marked ``real_tool``: ``bash analyses/setup_gptqmodel_env.sh`` first, then
``.venv/bin/python -m pytest -m real_tool``. Skips without that venv (or
``CIRCUITQ_GPTQMODEL_PYTHON`` pointing at its python)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PY = Path(os.environ.get("CIRCUITQ_GPTQMODEL_PYTHON", ROOT / ".venv-gptqmodel" / "bin" / "python"))
pytestmark = [pytest.mark.real_tool,
              pytest.mark.skipif(not PY.exists(), reason=f"no gptqmodel venv at {PY}: bash analyses/setup_gptqmodel_env.sh")]


def _export(tmp_path, fmt: str, masked: bool, bits: int = 4):
    """A tiny Llama, GPTQ at ``bits``/g32 asymmetric, with groups forced to zero point 0 in layer 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuitq.config import QuantizeConfig
    from circuitq.model.arch import target_shapes
    from circuitq.quant.driver import quantize_model
    from circuitq.quant.export import export_all
    from circuitq.quant.plan import PrecisionPlan

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=False)).eval()
    with torch.no_grad():   # the first group of 16 rows non-negative: GPTQ gives them zero point 0
        for mod in model.model.layers[0].modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight[:16, :32].abs_()
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 256, (8, 32), generator=g)
    masks = {k: torch.rand(s, generator=g) < 0.02 for k, s in target_shapes(model).items()} if masked else None
    res = quantize_model(model, calib, PrecisionPlan(bits), QuantizeConfig(bits=bits, group_size=32), masks=masks,
                         progress=False)
    meta = {"bits": bits, "group_size": 32, "sym": False, "method": "gptq", "gptq_format": fmt}
    out = export_all(tmp_path / f"q-{fmt}-{int(masked)}", model, tiny_tokenizer(256), res.qweights, meta, res.summary())
    ids = torch.randint(0, 256, (2, 16), generator=g)
    (out / "ids.json").write_text(json.dumps(ids.tolist()))
    return out, ids, res


def _run(out: Path, loader: str, sidecar: bool = True):
    dest = out / f"{loader}-{int(sidecar)}.safetensors"
    cmd = [str(PY), str(ROOT / "analyses" / "gptqmodel_logits.py"), str(out / "gptq"), str(out / "ids.json"), str(dest),
           "--loader", loader] + ([] if sidecar else ["--no-sidecar"])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(str(dest)), json.loads(p.stdout.strip().splitlines()[-1])


def _hf_logits(out: Path, ids, dtype=torch.float16):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=dtype).eval()
    with torch.no_grad():
        return hf(ids).logits.float()


def _grid(out: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    from circuitq.model.packed import format_of, unpack_gptq

    q = json.loads((out / "gptq" / "config.json").read_text())["quantization_config"]
    with safe_open(str(out / "gptq" / "model.safetensors"), "pt") as fh:
        t = {p: fh.get_tensor(f"{name}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx")}
    return unpack_gptq(t, q["bits"], q["group_size"], q["sym"], None, format_of(q["checkpoint_format"])).dequantize(
        torch.float16).float()


@pytest.mark.parametrize("bits", [4, 3])
def test_default_asymmetric_export_loads_in_gptqmodel_and_decodes_exactly(tmp_path, bits):
    out, ids, res = _export(tmp_path, "auto", masked=False, bits=bits)
    assert json.loads((out / "gptq" / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    zero0 = sum(int((qw.zeros == 0).sum()) for n, qw in res.qweights.items() if ".layers.0." in n)
    assert zero0 > 0                                   # the zero-point-0 groups are really there
    got, info = _run(out, "gptqmodel")
    assert info["kernel"] and info["modules"] == 14
    decoded = {k[len("decoded."):]: v for k, v in got.items() if k.startswith("decoded.")}
    assert len(decoded) == 7
    for name, w in decoded.items():                    # gptqmodel's decoding == circuitq's grid, bit for bit (fp16)
        assert torch.equal(w, _grid(out, name)), name
    ref = _hf_logits(out, ids)
    assert (got["logits"] - ref).abs().max() < 5e-3    # fp16 rounding only


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_masked_export_matches_hf_with_the_sidecar_in_both_loaders(tmp_path, fmt):
    out, ids, _ = _export(tmp_path, fmt, masked=True)
    ref = _hf_logits(out, ids)
    loaders = ["transformers"] + (["gptqmodel"] if fmt == "v2" else [])
    for loader in loaders:
        with_sc, _ = _run(out, loader, sidecar=True)
        without, _ = _run(out, loader, sidecar=False)
        err_with = (with_sc["logits"] - ref).abs().max()
        err_without = (without["logits"] - ref).abs().max()
        assert err_with < 5e-3, (loader, err_with)
        assert err_without > 4 * err_with, (loader, err_with, err_without)   # the sidecar carries the 16-bit entries
