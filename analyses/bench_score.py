"""Benchmark saliency scoring throughput against the per-sample autograd reference.

    .venv/bin/python analyses/bench_score.py --out analyses/results/bench_score.json

On the default model with 64 MMLU calibration questions (chat template, 0-shot, at most 256
tokens each): circuitq's hook capture at its defaults (batch 8, at most 512 padded tokens per
pass, fused attention), the same at batch 1, two variants (no token limit; TransformerLens's own
attention), and the reference that the original TaCQ code follows (batch 1, autograd,
``|param.grad|`` of every linear weight added into CPU float32 buffers). Each runs in its own
child process (own peak RSS), all in one run; the default and the reference alternate
``--repeats`` times and their medians are compared. Reports tokens/s, the ratio, peak memory,
the agreement of Σ|G| between batch 1, batch 8 and the reference, and the fraction of the
machine's measured fp32 GEMM throughput reached (6 · linear parameters · tokens / time over a
measured ``torch.mm`` FLOP/s).

The default model's float weights are dequantized from a 4-bit GGUF file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import matmul_seconds  # noqa: E402


def _examples(n: int, tokenizer):
    from circuitq.data.tasks import load_examples

    return load_examples("mmlu", "calib", n, seed=0, shots=0, data_dir=None, tokenizer=tokenizer)


def _child(cfg: dict) -> dict:
    from safetensors.torch import save_file

    from circuitq.saliency.capture import collect_stats, sample_losses
    from circuitq.model.loading import load_model
    from circuitq.model.arch import target_shapes
    from circuitq.data.tasks import collate, tokenize_examples

    torch.set_num_threads(cfg["threads"])
    lm = load_model(cfg["model"])
    ex = _examples(cfg["samples"], lm.tokenizer)
    shapes = target_shapes(lm.model)
    if cfg["kind"] == "reference":
        model = lm.model
        bufs = {n: torch.zeros(s, dtype=torch.float32) for n, s in shapes.items()}
        params = dict(model.named_parameters())
        tok = tokenize_examples(ex, lm.tokenizer, cfg["seq_len"])
        t0, tokens = time.perf_counter(), 0
        for ids, st in zip(tok.ids, tok.scored_from):
            b = collate([ids], [st], lm.tokenizer.pad_token_id)
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=b.input_ids).logits
            sample_losses(logits, b.input_ids, b.loss_mask).sum().backward()
            for n in shapes:
                bufs[n] += params[n].grad.detach().abs().float().cpu()
            tokens += len(ids)
        secs = time.perf_counter() - t0
        sum_abs = bufs
    else:
        res = collect_stats(lm.model, lm.tokenizer, ex, lm.source, batch_size=cfg["batch_size"], seq_len=cfg["seq_len"],
                            stats=("sum_abs",), progress=False, batch_tokens=cfg["batch_tokens"],
                            attention=cfg["attention"])
        secs, tokens = res["seconds"], res["stats"].n_tokens
        sum_abs = res["stats"].tensors["sum_abs"]
    save_file({n: t.contiguous() for n, t in sum_abs.items()}, cfg["dump"])
    n_linear = sum(s[0] * s[1] for s in shapes.values())
    return {"seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs, "linear_params": n_linear,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _gemm_flops(threads: int, n: int = 2048, reps: int = 10) -> float:
    torch.set_num_threads(threads)
    return 2 * n ** 3 / statistics.median(matmul_seconds(n, n, n, reps))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[n] - b[n]).norm() ** 2) for n in a)
    den = sum(float(b[n].norm() ** 2) for n in a)
    return (num / den) ** 0.5


def main() -> None:
    from safetensors.torch import load_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of the default and the reference")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_score.json"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"cq-bench-score-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    base = {"model": a.model, "samples": a.samples, "seq_len": a.seq_len, "threads": a.threads}
    default = {"kind": "circuitq", "batch_size": 8, "batch_tokens": 512, "attention": "sdpa"}
    configs = {
        "circuitq-batch8": default,
        "reference-autograd-batch1": {"kind": "reference"},
        "circuitq-batch1": {**default, "batch_size": 1},
        "circuitq-batch8-no-token-limit": {**default, "batch_tokens": 0},
        "circuitq-batch8-bridge-attention": {**default, "attention": "bridge"},
    }
    schedule = [n for _ in range(a.repeats) for n in ("circuitq-batch8", "reference-autograd-batch1")]
    schedule += [n for n in configs if n not in schedule]
    reps: dict[str, list[dict]] = {}
    for name in schedule:
        cfg = {**base, **configs[name], "dump": str(tmp / f"{name}.safetensors")}
        print(f"[bench] {name} ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
        reps.setdefault(name, []).append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"[bench]   {reps[name][-1]}", flush=True)
    runs = {}
    for name, rs in reps.items():
        tps = [r["tokens_per_s"] for r in rs]
        runs[name] = {**rs[0], "settings": configs[name], "tokens_per_s": statistics.median(tps),
                      "tokens_per_s_each": tps, "seconds": statistics.median(r["seconds"] for r in rs),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
    flops = _gemm_flops(a.threads)
    dumps = {k: load_file(str(tmp / f"{k}.safetensors")) for k in runs}
    c8, ref = runs["circuitq-batch8"], runs["reference-autograd-batch1"]
    result = {
        "machine": {"platform": platform.platform(), "cpu": _cpu_name(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": a.threads, "gemm_fp32_gflops": flops / 1e9},
        "settings": {"task": "mmlu (calib split, 0-shot, chat template)", **base, "repeats": a.repeats},
        "model_note": "SmolLM2-135M-Instruct, weights dequantized from a 4-bit (Q4_1) GGUF file",
        "runs": runs,
        "ratio_tokens_per_s_batch8_over_reference": c8["tokens_per_s"] / ref["tokens_per_s"],
        "ratio_tokens_per_s_each_batch8_over_reference": [
            c / r for c, r in zip(c8["tokens_per_s_each"], ref["tokens_per_s_each"])],
        "ratio_tokens_per_s_batch1_over_reference": runs["circuitq-batch1"]["tokens_per_s"] / ref["tokens_per_s"],
        "fraction_of_gemm_peak": {k: 6 * r["linear_params"] * r["tokens"] / r["seconds"] / flops
                                  for k, r in runs.items()},
        "rel_diff_sum_abs_batch1_vs_batch8": _rel(dumps["circuitq-batch1"], dumps["circuitq-batch8"]),
        "rel_diff_sum_abs_batch8_vs_reference": _rel(dumps["circuitq-batch8"], dumps["reference-autograd-batch1"]),
        "rel_diff_sum_abs_bridge_attention_vs_sdpa": _rel(dumps["circuitq-batch8-bridge-attention"],
                                                          dumps["circuitq-batch8"]),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(result, indent=2) + "\n")
    part.replace(out)
    print(json.dumps(result, indent=2))
    for f in tmp.glob("*.safetensors"):
        f.unlink()


if __name__ == "__main__":
    main()
