"""Sequential GPTQ on the default model: identical settings, 1 vs 2 CPU threads (or 1 vs 1).

    HF_HUB_OFFLINE=1 .venv/bin/python analyses/sequential_threads.py sequential 1,2

Quantizes a copy of the model twice (3-bit, group 64, 16 GSM8k windows of 256 tokens) and reports
the share of 3-bit codes that differ, per layer, and held-out perplexity. Output of the runs
quoted in analyses/BENCH_CUDA.md: analyses/results/sequential_sensitivity/. Weights dequantized
from a 4-bit (Q4_1) GGUF file.
"""
import copy, sys, torch, time
from circuitq.model.loading import load_model
from circuitq.data.calib import example_texts, random_windows, token_stream, consecutive_windows
from circuitq.data.tasks import Task
from circuitq.config import QuantizeConfig
from circuitq.quant.driver import quantize_model
from circuitq.quant.plan import PrecisionPlan
from circuitq.evals import perplexity


def main() -> None:
    lm = load_model("smollm2-135m-instruct")
    task = Task("gsm8k", tokenizer=lm.tokenizer)
    stream = token_stream(example_texts(task.calib_items()), lm.tokenizer, 16 * 256 * 4)
    calib = random_windows(stream, 16, 256, 0)
    held = consecutive_windows(token_stream(example_texts(task.eval_items()), lm.tokenizer, 8 * 256 + 1), 256, 8)
    mode = sys.argv[1]; THREADS = [int(x) for x in sys.argv[2].split(",")]; import random
    res = {}
    for th in THREADS:
        torch.set_num_threads(th)
        m = copy.deepcopy(lm.model); t0 = time.time()
        r = quantize_model(m, calib, PrecisionPlan(3), QuantizeConfig(bits=3, group_size=64, hessian=mode), progress=False)
        res[len(res)] = ({k: q.codes for k, q in r.qweights.items()}, perplexity(m, held))
        print(mode, th, time.time() - t0, res[len(res)-1][1], flush=True)
    a, b = res[0][0], res[1][0]
    per_layer = {}
    for k in a:
        L = int(k.split(".")[2]); d = int((a[k] != b[k]).sum()); per_layer.setdefault(L, [0, 0]); per_layer[L][0] += d; per_layer[L][1] += a[k].numel()
    print(mode, "differing", sum(v[0] for v in per_layer.values()) / sum(v[1] for v in per_layer.values()))
    print(mode, "by layer", [round(v[0] / v[1], 4) for _, v in sorted(per_layer.items())])


if __name__ == "__main__":
    main()
