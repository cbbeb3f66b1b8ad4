"""Project the default run's memory and disk onto larger models from the per-stage formulas.

    .venv/bin/python analyses/project_memory.py --out analyses/results/project_memory.json

The formulas are ``circuitq.pipeline.budget``'s (checked against measured peaks of two real models in
``docs/memory.md``); the model numbers come from each model's public config, typed in below (no
download). Token counts are the default run's (128 calibration and 48 evaluation items per task), counted
with the default model's tokenizer on the task data (``--tokens-from RUN/run.json`` reads those of
another run). Two placements:

* host (``--device cpu``): float32 model in RAM, every stage on the CPU;
* GPU (``--device cuda``): the model on the GPU at float32 (circuitq's default) and at bfloat16;
  statistics and the GPTQ chunk on the GPU; host RAM holds the runtime and, while the model loads and
  while statistics are saved, one copy of the model or of Σ|G|.

Nothing here was run on an 8B or 70B model: these are projections, labelled as such.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from circuitq.pipeline import budget

CONFIGS = {   # public config.json numbers
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "Qwen2.5-Coder-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def default_tokens(model: str = "smollm2-135m-instruct") -> dict:
    """The default run's token counts per task (128 calibration items, 48 evaluation items),
    counted with ``model``'s tokenizer on the task data (tokenization only; no model is run)."""
    from transformers import AutoTokenizer

    from circuitq.config import RunConfig
    from circuitq.data.tasks import Task
    from circuitq.model.loading import resolve_model
    from circuitq.pipeline import stages

    cfg = RunConfig()
    tok = AutoTokenizer.from_pretrained(resolve_model(model)[0])
    out = {}
    for t in cfg.tasks:
        task = Task(t, cfg.data, tok)
        windows = stages.calibration_tokens(task.calib_for(cfg.calib), tok, cfg.calib)
        out[t] = budget.task_tokens(windows, task.eval_items()[: cfg.eval.samples], tok, cfg)
    return out


def project(name: str, cfg: dict, tokens: dict, dtype_bytes: int = 4) -> dict:
    m = budget.ModelNumbers.from_config(SimpleNamespace(**cfg), s=dtype_bytes)
    stages = budget.run_stages(m, tokens, 2, 256, 6, 0.0035)
    est = budget.estimate(m, stages)
    by = {s.name: s.host for s in stages}
    # GPU placement: the model and the largest stage's working set on the GPU; host: runtime + the larger
    # of one model copy (loading) and one Σ|G| copy (saving the statistics)
    gpu = {dt: dt * m.P + max(by.values()) for dt in (4, 2)}
    host_gpu_run = budget.RUNTIME_BYTES + max(4 * m.P, 4 * m.P_lin)
    return {"model": name, "P": m.P, "P_lin": m.P_lin, "host_cpu_run_peak_gb": est.peak / 1e9, "at": est.worst,
            "stages_gb": {k: v / 1e9 for k, v in by.items()}, "disk_gb": est.disk / 1e9,
            "gpu_fp32_model_gb": gpu[4] / 1e9, "gpu_bf16_model_gb": gpu[2] / 1e9,
            "host_for_gpu_run_gb": host_gpu_run / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens-from", default=None, help="a run.json whose memory estimate's token counts to use")
    a = ap.parse_args()
    tokens = None
    if a.tokens_from:
        doc = json.loads(Path(a.tokens_from).read_text())
        tokens = {t: budget.Tokens(**v) for t, v in doc["memory"]["estimate"]["tokens"].items()}
    tokens = tokens or default_tokens()
    rows = [project(n, c, tokens) for n, c in CONFIGS.items()]
    print(f"{'model':<20} {'P':>8} {'host (cpu run)':>15} {'at':<24} {'disk':>8} {'GPU fp32':>9} {'GPU bf16':>9} "
          f"{'host (gpu run)':>15}")
    for r in rows:
        print(f"{r['model']:<20} {r['P'] / 1e9:7.2f}B {r['host_cpu_run_peak_gb']:13.1f}GB {r['at']:<24} "
              f"{r['disk_gb']:6.0f}GB {r['gpu_fp32_model_gb']:7.1f}GB {r['gpu_bf16_model_gb']:7.1f}GB "
              f"{r['host_for_gpu_run_gb']:13.1f}GB")
    if a.out:
        Path(a.out).write_text(json.dumps({"projection": rows, "tokens": {k: v._asdict() for k, v in tokens.items()},
                                           "note": "projected from the formulas, not measured"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
