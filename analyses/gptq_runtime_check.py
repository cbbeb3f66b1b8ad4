"""Does a circuitq ``gptq/`` export run the same in a real GPTQ runtime as circuitq's ``hf/`` model?

    bash analyses/setup_gptqmodel_env.sh        # once: gptqmodel + optimum in .venv-gptqmodel
    .venv/bin/python analyses/gptq_runtime_check.py [--model smollm2-135m-instruct] [--bits 3 --group-size 64]

For an unmasked and a masked model (a random mask of circuitq's default fraction: the check is
about the file format, not about which weights are kept), quantized by ``--method`` (RTN by
default: the format does not depend on how codes were chosen), each exported in both GPTQ
layouts (``v2`` = what ``--gptq-format auto`` writes for asymmetric grids, and ``v1``):

* gptqmodel loads ``gptq/`` (``GPTQModel.load``, CPU torch kernel; v2 only: gptqmodel refuses
  asymmetric v1 files it did not write) and transformers loads it through optimum (both layouts);
  ``analyses/gptqmodel_logits.py`` runs in the gptqmodel venv and adds the 16-bit sidecar in
  forward hooks (and once without it);
* gptqmodel's own decoding of the layer-0 modules is compared with circuitq's grid, and the
  logits on fixed prompts with ``hf/`` loaded in float16 (and float32).

Writes ``analyses/results/gptq_runtime.json`` and ``analyses/GPTQ_RUNTIME.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is Rome. Tourists who visit both cities often "
    "travel between them by train, which takes about eleven hours.",
    "When Mary and John went to the store, John gave a drink to Mary. Later that evening, the two of them "
    "walked home together along the river and talked about the weekend.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "for i in range(10):\n    print(i, fibonacci(i))\n",
    "Question: A farmer has 12 cows and buys 7 more. Each cow gives 3 litres of milk a day. How many litres "
    "does he get per day? Answer: 12 + 7 = 19 cows, and 19 * 3 = 57. The answer is 57.",
]


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """``got``, ``ref``: ``[prompts, seq, vocab]`` logits."""
    d = (got - ref).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    ap.add_argument("--python", default=os.environ.get("CIRCUITQ_GPTQMODEL_PYTHON",
                                                       str(ROOT / ".venv-gptqmodel" / "bin" / "python")))
    ap.add_argument("--work", default=None, help="where the exports go (default: a temporary folder)")
    ap.add_argument("--out-json", default=str(HERE / "results" / "gptq_runtime.json"))
    ap.add_argument("--out-md", default=str(HERE / "GPTQ_RUNTIME.md"))
    a = ap.parse_args()
    if not Path(a.python).exists():
        print(f"no gptqmodel venv at {a.python}: run `bash analyses/setup_gptqmodel_env.sh` first", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    from circuitq import DEFAULT_FRACTION, load_model
    from circuitq.config import MaskConfig, QuantizeConfig
    from circuitq.pipeline import stages
    from circuitq.quant.driver import quantize_model
    from circuitq.quant.export import export_all
    from circuitq.model.packed import format_of, unpack_gptq
    from circuitq.quant.plan import PrecisionPlan

    t_all = time.perf_counter()
    lm = load_model(a.model)
    enc = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    L = min(len(e) for e in enc)
    ids = torch.tensor([e[:L] for e in enc])
    masks = stages.select(stages.score_weights("random", lm.model, seed=0), MaskConfig(fraction=DEFAULT_FRACTION))
    q = QuantizeConfig(bits=a.bits, group_size=a.group_size, method=a.method, hessian="shared")
    calib = None
    if a.method == "gptq":
        from circuitq.config import CalibConfig
        from circuitq.data.tasks import Task
        import circuitq

        items = Task("gsm8k", circuitq.DataConfig(), lm.tokenizer).calib_for(CalibConfig(samples=32))
        calib = stages.calibration_tokens(items, lm.tokenizer, CalibConfig(samples=32))
    work = Path(a.work or tempfile.mkdtemp(prefix="cq-gptq-runtime-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for masked in (False, True):
        model = copy.deepcopy(lm.model)
        res = quantize_model(model, calib, PrecisionPlan(a.bits), q, masks=masks if masked else None, progress=True)
        zero0 = sum(int((qw.zeros == 0).sum()) for qw in res.qweights.values())
        nnz = res.bits.nnz
        for fmt in ("v2", "v1"):
            out = work / f"{'masked' if masked else 'plain'}-{fmt}"
            meta = {"model": lm.name, "bits": a.bits, "group_size": a.group_size, "sym": False, "method": a.method,
                    "gptq_format": fmt, "model_note": lm.note}
            export_all(out, model, lm.tokenizer, res.qweights, meta, res.summary(), overwrite=True)
            (out / "ids.json").write_text(json.dumps(ids.tolist()))
            refs = {}
            for dt in (torch.float16, torch.float32):
                hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=dt).eval()
                with torch.no_grad():
                    refs[str(dt).split(".")[-1]] = hf(ids).logits.float()
                del hf
            fp16_noise = compare(refs["float16"], refs["float32"])   # the scale of float16 rounding alone
            qc = json.loads((out / "gptq" / "config.json").read_text())["quantization_config"]
            for loader in (["gptqmodel"] if fmt == "v2" else []) + ["transformers"]:
                for sidecar in ([True, False] if masked else [True]):
                    dest = out / f"{loader}-{int(sidecar)}.safetensors"
                    cmd = [a.python, str(HERE / "gptqmodel_logits.py"), str(out / "gptq"), str(out / "ids.json"),
                           str(dest), "--loader", loader] + ([] if sidecar else ["--no-sidecar"])
                    print("$", " ".join(cmd), flush=True)
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    row = {"masked": masked, "n_16bit": nnz, "format": fmt,
                           "checkpoint_format": qc["checkpoint_format"], "loader": loader, "sidecar": sidecar,
                           "zero_point_zero_groups": zero0, "hf_fp16_vs_fp32_max_abs": fp16_noise["max_abs"],
                           "hf_fp16_vs_fp32_mean_abs": fp16_noise["mean_abs"]}
                    if p.returncode != 0:
                        row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
                        rows.append(row)
                        print("  failed:", row["error"], flush=True)
                        continue
                    info = json.loads(p.stdout.strip().splitlines()[-1])
                    from safetensors import safe_open
                    from safetensors.torch import load_file

                    got = load_file(str(dest))
                    dec = {}
                    with safe_open(str(out / "gptq" / "model.safetensors"), "pt") as fh:
                        for k, w in got.items():
                            if not k.startswith("decoded."):
                                continue
                            n = k[len("decoded."):]
                            t = {s: fh.get_tensor(f"{n}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
                            grid = unpack_gptq(t, qc["bits"], qc["group_size"], qc["sym"], None,
                                               format_of(qc["checkpoint_format"])).dequantize(torch.float16).float()
                            dec[n] = float((grid - w).abs().max())
                    row.update({"kernel": info["kernel"], "load_seconds": info["load_seconds"],
                                "decoded_modules": len(dec), "decoded_max_abs_vs_circuitq_grid": max(dec.values()) if dec else None,
                                **{f"vs_hf_{k}_{m}": v for k, r in refs.items() for m, v in compare(got["logits"], r).items()}})
                    rows.append(row)
                    print("  " + json.dumps({k: row[k] for k in row if k.startswith(("vs_hf_float16", "decoded_max"))}),
                          flush=True)
        del model
    doc = {"model": lm.name, "model_note": lm.note, "bits": a.bits, "group_size": a.group_size, "method": a.method,
           "mask": f"random, {DEFAULT_FRACTION:.2%} of targeted weights", "prompts": PROMPTS, "tokens_per_prompt": L,
           "machine": f"{platform.platform()}, {os.cpu_count()} cores", "seconds": round(time.perf_counter() - t_all, 1),
           "rows": rows}
    Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out_json).write_text(json.dumps(doc, indent=2) + "\n")
    Path(a.out_md).write_text(summary(doc))
    print(f"wrote {a.out_json} and {a.out_md}")
    return 0 if all("error" not in r for r in rows) else 1


def summary(doc: dict) -> str:
    L = ["# circuitq exports in a real GPTQ runtime (gptqmodel, CPU torch kernel)", "",
         f"Command: `python analyses/gptq_runtime_check.py --bits {doc['bits']} --group-size {doc['group_size']} "
         f"--method {doc['method']}`  ", f"Machine: {doc['machine']}; {doc['seconds'] / 60:.1f} min.", "",
         f"Model: {doc['model']} ({doc['model_note'] or 'as loaded'}). {doc['bits']}-bit, group {doc['group_size']}, "
         f"asymmetric, {doc['method'].upper()}; masked rows keep a {doc['mask']} in 16-bit (sidecar). "
         f"{len(doc['prompts'])} fixed prompts × {doc['tokens_per_prompt']} tokens. The reference is circuitq's `hf/` "
         "export loaded by plain transformers in float16 (and float32); the runtime runs in float16.", "",
         "| mask | layout (checkpoint_format) | loader | sidecar | kernel | decoded vs circuitq grid (max abs) | "
         "max abs Δlogit vs hf fp16 | mean abs Δlogit | top-1 agreement | max abs Δlogit vs hf fp32 | "
         "hf fp16 vs hf fp32 (fp16 rounding alone): max / mean |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        head = (f"| {'masked' if r['masked'] else 'none'} ({r['n_16bit']} kept) | {r['format']} ({r['checkpoint_format']}) | "
                f"{r['loader']} | {'hooks' if r['sidecar'] else 'off'} |")
        if "error" in r:
            L.append(head + f" refused: {r['error']} | | | | | | |")
            continue
        dec = r["decoded_max_abs_vs_circuitq_grid"]
        L.append(head + f" {r['kernel']} | {dec if dec is not None else '—'} | {r['vs_hf_float16_max_abs']:.4g} | "
                 f"{r['vs_hf_float16_mean_abs']:.3g} | {r['vs_hf_float16_top1_agreement']:.3f} | "
                 f"{r['vs_hf_float32_max_abs']:.4g} | {r['hf_fp16_vs_fp32_max_abs']:.4g} / "
                 f"{r['hf_fp16_vs_fp32_mean_abs']:.3g} |")
    z = {r["zero_point_zero_groups"] for r in doc["rows"]}
    L += ["", f"Zero-point-0 groups in these exports: {', '.join(map(str, sorted(z)))} (the word-level v1 borrow is "
          "exercised by `tests/test_gptq_runtime.py`, which forces such groups).", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
