"""``circuitq`` command line: parses arguments and calls the library. Defaults come from the
library's config dataclasses."""
from __future__ import annotations

import argparse
import sys
import time

from . import __version__
from .calib import CalibConfig
from .models import DEFAULT_MODEL
from .quantize import QuantizeConfig

_QD, _CD = QuantizeConfig(), CalibConfig()


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with (mask-aware) GPTQ or RTN and export it",
                       description="Quantize every decoder linear weight; weights in --mask stay 16-bit. "
                                   "Writes OUT/hf (plain HF model), OUT/gptq (packed GPTQ v1 + 16-bit sidecar) "
                                   "and OUT/circuitq.json.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias {DEFAULT_MODEL}, a local HF directory or a hub id")
    p.add_argument("--mask", help="safetensors mask (HF weight name -> bool) or a TaCQ torch-saved dict")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=_QD.bits)
    p.add_argument("--group-size", type=int, default=_QD.group_size, help="-1 = per output channel")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--mse", action="store_true", help="MSE clipping search for scales")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    p.add_argument("--method", choices=["gptq", "rtn"], default=_QD.method)
    p.add_argument("--plan", nargs="*", metavar="PATTERN=BITS",
                   help="per-weight bits by HF name regex (exact name first, then first match; 16 keeps)")
    p.add_argument("--calib", default=_CD.source, help="gsm8k, mmlu or text:PATH (.txt/.jsonl)")
    p.add_argument("--samples", type=int, default=_CD.samples)
    p.add_argument("--seq-len", type=int, default=_CD.seq_len)
    p.add_argument("--seed", type=int, default=_CD.seed)
    p.add_argument("--data-dir", help="folder with mmlu/ and gsm8k/ in their public layouts")
    p.add_argument("--batch-size", type=int, default=_QD.batch_size)
    p.add_argument("--damp", type=float, default=_QD.damp)
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--ppl-windows", type=int, default=16, help="held-out windows for perplexity (0 = skip)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_quantize)


def _device(arg: str | None) -> str:
    import torch

    if arg:
        if arg.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {arg} asked for, but no CUDA device is available")
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_quantize(a: argparse.Namespace) -> int:
    import torch

    from .artifacts import check_writable
    from .calib import build_calibration
    from .evals import perplexity
    from .export import export_all
    from .masks import load_masks, mask_fraction, validate_masks
    from .models import load_model
    from .plan import PrecisionPlan
    from .quantize import quantize_model, target_shapes
    from .quantizer import QuantSpec

    check_writable(a.out, a.overwrite)
    QuantSpec(bits=a.bits, group_size=a.group_size)  # validate early
    plan = PrecisionPlan.parse(a.bits, a.plan)
    torch.manual_seed(a.seed)
    device = _device(a.device)
    lm = load_model(a.model, device="cpu")
    shapes = target_shapes(lm.model)
    for name, (_, in_f) in shapes.items():
        QuantSpec(bits=a.bits, group_size=a.group_size).n_groups(in_f)
    masks, mask_meta = None, {}
    if a.mask:
        mf = load_masks(a.mask)
        missing = validate_masks(mf.masks, shapes)
        if missing:
            print(f"[circuitq] the mask does not mention {len(missing)} targeted weights; they get no 16-bit entries")
        masks, mask_meta = mf.masks, mf.metadata
        print(f"[circuitq] mask {a.mask}: {mask_fraction(masks):.4%} of the weights it covers stay 16-bit")
    ccfg = CalibConfig(a.calib, a.samples, a.seq_len, a.seed)
    data = build_calibration(ccfg, lm.tokenizer, a.data_dir, heldout_windows=max(a.ppl_windows, 1))
    qcfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=a.sym, mse=a.mse, method=a.method,
                          damp=a.damp, act_order=a.act_order, batch_size=a.batch_size)
    ppl_before = perplexity(lm.model, data.heldout, a.batch_size) if a.ppl_windows else None
    res = quantize_model(lm.model, data.calib if a.method == "gptq" else None, plan, qcfg, masks, device)
    ppl_after = perplexity(lm.model, data.heldout, a.batch_size) if a.ppl_windows else None
    meta = {"model": a.model, "model_source": lm.source, "model_note": lm.note, "method": a.method,
            "bits": a.bits, "group_size": a.group_size, "sym": a.sym, "mse": a.mse, "act_order": a.act_order,
            "damp": a.damp, "plan": plan.to_dict(), "calib": ccfg.source, "samples": a.samples,
            "seq_len": a.seq_len, "seed": a.seed, "mask": a.mask, "mask_metadata": mask_meta,
            "device": device, "circuitq_version": __version__, "average_bits": res.bits.average_bits}
    summary = {**res.summary(), "heldout_perplexity": {"original": ppl_before, "quantized": ppl_after,
                                                       "windows": int(data.heldout.shape[0])}}
    out = export_all(a.out, lm.model, lm.tokenizer, res.qweights, meta, summary, a.overwrite)
    print(f"[circuitq] {a.method} {a.bits}-bit in {res.seconds:.1f}s, average {res.bits.average_bits:.4f} bits/weight, "
          f"{res.bits.nnz} weights in 16-bit" + (f"; held-out perplexity {ppl_before:.3f} -> {ppl_after:.3f}" if ppl_after else ""))
    print(f"[circuitq] wrote {out}/hf (HF model), {out}/gptq (packed GPTQ v1 + sparse 16-bit sidecar), {out}/circuitq.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="circuitq", description="Task-Circuit Quantization (TaCQ) toolkit")
    p.add_argument("--version", action="version", version=f"circuitq {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .arch import UnsupportedArchitecture
    from .data import DataError
    from .export import ExportError
    from .gptq import HessianError
    from .masks import MaskError
    from .models import ModelLoadError

    known = (UnsupportedArchitecture, DataError, ExportError, HessianError, MaskError, ModelLoadError,
             FileExistsError, ValueError, FloatingPointError)
    t0 = time.perf_counter()
    try:
        rc = args.func(args)
    except known as e:
        print(f"circuitq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitq: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    print(f"[circuitq] {args.command} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
