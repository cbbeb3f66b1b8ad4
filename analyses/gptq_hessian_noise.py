"""Sensitivity of the GPTQ core to its Hessian: layer 0 of the default model, Hessians collected at
1 and 2 CPU threads, GPTQ repeated, and GPTQ on H with 1e-7 relative noise (share of codes that
change).

    HF_HUB_OFFLINE=1 .venv/bin/python analyses/gptq_hessian_noise.py

Weights dequantized from a 4-bit (Q4_1) GGUF file.
"""
import torch, copy
from circuitq.model.loading import load_model
from circuitq.data.calib import example_texts, random_windows, token_stream
from circuitq.data.tasks import Task
from circuitq.model.arch import arch_for
from circuitq.quant import driver as D
from circuitq.quant.gptq import gptq_quantize, GPTQConfig
from circuitq.config import QuantizeConfig


def main() -> None:
    lm = load_model("smollm2-135m-instruct")
    task = Task("gsm8k", tokenizer=lm.tokenizer)
    calib = random_windows(token_stream(example_texts(task.calib_items()), lm.tokenizer, 16*256*4), 16, 256, 0)
    spec = arch_for("llama"); m = lm.model
    layer = m.model.layers[0]
    Hs = {}
    for th in (1, 2):
        torch.set_num_threads(th)
        hidden, kw, tm = D._capture_first_inputs(m, spec, calib, 8, "cpu")
        for g in spec.groups:
            mods = [layer.get_submodule(n) for n in g]
            Hs.setdefault(g[0], []).append(D._group_hessian(layer, mods, hidden, kw, tm).H)
    torch.set_num_threads(2)
    cfg = QuantizeConfig(bits=3, group_size=64)
    qs = D.quant_spec(cfg)
    for g in spec.groups:
        H1, H2 = Hs[g[0]]
        rel = float((H1 - H2).norm() / H1.norm())
        for n in g:
            w = layer.get_submodule(n).weight.data.float()
            r1 = gptq_quantize(w, H1, qs, None, D.gptq_config(cfg)); r2 = gptq_quantize(w, H2, qs, None, D.gptq_config(cfg))
            r3 = gptq_quantize(w, H1, qs, None, D.gptq_config(cfg))
            Hn = H1 * (1 + 1e-7 * torch.randn_like(H1)); Hn = (Hn + Hn.T) / 2
            r4 = gptq_quantize(w, Hn, qs, None, D.gptq_config(cfg))
            f = lambda a, b: float((a.qweight.codes != b.qweight.codes).float().mean())
            print(n, f"H rel diff {rel:.2e} damp {r1.damp} {r2.damp}; codes differ thr1 vs thr2 {f(r1, r2):.4f}; repeat {f(r1, r3):.4f}; H*(1+1e-7 noise) {f(r1, r4):.4f}", flush=True)


if __name__ == "__main__":
    main()
