"""Writing quantized models that real tools load.

One output directory holds three things:

* ``hf/``: a plain Hugging Face model directory with the dequantized weights (``config.json``,
  tokenizer, ``model.safetensors``); ``AutoModelForCausalLM.from_pretrained`` loads it without
  circuitq.
* ``gptq/``: a packed GPTQ checkpoint in the layout of ``circuitq.model.packed`` (v1 or v2 zero
  points; ``auto``, the default, writes v2 for asymmetric grids, which gptqmodel requires, and v1
  for symmetric ones) with its 16-bit sidecar ``gptq/circuitq_sparse/``.
* ``circuitq.json``: the run's metadata, bit accounting and per-module errors.

``circuitq.model.packed.load_packed`` (what ``load_model`` calls for a ``gptq/`` directory)
rebuilds a model from ``gptq/`` whose weights equal ``hf/``'s exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from circuitq import __version__
from circuitq.artifacts import atomic_dir
from circuitq.model.arch import conv1d_layout
from circuitq.model.packed import (
    GPTQ_FORMATS,
    SPARSE_DIR,
    SPARSE_FILE,
    SPARSE_FORMAT,
    SPARSE_VERSION,
    ExportError,
    pack_gptq,
    resolve_gptq_format,
)
from circuitq.quant.quantizer import QuantizedWeight


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
def _unique_state(model: torch.nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """State dict without ``skip`` and without tensors that share storage with an earlier one
    (tied embeddings)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if k in skip:
            continue
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().cpu().contiguous()
    return out


def quantization_config(qweights: dict[str, QuantizedWeight], meta: dict) -> dict:
    """``quantization_config`` for ``config.json`` (gptqmodel ``dynamic`` rules for modules
    whose bits differ from the default)."""
    bits = int(meta["bits"])
    dynamic = {f"+:{name.replace('.', '[.]')}$": {"bits": qw.bits} for name, qw in qweights.items() if qw.bits != bits}
    cfg = {
        "quant_method": "gptq", "bits": bits, "group_size": int(meta["group_size"]),
        "desc_act": bool(meta.get("act_order", False)), "sym": bool(meta.get("sym", False)),
        "checkpoint_format": GPTQ_FORMATS[resolve_gptq_format(meta.get("gptq_format", "v1"), bool(meta.get("sym")))],
        "true_sequential": True, "static_groups": False,
        "damp_percent": float(meta.get("damp", 0.01)), "pack_dtype": "int32",
        "meta": {"quantizer": [f"circuitq:{__version__}"], "method": meta.get("method")},
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


def _write_sparse(dest: Path, qweights: dict[str, QuantizedWeight]) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    tensors, manifest = {}, {}
    for name, qw in qweights.items():
        manifest[name] = qw.nnz
        if qw.nnz:
            tensors[f"{name}.rows"] = qw.rows.int().contiguous()
            tensors[f"{name}.cols"] = qw.cols.int().contiguous()
            tensors[f"{name}.vals"] = qw.vals.half().contiguous()
    total = sum(manifest.values())
    meta = {"format": SPARSE_FORMAT, "version": SPARSE_VERSION, "semantics": "add", "nnz": str(total),
            "layout": "COO per module: rows, cols int32 sorted by row; vals float16 = W_kept - dequant(Q)"}
    save_file(tensors, str(dest / SPARSE_FILE), metadata=meta)
    (dest / "manifest.json").write_text(json.dumps({**meta, "nnz_per_module": manifest}, indent=2) + "\n")
    return manifest


def write_gptq(dest: Path, model, tokenizer, qweights: dict[str, QuantizedWeight], meta: dict) -> dict:
    """Write the packed checkpoint (layout ``meta["gptq_format"]``: auto, v1 or v2; default v1)
    and its 16-bit sidecar into ``dest``; returns facts for the manifest (zero-point-0 groups are
    counted; they round-trip through the word-level v1 convention)."""
    dest.mkdir(parents=True, exist_ok=True)
    fmt = resolve_gptq_format(meta.get("gptq_format", "v1"), bool(meta.get("sym")))
    tensors = _unique_state(model, {f"{n}.weight" for n in qweights})
    zero0 = 0
    for name, qw in qweights.items():
        for k, v in pack_gptq(qw, fmt).items():
            tensors[f"{name}.{k}"] = v
        zero0 += int((qw.zeros == 0).sum())
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg = quantization_config(qweights, meta)
    cfg["circuitq"] = meta
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    (dest / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    manifest = _write_sparse(dest / SPARSE_DIR, qweights)
    return {"zero_point_zero_groups": zero0, "nnz_per_module": manifest, "gptq_format": fmt,
            "checkpoint_format": GPTQ_FORMATS[fmt]}


def write_hf(dest: Path, model, tokenizer, meta: dict) -> None:
    """Plain HF directory of the (already dequantized) in-memory model."""
    model.config.circuitq = meta
    try:
        with conv1d_layout(model):   # a GPT-2 model's Conv1D modules as the family stores them
            model.save_pretrained(dest)
    finally:
        del model.config.circuitq
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)


def export_bytes(model, qweights: dict[str, QuantizedWeight]) -> int:
    """About what ``export_all`` writes: ``hf/`` (every unique tensor) + ``gptq/`` (the rest, the
    packed codes at ``bits`` per weight, scales/zeros, and 10 bytes per 16-bit weight)."""
    seen, full = set(), 0
    for t in model.state_dict().values():   # tied tensors once, nothing copied
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            full += t.numel() * t.element_size()
    lin = sum(qw.codes.numel() * 4 for qw in qweights.values())
    packed = sum(qw.codes.numel() * qw.bits // 8 + qw.scales.numel() * 3 + qw.nnz * 10 for qw in qweights.values())
    return 2 * full - lin + packed


def export_all(out: str | Path, model, tokenizer, qweights: dict[str, QuantizedWeight], meta: dict,
               summary: dict, *, overwrite: bool = False) -> Path:
    """Write ``hf/``, ``gptq/`` and ``circuitq.json`` into ``out`` atomically. Every tensor of
    the model must be finite (a NaN in a weight the quantizer does not touch, such as
    ``embed_tokens``, is refused before anything is written)."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ExportError(f"the model holds NaN/Inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; it is "
                          "corrupt, so nothing was written: reload the original model")
    with atomic_dir(out, overwrite=overwrite, need_bytes=export_bytes(model, qweights)) as tmp:
        write_hf(tmp / "hf", model, tokenizer, meta)
        facts = write_gptq(tmp / "gptq", model, tokenizer, qweights, meta)
        doc = {"format": "circuitq.quantized", "version": __version__, "metadata": meta, **summary,
               "exports": {"hf": "hf/", "gptq": "gptq/", "sparse": f"gptq/{SPARSE_DIR}/{SPARSE_FILE}"},
               "zero_point_zero_groups": facts["zero_point_zero_groups"],
               "gptq_format": facts["gptq_format"], "checkpoint_format": facts["checkpoint_format"]}
        (tmp / "circuitq.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return Path(out)
