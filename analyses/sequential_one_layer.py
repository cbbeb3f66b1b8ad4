"""Where sequential GPTQ diverges: a one-layer model quantized at 1 and at 2 CPU threads (per
module share of differing codes), and the GPTQ core alone on one fixed Hessian at 1 vs 2 threads.

    HF_HUB_OFFLINE=1 .venv/bin/python analyses/sequential_one_layer.py

Weights dequantized from a 4-bit (Q4_1) GGUF file.
"""
import torch, copy
from circuitq.model.loading import load_model
from circuitq.data.calib import example_texts, random_windows, token_stream
from circuitq.data.tasks import Task
from circuitq.config import QuantizeConfig
from circuitq.quant.driver import quantize_model
from circuitq.quant.plan import PrecisionPlan
from circuitq.quant.gptq import gptq_quantize
from circuitq.quant import driver as D


def main() -> None:
    lm = load_model("smollm2-135m-instruct")
    task = Task("gsm8k", tokenizer=lm.tokenizer)
    calib = random_windows(token_stream(example_texts(task.calib_items()), lm.tokenizer, 16*256*4), 16, 256, 0)
    m0 = lm.model
    m0.model.layers = m0.model.layers[:1]; m0.config.num_hidden_layers = 1
    res = []
    for th in (1, 2):
        torch.set_num_threads(th)
        m = copy.deepcopy(m0)
        r = quantize_model(m, calib, PrecisionPlan(3), QuantizeConfig(bits=3, group_size=64, hessian="sequential"), progress=False)
        res.append(r)
    for k in res[0].qweights:
        print(k, float((res[0].qweights[k].codes != res[1].qweights[k].codes).float().mean()))
    # GPTQ core alone at 1 vs 2 threads on a fixed H
    w = m0.model.layers[0].self_attn.q_proj.weight.data.float()
    X = torch.randn(4096, 576); H = X.T @ X
    cfg = QuantizeConfig(bits=3, group_size=64); qs = D.quant_spec(cfg)
    out = []
    for th in (1, 2):
        torch.set_num_threads(th); out.append(gptq_quantize(w, H, qs, None, D.gptq_config(cfg)))
    print("core q_proj 1 vs 2 threads:", float((out[0].qweight.codes != out[1].qweight.codes).float().mean()))


if __name__ == "__main__":
    main()
