"""Logits of a circuitq ``gptq/`` export as gptqmodel runs it; runs in gptqmodel's own venv.

    .venv-gptqmodel/bin/python analyses/gptqmodel_logits.py GPTQ_DIR IDS.json OUT.safetensors [--loader gptqmodel|transformers]

Not imported by circuitq (a different venv, without circuitq): ``analyses/gptq_runtime_check.py``
and the marked test ``tests/test_gptq_runtime.py`` call it as a subprocess.

* ``--loader gptqmodel`` (default): ``GPTQModel.load(GPTQ_DIR, device="cpu", backend=BACKEND.TORCH)``,
  gptqmodel's pure-torch CPU kernel.
* ``--loader transformers``: ``AutoModelForCausalLM.from_pretrained(GPTQ_DIR)``, which goes through
  optimum's GPTQ integration (and gptqmodel's kernels underneath).

The 16-bit entries of a masked model live in ``GPTQ_DIR/circuitq_sparse/outliers.safetensors``
as an additive COO residual per linear module (``rows``, ``cols``, ``vals`` with
``W_kept = dequant(Q) + R``). With ``--sidecar`` (the default) they are added in forward hooks,
``y += x @ R^T``, which is how a serving stack would apply them without circuitq; with
``--no-sidecar`` the plain quantized grid runs.

IDS.json: ``[[token ids], ...]`` (equal lengths). OUT.safetensors gets ``logits`` ``[prompts, seq, vocab]``
float32 and ``decoded.<module>`` ``[out, in]`` float32, gptqmodel's decoding of every layer-0 module
(without the sidecar: the plain grid), for the exactness check;
prints one JSON line with the loader, the kernel class and timings.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def sidecar(gptq_dir: str) -> dict:
    """``{module name: dense [out, in] float32 residual}`` from circuitq's COO file (empty when absent)."""
    path = os.path.join(gptq_dir, "circuitq_sparse", "outliers.safetensors")
    if not os.path.exists(path):
        return {}
    parts: dict = {}
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("semantics") != "add":
            raise SystemExit(f"{path}: expected additive semantics, got {meta}")
        for k in fh.keys():
            name, part = k.rsplit(".", 1)
            parts.setdefault(name, {})[part] = fh.get_tensor(k)
    return parts


def attach(model: torch.nn.Module, parts: dict) -> int:
    """Forward hooks adding ``x @ R^T`` to every module with residual entries; returns how many."""
    mods = dict(model.named_modules())
    n = 0
    for name, p in parts.items():
        mod = mods.get(name) or mods.get("model." + name)
        if mod is None:
            raise SystemExit(f"sidecar names {name}, which the loaded model does not have")
        out_f, in_f = int(mod.out_features), int(mod.in_features)
        R = torch.zeros(out_f, in_f, dtype=torch.float32)
        R[p["rows"].long(), p["cols"].long()] = p["vals"].float()

        def hook(m, args, y, R=R):
            return y + (args[0].to(torch.float32) @ R.T).to(y.dtype)

        mod.register_forward_hook(hook)
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gptq_dir")
    ap.add_argument("ids")
    ap.add_argument("out")
    ap.add_argument("--loader", choices=("gptqmodel", "transformers"), default="gptqmodel")
    ap.add_argument("--no-sidecar", dest="sidecar", action="store_false")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    ids = torch.tensor(json.load(open(a.ids)), dtype=torch.long)
    t0 = time.perf_counter()
    if a.loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        wrapped = GPTQModel.load(a.gptq_dir, device="cpu", backend=BACKEND.TORCH, dtype=dtype)
        model = wrapped.model
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.gptq_dir, dtype=dtype, device_map="cpu")
    load_s = time.perf_counter() - t0
    model.eval()
    qmods = [(n, m) for n, m in model.named_modules() if hasattr(m, "qweight")]
    if not qmods:
        raise SystemExit("the loaded model has no quantized linear modules")
    kernel = type(qmods[0][1]).__name__
    tensors = {}
    layer0 = [(n, m) for n, m in qmods if ".layers.0." in n] or qmods[:1]
    for name, mod in layer0:    # gptqmodel's own decoding of every layer-0 module: [in, out] -> [out, in]
        tensors[f"decoded.{name}"] = mod.dequantize_weight().T.float().contiguous()
    hooked = attach(model, sidecar(a.gptq_dir)) if a.sidecar else 0
    t1 = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    fwd_s = time.perf_counter() - t1
    tensors["logits"] = logits.contiguous()
    save_file(tensors, a.out)
    print(json.dumps({"loader": a.loader, "kernel": kernel, "modules": len(qmods), "sidecar_modules": hooked,
                      "dtype": a.dtype, "load_seconds": round(load_s, 2), "forward_seconds": round(fwd_s, 3),
                      "gptqmodel": __import__("gptqmodel").__version__, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
