"""The CUDA paths against the CPU paths (skipped cleanly without a CUDA device).

The same logic is covered on the CPU by the rest of the suite; these check that moving the work to
the GPU changes nothing but rounding: per-sample gradient statistics, sequential mask-aware GPTQ
with MSE scales, and a whole ``circuitq run``."""
import csv

import pytest
import torch

from circuitq.cli import main
from circuitq.config import QuantizeConfig
from circuitq.quant.driver import quantize_model
from circuitq.quant.plan import PrecisionPlan
from circuitq.saliency.capture import collect_stats

from conftest import task_data, tiny_model
from test_capture import _autograd_per_sample, _examples

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_gradient_statistics_equal_cpu_autograd(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ex = _examples()
    ref_abs, ref_sum = _autograd_per_sample(model, tok, ex, 64)
    model.to("cuda")
    res = collect_stats(model, tok, ex, str(d), batch_size=4, seq_len=64, progress=False)
    st = res["stats"]
    assert st.n_samples == len(ex) and st.n_skipped == 0
    for n in ref_abs:
        got = st.tensors["sum_abs"][n]
        assert got.device.type == "cuda"  # accumulated on the GPU
        err = (got.cpu() - ref_abs[n]).norm() / ref_abs[n].norm()
        assert err <= 1e-4, (n, float(err))  # tf32 is off by default for float32 matmuls
        err = (st.tensors["sum"][n].cpu() - ref_sum[n]).norm() / ref_sum[n].norm()
        assert err <= 1e-4, (n, float(err))


@pytest.mark.parametrize("mse", [False, True])
def test_cuda_sequential_masked_gptq_matches_cpu(calib_ids, mse):
    a, b = tiny_model(), tiny_model()
    g = torch.Generator().manual_seed(5)
    masks = {n: torch.rand(p.shape, generator=g) < 0.02 for n, p in a.named_parameters()
             if n.endswith("proj.weight")}
    cfg = QuantizeConfig(bits=3, group_size=-1, mse=mse, hessian="sequential")
    ra = quantize_model(a, calib_ids, PrecisionPlan(3), cfg, masks=masks, device="cpu", progress=False)
    rb = quantize_model(b, calib_ids, PrecisionPlan(3), cfg, masks=masks, device="cuda", progress=False)
    diff = sum(int((ra.qweights[n].codes != rb.qweights[n].codes).sum()) for n in ra.qweights)
    assert diff / sum(q.codes.numel() for q in ra.qweights.values()) < 0.01
    # kept weights hold GPTQ's error-compensated values in 16-bit: the same on both devices
    wa, wb = a.state_dict(), b.state_dict()
    ka = torch.cat([wa[n][m] for n, m in masks.items()])
    kb = torch.cat([wb[n][m] for n, m in masks.items()])
    assert ka.numel() > 0 and float((ka - kb).norm() / ka.norm()) < 1e-2
    assert next(b.parameters()).device.type == "cpu"


def test_cuda_run_end_to_end_agrees_with_cpu(tmp_path, tiny_dir):
    d, _ = tiny_dir
    data = task_data(tmp_path)
    rows = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / f"run-{dev}"
        assert main(["run", "--model", str(d), "--tasks", "mmlu", "gsm8k", "--bits", "3", "--data-dir", str(data),
                     "--calib-samples", "6", "--calib-seq-len", "64", "--eval-samples", "5", "--eval-seq-len", "96",
                     "--fraction", "0.02", "--group-size", "32", "--batch-size", "4", "--baselines", "grad",
                     "--device", dev, "--out", str(out)]) == 0
        rows[dev] = {(r["task"], r["method"]): r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["cpu"].keys() == rows["cuda"].keys()
    for k, r in rows["cpu"].items():
        if r["method"] == "reference (16-bit)":
            continue
        a, b = float(r["kl"]), float(rows["cuda"][k]["kl"])
        assert a > 0 and b > 0
        assert abs(a - b) <= 0.1 * a + 1e-4, (k, a, b)  # same masks up to ties; rounding only


@pytest.mark.parametrize("model_type", ["phi3", "gpt_neox", "gemma3_text"])
def test_cuda_path_of_each_family_matches_cpu(tmp_path, calib_ids, model_type):
    """Layer streaming and masked GPTQ on the device for families that are not Llama-shaped (fused
    stacked / interleaved projections, GeGLU and sandwich norms): the same codes as on the CPU up to
    rounding, and per-sample gradients through the bridge on the device equal CPU autograd."""
    from circuitq.model.arch import target_shapes
    from test_families import tiny_family

    d, a, tok = tiny_family(tmp_path / "a", model_type)
    _, b, _ = tiny_family(tmp_path / "b", model_type)
    ids = calib_ids.clamp_max(a.config.vocab_size - 1)
    g = torch.Generator().manual_seed(5)
    masks = {n: torch.rand(shape, generator=g) < 0.02 for n, shape in target_shapes(a).items()}
    cfg = QuantizeConfig(bits=3, group_size=-1, hessian="sequential")
    ra = quantize_model(a, ids, PrecisionPlan(3), cfg, masks=masks, device="cpu", progress=False)
    rb = quantize_model(b, ids, PrecisionPlan(3), cfg, masks=masks, device="cuda", progress=False)
    diff = sum(int((ra.qweights[n].codes != rb.qweights[n].codes).sum()) for n in ra.qweights)
    assert diff / sum(q.codes.numel() for q in ra.qweights.values()) < 0.01
    _, c, _ = tiny_family(tmp_path / "c", model_type)          # unquantized again: gradients on the device
    ex = _examples()
    ref_abs, _ = _autograd_per_sample(c, tok, ex, 64)
    st = collect_stats(c.to("cuda"), tok, ex, str(d), batch_size=4, seq_len=64, progress=False,
                       attention="eager")["stats"]
    for n in ref_abs:
        err = (st.tensors["sum_abs"][n].cpu() - ref_abs[n]).norm() / ref_abs[n].norm()
        assert err <= 1e-4, (n, float(err))
