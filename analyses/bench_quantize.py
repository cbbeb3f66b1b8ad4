"""Benchmark whole-model quantization of the default model, side by side with gptqmodel.

    .venv/bin/python analyses/bench_quantize.py --out analyses/results/bench_quantize.json
    (first: bash analyses/setup_gptqmodel_env.sh .venv-gptqmodel, or pass --gptqmodel-python '')

For each bit width: circuitq GPTQ (no mask), circuitq GPTQ with a 0.35% mask (the overhead of
keeping weights in 16-bit), circuitq RTN, and gptqmodel on the same calibration tokens with the
same settings (asymmetric, per output channel, no act-order, damp 0.01). Every configuration runs
in its own child process, so wall time and peak RSS are its own. Perplexity is measured on
held-out GSM8k windows (documents disjoint from calibration) by one evaluator for all; gptqmodel's
checkpoint is read by circuitq's GPTQ v1 loader (its own kernel agrees to 0.3%, see the notes).

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
import tempfile
import time
from pathlib import Path

import torch

from circuitq.data.calib import consecutive_windows, example_texts, random_windows, token_stream
from circuitq.data.tasks import Task
from circuitq.evals import perplexity
from circuitq.model.loading import DEFAULT_MODEL, load_model

HERE = Path(__file__).resolve().parent


def _child(cfg: dict) -> dict:
    """One configuration, run inside a child process."""
    from circuitq.model.packed import load_packed
    from circuitq.quant.plan import PrecisionPlan
    from circuitq.config import QuantizeConfig
    from circuitq.model.arch import target_shapes
    from circuitq.quant.driver import quantize_model

    torch.set_num_threads(cfg["threads"])
    calib = torch.load(cfg["calib"], weights_only=True)
    held = torch.load(cfg["held"], weights_only=True)
    if cfg["kind"] == "gptqmodel-eval":
        model = load_packed(cfg["path"])
        return {"ppl": perplexity(model, held)}
    lm = load_model(cfg["model"])
    masks = None
    if cfg.get("mask_fraction"):
        # magnitude top-k mask of the requested size (the timing does not depend on which weights)
        shapes = target_shapes(lm.model)
        sd = lm.model.state_dict()
        flat = torch.cat([sd[k].abs().flatten() for k in shapes])
        k = int(cfg["mask_fraction"] * flat.numel())
        thr = torch.topk(flat, k).values.min()
        masks = {n: sd[n].abs() >= thr for n in shapes}
    qcfg = QuantizeConfig(bits=cfg["bits"], group_size=-1, method=cfg["method"], batch_size=8)
    t0 = time.perf_counter()
    res = quantize_model(lm.model, calib if cfg["method"] == "gptq" else None, PrecisionPlan(cfg["bits"]), qcfg,
                         masks=masks, progress=False)
    seconds = time.perf_counter() - t0
    recs = res.records
    out_err = [r.output_rel_error for r in recs if r.output_rel_error is not None]
    return {"seconds": seconds, "ppl": perplexity(lm.model, held), "average_bits": res.bits.average_bits,
            "nnz": res.bits.nnz, "median_output_rel_error": statistics.median(out_err) if out_err else None,
            "median_weight_rel_error": statistics.median(r.weight_rel_error for r in recs),
            "per_module_type_output_rel_error": _by_type(recs),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _by_type(recs) -> dict:
    out: dict[str, list] = {}
    for r in recs:
        if r.output_rel_error is not None:
            out.setdefault(r.name.rsplit(".", 1)[-1], []).append(r.output_rel_error)
    return {k: statistics.median(v) for k, v in out.items()}


def _run_child(cfg: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"child {cfg['kind']} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def _peak_rss_mb_children() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=32)
    ap.add_argument("--calib", default="gsm8k")
    ap.add_argument("--mask-fraction", type=float, default=0.0035)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gptqmodel-python", default=str(HERE.parent / ".venv-gptqmodel" / "bin" / "python"))
    ap.add_argument("--peer-timeout", type=float, default=None,
                    help="seconds after which the gptqmodel run is stopped and recorded as not finished")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_quantize.json"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return

    lm = load_model(a.model)
    # GPTQ's recipe: random windows of the calibration items' token stream; perplexity on the
    # task's evaluation items (never calibrated on)
    task = Task(a.calib, tokenizer=lm.tokenizer)
    stream = token_stream(example_texts(task.calib_items()), lm.tokenizer, a.samples * a.seq_len * 4)
    held_stream = token_stream(example_texts(task.eval_items()), lm.tokenizer, a.heldout_windows * a.seq_len + 1)
    data = argparse.Namespace(calib=random_windows(stream, a.samples, a.seq_len, 0),
                              heldout=consecutive_windows(held_stream, a.seq_len, a.heldout_windows))
    tmp = Path(tempfile.mkdtemp(prefix="cq-bench-"))
    torch.save(data.calib, tmp / "calib.pt")
    torch.save(data.heldout, tmp / "held.pt")
    base = {"model": a.model, "calib": str(tmp / "calib.pt"), "held": str(tmp / "held.pt"), "threads": a.threads}
    original_ppl = perplexity(lm.model, data.heldout)
    del lm
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
               "settings": {"samples": a.samples, "seq_len": a.seq_len, "calib": a.calib,
                            "heldout_windows": a.heldout_windows, "group_size": -1, "sym": False,
                            "act_order": False, "damp": 0.01, "mask_fraction": a.mask_fraction},
               "model_note": "SmolLM2-135M-Instruct, weights dequantized from a 4-bit (Q4_1) GGUF file",
               "original_ppl": original_ppl, "runs": {}}
    have_peer = bool(a.gptqmodel_python) and Path(a.gptqmodel_python).exists()
    for bits in a.bits:
        runs = {}
        for name, extra in (("circuitq-gptq", {"method": "gptq"}),
                            ("circuitq-gptq-mask", {"method": "gptq", "mask_fraction": a.mask_fraction}),
                            ("circuitq-rtn", {"method": "rtn"})):
            print(f"[bench] {bits}-bit {name} ...", flush=True)
            runs[name] = _run_child({**base, "kind": name, "bits": bits, **extra})
            print(f"[bench]   {runs[name]}", flush=True)
        if have_peer:
            print(f"[bench] {bits}-bit gptqmodel ...", flush=True)
            out = tmp / f"gptqmodel-{bits}"
            t0 = time.perf_counter()
            try:
                p = subprocess.run([a.gptqmodel_python, str(HERE / "gptqmodel_quantize.py"), lm_dir(a.model),
                                    base["calib"], str(bits), "-1", str(out)], capture_output=True, text=True,
                                   env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}, timeout=a.peer_timeout)
            except subprocess.TimeoutExpired:
                p = None
            if p is None:
                runs["gptqmodel"] = {"finished": False, "stopped_after_s": a.peer_timeout,
                                     "time_ratio_lower_bound": a.peer_timeout / runs["circuitq-gptq"]["seconds"]}
            elif p.returncode:
                runs["gptqmodel"] = {"error": p.stderr[-2000:]}
            else:
                peer = json.loads(p.stdout.strip().splitlines()[-1])
                peer["wall_seconds"] = time.perf_counter() - t0
                peer["ppl"] = _run_child({**base, "kind": "gptqmodel-eval", "path": str(out)})["ppl"]
                runs["gptqmodel"] = peer
            print(f"[bench]   {runs['gptqmodel']}", flush=True)
        g, m = runs["circuitq-gptq"], runs["circuitq-gptq-mask"]
        runs["ratios"] = {"mask_overhead": m["seconds"] / g["seconds"]}
        if "seconds" in runs.get("gptqmodel", {}):
            runs["ratios"]["gptqmodel_over_circuitq_time"] = runs["gptqmodel"]["seconds"] / g["seconds"]
        results["runs"][f"{bits}bit"] = runs
    results["peak_rss_mb_any_child"] = _peak_rss_mb_children()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def lm_dir(name: str) -> str:
    from circuitq.model.loading import resolve_model

    return resolve_model(name)[0]


if __name__ == "__main__":
    main()
