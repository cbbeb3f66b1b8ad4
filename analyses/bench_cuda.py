"""CUDA against CPU on one machine: saliency scoring and mask-aware GPTQ on the default model.

    python analyses/bench_cuda.py --out analyses/results/bench_cuda.json --md analyses/BENCH_CUDA.md

Side by side in one run, on the same machine, the same inputs and the same settings:

* **score**: per-sample gradient statistics (Σ|G|, TaCQ's and `grad`'s input) over MMLU
  calibration questions (0-shot, chat template) with circuitq's hook capture at its defaults;
  tokens/s, and the relative difference of Σ|G| between the devices;
* **quantize**: 3-bit GPTQ of every linear weight, a 0.35% magnitude mask kept in 16-bit, on
  random windows of GSM8k calibration text, in three recipes: shared Hessians with group 64
  (`circuitq run`'s default), sequential with group 64 (`quantize`'s default) and sequential per
  output channel with MSE scales (`--preset tacq-paper`'s final quantizer); seconds, the share of
  3-bit codes that differ between the devices, and perplexity on held-out GSM8k windows.

Each timing is the median of ``--repeats`` runs on CUDA (after one warm-up run that is not
counted) and of ``--cpu-repeats`` on the CPU, with every CPU core of the machine. Timings
synchronise the device before the clock is read. The default model's float weights are
dequantized from a 4-bit (Q4_1) GGUF file.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RECIPES = {  # name -> QuantizeConfig overrides
    "shared, group 64 (run default)": {"hessian": "shared", "group_size": 64},
    "sequential, group 64 (quantize default)": {"hessian": "sequential", "group_size": 64},
    "sequential, per channel, MSE (tacq-paper)": {"hessian": "sequential", "group_size": -1, "mse": True},
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def bench_score(lm, n: int, seq_len: int, devices: dict[str, int]) -> dict:
    from circuitq.data.tasks import load_examples
    from circuitq.saliency.capture import collect_stats

    ex = load_examples("mmlu", "calib", n, seed=0, shots=0, data_dir=None, tokenizer=lm.tokenizer)
    out, sums = {}, {}
    for dev, reps in devices.items():
        lm.model.to(dev)
        times = []
        for r in range(reps + (1 if dev.startswith("cuda") else 0)):
            secs, res = _timed(lambda: collect_stats(lm.model, lm.tokenizer, ex, lm.source, stats=("sum_abs",),
                                                     seq_len=seq_len, progress=False), dev)
            if dev.startswith("cuda") and r == 0:
                continue  # warm-up: kernel selection, allocator
            times.append(secs)
        st = res["stats"]
        sums[dev] = {k: v.float().cpu() for k, v in st.tensors["sum_abs"].items()}
        out[dev] = {"seconds": times, "median_s": statistics.median(times), "tokens": st.n_tokens,
                    "tokens_per_s": st.n_tokens / statistics.median(times)}
        print(f"[bench_cuda] score on {dev}: {out[dev]['median_s']:.2f}s median of {len(times)}", flush=True)
    lm.model.to("cpu")
    if len(sums) == 2:
        a, b = sums.values()
        num = sum(float((a[k] - b[k]).norm() ** 2) for k in a)
        out["rel_diff_sum_abs"] = (num / sum(float(a[k].norm() ** 2) for k in a)) ** 0.5
    out["examples"] = n
    return out


def bench_quantize(lm, calib, held, bits: int, fraction: float, devices: dict[str, int], recipes,
                   on_row=None) -> dict:
    from circuitq.config import QuantizeConfig
    from circuitq.evals import perplexity
    from circuitq.model.arch import target_shapes
    from circuitq.quant.driver import quantize_model
    from circuitq.quant.plan import PrecisionPlan

    shapes = target_shapes(lm.model)
    sd = lm.model.state_dict()
    flat = torch.cat([sd[k].abs().flatten() for k in shapes])
    thr = torch.topk(flat, int(fraction * flat.numel())).values.min()
    masks = {n: sd[n].abs() >= thr for n in shapes}   # timing does not depend on which weights
    gpu = next((d for d in devices if d.startswith("cuda")), "cpu")
    out = {}
    for name in recipes:
        cfg = QuantizeConfig(bits=bits, **RECIPES[name])
        row, codes = {}, {}
        for dev, reps in devices.items():
            times = []
            for r in range(reps + (1 if dev.startswith("cuda") else 0)):
                model = copy.deepcopy(lm.model)
                secs, res = _timed(lambda: quantize_model(model, calib, PrecisionPlan(bits), cfg, masks=masks,
                                                          device=dev, progress=False), dev)
                if dev.startswith("cuda") and r == 0:
                    continue
                times.append(secs)
            codes[dev] = {k: q.codes.cpu() for k, q in res.qweights.items()}
            row[dev] = {"seconds": times, "median_s": statistics.median(times),
                        "ppl": perplexity(model.to(gpu), held, device=gpu), "average_bits": res.bits.average_bits}
            del model
            print(f"[bench_cuda] {name} on {dev}: {row[dev]['median_s']:.1f}s median of {len(times)}, "
                  f"ppl {row[dev]['ppl']:.3f}", flush=True)
        if len(codes) == 2:
            a, b = codes.values()
            row["codes_differing"] = (sum(int((a[k] != b[k]).sum()) for k in a) / sum(a[k].numel() for k in a))
        out[name] = row
        if on_row:
            on_row(out)
    return out


def markdown(res: dict, cmd: str) -> str:
    m = res["machine"]
    L = ["# CUDA against CPU, side by side on one machine", "",
         f"Command: `{cmd}`  ",
         f"Machine: {m['gpu']} ({m['torch']}, CUDA {m['cuda_version']}); CPU: {m['cpu']}, {m['cpus']} cores "
         f"(torch threads {m['threads']}); {m['platform']}. This run: {res['seconds'] / 60:.1f} min.", "",
         "Model: SmolLM2-135M-Instruct, **weights dequantized from a 4-bit (Q4_1) GGUF file**. Median of "
         f"{res['settings']['repeats']} CUDA runs (after one uncounted warm-up) and {res['settings']['cpu_repeats']} "
         "CPU run(s); timings synchronise the device.", "",
         "| stage | CPU s | CUDA s | CUDA speed-up | CPU vs CUDA agreement |", "| --- | --- | --- | --- | --- |"]
    s = res["score"]
    if "cpu" in s and "cuda" in s:
        L.append(f"| score: Σ\\|G\\| over {s['examples']} MMLU items ({s['cuda']['tokens']} tokens) | "
                 f"{s['cpu']['median_s']:.2f} | {s['cuda']['median_s']:.2f} | "
                 f"{s['cpu']['median_s'] / s['cuda']['median_s']:.1f}× | Σ\\|G\\| relative difference "
                 f"{s['rel_diff_sum_abs']:.1e} |")
    q = res["settings"]
    for name, row in res["quantize"].items():
        if "cpu" in row and "cuda" in row:
            L.append(f"| quantize {q['bits']}-bit, {name}, {q['quant_samples']}×{q['seq_len']} tokens | "
                     f"{row['cpu']['median_s']:.1f} | {row['cuda']['median_s']:.1f} | "
                     f"{row['cpu']['median_s'] / row['cuda']['median_s']:.1f}× | codes differing "
                     f"{row['codes_differing']:.2%}; held-out ppl {row['cpu']['ppl']:.3f} vs {row['cuda']['ppl']:.3f} |")
    L += ["", f"Original model's held-out perplexity: {res['original_ppl']:.3f}.", ""]
    return "\n".join(L) + "\n"


def main() -> int:
    from circuitq.data.calib import consecutive_windows, example_texts, random_windows, token_stream
    from circuitq.data.tasks import Task
    from circuitq.evals import perplexity
    from circuitq.model.loading import DEFAULT_MODEL, load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--score-samples", type=int, default=64)
    ap.add_argument("--score-seq-len", type=int, default=256)
    ap.add_argument("--quant-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=32)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--mask-fraction", type=float, default=0.0035)
    ap.add_argument("--repeats", type=int, default=3, help="counted CUDA runs (after one warm-up)")
    ap.add_argument("--cpu-repeats", type=int, default=1)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--out", default=str(HERE / "results" / "bench_cuda.json"))
    ap.add_argument("--md", default=None, help="also write the table as markdown here")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device here; this benchmark compares CUDA with the CPU on a GPU machine",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    devices = {"cuda": a.repeats, "cpu": a.cpu_repeats}
    lm = load_model(a.model)
    task = Task("gsm8k", tokenizer=lm.tokenizer)
    stream = token_stream(example_texts(task.calib_items()), lm.tokenizer, a.quant_samples * a.seq_len * 4)
    held_stream = token_stream(example_texts(task.eval_items()), lm.tokenizer, a.heldout_windows * a.seq_len + 1)
    calib = random_windows(stream, a.quant_samples, a.seq_len, 0)
    held = consecutive_windows(held_stream, a.seq_len, a.heldout_windows)
    res = {"machine": {"platform": platform.platform(), "cpu": _cpu_name(), "cpus": os.cpu_count(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "cuda_version": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)},
           "settings": {"score_samples": a.score_samples, "score_seq_len": a.score_seq_len,
                        "quant_samples": a.quant_samples, "seq_len": a.seq_len, "bits": a.bits,
                        "mask_fraction": a.mask_fraction, "repeats": a.repeats, "cpu_repeats": a.cpu_repeats},
           "model_note": "SmolLM2-135M-Instruct, weights dequantized from a 4-bit (Q4_1) GGUF file",
           "original_ppl": perplexity(lm.model.to("cuda"), held, device="cuda")}
    lm.model.to("cpu")
    cmd = "python analyses/bench_cuda.py " + " ".join(sys.argv[1:])

    def save(quantize=None) -> None:   # after every stage, so a stopped run keeps what it measured
        res["quantize"] = quantize or res.get("quantize", {})
        res["seconds"] = time.perf_counter() - t0
        for path, text in ((a.out, json.dumps(res, indent=2) + "\n"), (a.md, markdown(res, cmd) if a.md else None)):
            if path:
                p = Path(path)
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_suffix(p.suffix + ".tmp")
                tmp.write_text(text)
                tmp.replace(p)

    res["score"] = bench_score(lm, a.score_samples, a.score_seq_len, devices)
    save()
    bench_quantize(lm, calib, held, a.bits, a.mask_fraction, devices, a.recipes, on_row=save)
    print(markdown(res, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
