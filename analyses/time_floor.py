"""The least time the default ``run`` can take on this machine with the same results: its floating
point work counted from the model's config and the run's token counts, divided by the fastest
float32 matrix multiply this machine does at the model's shapes (measured here).

    .venv/bin/python analyses/time_floor.py --run RUN/run.json --out analyses/results/time_floor.json

Counted (multiply-adds × 2), per token unless said:
* forward of the decoder: ``2·P_lin`` (every targeted linear) plus attention's two products,
  ``4·L·n_h·d_h·t̄`` (``t̄`` the mean number of earlier positions, half the item's length);
* output head: ``2·V·d`` at each position where logits are made (the scored tokens; every token
  of MMLU for the every-token comparison);
* per-sample gradients: the forward, the backward through the activations (about the forward
  again) and ``G_s = Σ_t g_tᵀ x_t`` (``2·P_lin``): 3 forwards; the attribution maps' Σ G pass
  over ``--map-samples`` items the same;
* Hessians: the forward plus ``X·Xᵀ`` per layer, ``2·S``;
* GPTQ with shared factors: ``2·Σ_modules out·in²`` per quantization (the error propagation).

Not counted (so the floor is lower than any real run): reading and writing steps, log-softmax and
KL over the vocabulary, elementwise work (norms, activations, rotary), quantizer grids, Python. The
rates are the best and the median of several large matmuls at the model's shapes (this machine's
rate varies from run to run), so the floor has every stage at 100% of them.
The default model's weights are dequantized from a 4-bit GGUF file (time does not depend on that).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_seconds  # noqa: E402


def matmul_rate(d: int, d_ff: int, vocab: int, tokens: int = 2048, repeats: int = 11) -> dict:
    """Best and median float32 GFLOP/s over ``repeats`` of the model's four matmul shapes (``tokens``
    rows): ``{shape: {"best": ..., "median": ...}}``. This machine's rate varies from run to run."""
    shapes = {"d x d": (tokens, d, d), "d x d_ff": (tokens, d, d_ff), "d_ff x d": (tokens, d_ff, d),
              "head (256 rows)": (256, d, vocab)}
    out = {}
    for name, (m, k, n) in shapes.items():
        times = matmul_seconds(m, k, n, repeats)
        out[name] = {"best": 2 * m * k * n / times[0] / 1e9, "median": 2 * m * k * n / times[len(times) // 2] / 1e9}
    return out


def floor(cfg: dict, tokens: dict, n_jobs_per_task: int, n_qw_per_task: int, map_samples: int, calib_samples: int,
          rate: float, n_eval_items: int = 48) -> dict:
    """Seconds of floating-point work per stage at ``rate`` GFLOP/s (see the module docstring)."""
    d, d_ff, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dh = d // nh
    mods = {"q": (nh * dh, d), "k": (nkv * dh, d), "v": (nkv * dh, d), "o": (d, nh * dh),
            "gate": (d_ff, d), "up": (d_ff, d), "down": (d, d_ff)}
    p_lin = L * sum(o * i for o, i in mods.values())
    s = 2 * d * d + (nh * dh) ** 2 + d_ff ** 2
    gptq = 2 * L * sum(o * i * i for o, i in mods.values())

    def fwd(n_tok: int, mean_len: float) -> float:
        return n_tok * (2 * p_lin + 4 * L * nh * dh * mean_len / 2)

    flops: dict[str, float] = {}
    for task, t in tokens.items():
        every = t["every"]   # the forward runs over every token of each item (counted with all_tokens, the default)
        head_positions = every if task.startswith("mmlu") else t["scored"]   # MMLU also compares every token
        one_eval = fwd(every, every / n_eval_items) + 2 * V * d * head_positions
        calib_len = t["calib"] / calib_samples
        flops[f"{task}: evaluations (reference + {n_jobs_per_task} jobs)"] = (1 + n_jobs_per_task) * one_eval
        flops[f"{task}: per-sample gradients"] = 3 * fwd(t["calib"], calib_len)
        flops[f"{task}: attribution maps' Σ G pass"] = 3 * fwd(t["calib"] * map_samples / calib_samples, calib_len)
        flops[f"{task}: Hessians"] = fwd(t["calib"], calib_len) + t["calib"] * 2 * L * s
        flops[f"{task}: GPTQ ({n_jobs_per_task} jobs + {n_qw_per_task} Q(W))"] = (n_jobs_per_task + n_qw_per_task) * gptq
    secs = {k: v / (rate * 1e9) for k, v in flops.items()}
    return {"tflop": {k: v / 1e12 for k, v in flops.items()}, "seconds": secs, "total_seconds": sum(secs.values()),
            "P_lin": p_lin}


SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run.json of a default run (its token counts)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    doc = json.loads(Path(a.run).read_text())
    tokens = doc["memory"]["estimate"]["tokens"]
    cfg = SMOLLM2
    rates = matmul_rate(cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"])
    best = max(r["best"] for r in rates.values())
    typical = max(r["median"] for r in rates.values())
    # the default run: per task 2 bit widths x 8 masks = 16 jobs; Q(W) of the mask-free GPTQ per bit width
    f = floor(cfg, tokens, n_jobs_per_task=16, n_qw_per_task=2, map_samples=32, calib_samples=128, rate=best)
    f_typ = floor(cfg, tokens, n_jobs_per_task=16, n_qw_per_task=2, map_samples=32, calib_samples=128, rate=typical)
    out = {"machine": machine(), "matmul_gflops": rates, "rate_best_gflops": best, "rate_median_gflops": typical,
           "model": "SmolLM2-135M-Instruct",
           "model_note": "weights dequantized from a 4-bit GGUF file (time does not depend on it)",
           "tokens_from": str(a.run), **f, "total_seconds_at_median_rate": f_typ["total_seconds"]}
    for k, v in f["seconds"].items():
        print(f"{k:<55} {f['tflop'][k]:8.2f} TFLOP {v:7.0f} s")
    print(f"{'floor of the default run':<55} {sum(f['tflop'].values()):8.2f} TFLOP {f['total_seconds']:7.0f} s "
          f"= {f['total_seconds'] / 60:.1f} min at the best rate {best:.0f} GFLOP/s, "
          f"{f_typ['total_seconds'] / 60:.1f} min at the median rate {typical:.0f} GFLOP/s")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
