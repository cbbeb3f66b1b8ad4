"""The packed GPTQ checkpoint format, read and written by the same bit layout.

A ``gptq/`` directory (circuitq's export, or another tool's v1/v2 checkpoint) holds, per module:
``qweight`` ``[in·bits/32, out]`` int32 packed along the input dimension, ``qzeros``
``[groups, out·bits/32]`` int32, ``scales`` ``[groups, out]`` float16, ``g_idx`` ``[in]`` int32;
``config.json`` carries ``quantization_config`` (quant_method gptq, bits, group_size, desc_act,
sym, checkpoint_format). Two zero-point conventions (``GPTQ_FORMATS``):

- ``v1`` (checkpoint_format ``gptq``, what AutoGPTQ, optimum and most servers read): ``qzeros``
  hold ``zero − 1``, subtracted word by word with borrow as the runtimes do (``pack_zeros_v1``);
- ``v2`` (checkpoint_format ``gptq_v2``, gptqmodel's native format): ``qzeros`` hold the zero
  points themselves.

Entries kept in 16-bit hold their nearest code, and ``gptq/circuitq_sparse/`` holds them as an
additive COO residual per module (``rows``, ``cols`` int32 sorted by row, ``vals`` float16 =
``W_kept − dequant(Q)``) with a manifest of nnz per module.

Packing is a little-endian bit stream: code ``k`` of a column occupies stream bits
``[bits·k, bits·k + bits)`` and every 32 stream bits form one int32 word. For 2, 4 and 8 bits this
is the familiar ``word |= q << (bits·j)``; for 3 bits it is GPTQ's 10-10-(2+1)... layout.

This module sits below model loading (``model.loading`` decodes packed checkpoints with
``load_packed``) and below the writers (``quant.export``), so neither imports upwards. Weights
decoded here equal the ``hf/`` export's exactly: both go through ``QuantizedWeight.dequantize``.
Memory of ``load_packed``: the model at ``dtype`` plus one module's codes and one dequantized
weight at a time.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from circuitq.errors import CircuitqError
from circuitq.model.arch import ARCHITECTURES, as_linear
from circuitq.quant.quantizer import QuantizedWeight

SPARSE_FORMAT = "circuitq.sparse16"
SPARSE_VERSION = "1"
SPARSE_DIR = "circuitq_sparse"
SPARSE_FILE = "outliers.safetensors"


class ExportError(CircuitqError, ValueError):
    """A packed checkpoint or an export that cannot be written or read as it is."""


# ---------------------------------------------------------------------------------------------
# bit packing (pure)
# ---------------------------------------------------------------------------------------------
def _cycle(bits: int) -> tuple[int, int]:
    """(values, int32 words) of the smallest whole packing cycle."""
    lcm = bits * 32 // math.gcd(bits, 32)
    return lcm // bits, lcm // 32


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[K, N]`` codes in ``[0, 2^bits)`` along dim 0 into ``[K·bits/32, N]`` int32."""
    K, N = values.shape
    nv, nw = _cycle(bits)
    if K % nv:
        raise ExportError(f"cannot pack {K} values of {bits} bits: the dimension must be a multiple of {nv}")
    v = values.to(torch.int64).reshape(K // nv, nv, N)
    out = torch.zeros(K // nv, nw, N, dtype=torch.int64)
    for k in range(nv):
        for b in range(bits):
            pos = bits * k + b
            out[:, pos // 32] |= ((v[:, k] >> b) & 1) << (pos % 32)
    out = out.reshape(K // nv * nw, N)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: ``[K·bits/32, N]`` int32 -> ``[K, N]`` uint8."""
    R, N = packed.shape
    nv, nw = _cycle(bits)
    p = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(R // nw, nw, N)
    v = torch.zeros(R // nw, nv, N, dtype=torch.int64)
    for k in range(nv):
        for b in range(bits):
            pos = bits * k + b
            v[:, k] |= ((p[:, pos // 32] >> (pos % 32)) & 1) << b
    return v.reshape(R // nw * nv, N).to(torch.uint8)


def _ones_word(bits: int) -> int:
    """A 1 in every field of an int32 word: 0x55555555 (2-bit), 0x11111111 (4), 0x01010101 (8)."""
    return sum(1 << (bits * j) for j in range(32 // bits))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_zeros_v1(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ v1 ``qzeros`` ``[groups, out·bits/32]`` int32 from zero points ``[groups, out]``.

    v1 stores ``zero − 1``. For 2, 4 and 8 bits the runtimes (AutoGPTQ, gptqmodel's v1->v2
    conversion, exllama) do that subtraction on the whole packed word, so a zero point of 0 borrows
    from its neighbour field: ``v1 word = v2 word − 0x11…1 (mod 2^32)``, read back by adding
    the same constant. 3-bit words are converted field by field (``(zero − 1) & maxq``). Worked
    example (4-bit, fields low to high [0, 9, 0, 0, 0, 0, 0, 0]): v2 word 0x90, v1 word
    0x90 − 0x11111111 = 0xEEEEEF7F."""
    if 32 % bits:
        return pack_rows(((zeros.to(torch.int64) - 1) & (2 ** bits - 1)).T, bits).T.contiguous()
    v2 = pack_rows(zeros.T, bits).to(torch.int64) & 0xFFFFFFFF
    return _to_int32(v2 - _ones_word(bits)).T.contiguous()


def unpack_zeros_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_zeros_v1``: zero points ``[groups, out]`` uint8."""
    if 32 % bits:
        return ((unpack_rows(qzeros.T.contiguous(), bits).T.to(torch.int64) + 1) & (2 ** bits - 1)).to(torch.uint8)
    v2 = _to_int32((qzeros.to(torch.int64) & 0xFFFFFFFF) + _ones_word(bits))
    return unpack_rows(v2.T.contiguous(), bits).T.contiguous()


def pack_zeros_v2(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ v2 (gptqmodel's native) ``qzeros`` ``[groups, out·bits/32]`` int32: the zero points
    ``[groups, out]`` themselves, packed along the output dimension."""
    return pack_rows(zeros.T, bits).T.contiguous()


def unpack_zeros_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_zeros_v2``: zero points ``[groups, out]`` uint8."""
    return unpack_rows(qzeros.T.contiguous(), bits).T.contiguous()


GPTQ_FORMATS = {"v1": "gptq", "v2": "gptq_v2"}   # circuitq's name -> quantization_config.checkpoint_format
_ZEROS = {"v1": (pack_zeros_v1, unpack_zeros_v1), "v2": (pack_zeros_v2, unpack_zeros_v2)}


def resolve_gptq_format(fmt: str, sym: bool) -> str:
    """``auto`` -> ``v2`` for an asymmetric grid (gptqmodel loads only its own asymmetric v1
    files), ``v1`` for a symmetric one; ``v1``/``v2`` as given."""
    if fmt == "auto":
        return "v1" if sym else "v2"
    if fmt not in GPTQ_FORMATS:
        raise ExportError(f"unknown GPTQ checkpoint format {fmt!r}; use auto, v1 or v2")
    return fmt


def format_of(checkpoint_format: str | None) -> str:
    """circuitq's name of a ``quantization_config.checkpoint_format`` (absent = v1)."""
    by_value = {v: k for k, v in GPTQ_FORMATS.items()}
    cf = checkpoint_format or "gptq"
    if cf not in by_value:
        raise ExportError(f"checkpoint_format {cf!r} is not a GPTQ layout circuitq reads (gptq, gptq_v2)")
    return by_value[cf]


def pack_gptq(qw: QuantizedWeight, fmt: str = "v1") -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one module (without the module prefix) in layout ``fmt``."""
    return {
        "qweight": pack_rows(qw.codes.T, qw.bits),
        "qzeros": _ZEROS[fmt][0](qw.zeros, qw.bits),
        "scales": qw.scales.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def pack_gptq_v1(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The four GPTQ v1 tensors of one module (without the module prefix)."""
    return pack_gptq(qw, "v1")


def unpack_gptq(t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                fmt: str = "v1") -> QuantizedWeight:
    """Rebuild a ``QuantizedWeight`` from the packed tensors (and an optional COO residual)."""
    codes = unpack_rows(t["qweight"], bits).T.contiguous()
    zeros = _ZEROS[fmt][1](t["qzeros"], bits)
    e = torch.zeros(0, dtype=torch.int32)
    rows, cols, vals = sparse if sparse is not None else (e, e.clone(), torch.zeros(0, dtype=torch.float16))
    return QuantizedWeight(codes, t["scales"], zeros.contiguous(), t["g_idx"], bits, group_size, sym, rows, cols, vals)


def unpack_gptq_v1(t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                   sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> QuantizedWeight:
    """Rebuild a ``QuantizedWeight`` from v1 tensors (and an optional COO residual)."""
    return unpack_gptq(t, bits, group_size, sym, sparse, "v1")


# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------
def read_sparse(path: Path, required: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The 16-bit sidecar of a ``gptq/`` directory, checked against its ``manifest.json`` (nnz per
    module). ``required``: the checkpoint is circuitq's, so the sidecar must be there."""
    d = path / SPARSE_DIR
    f = d / SPARSE_FILE
    man = d / "manifest.json"
    if not f.exists():
        if man.exists() or required:
            raise ExportError(f"{f} is missing although {'its manifest.json lists' if man.exists() else 'this circuitq export has'} "
                              "16-bit weights; the export is incomplete: export it again")
        return {}
    expected = None
    if man.exists():
        try:
            expected = json.loads(man.read_text())["nnz_per_module"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ExportError(f"{man} is unreadable; export the model again") from None
    out: dict[str, list] = {}
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != SPARSE_FORMAT or meta.get("semantics") != "add":
                raise ExportError(f"{f} is not a {SPARSE_FORMAT} file with additive semantics (metadata {meta})")
            for k in fh.keys():
                name, _, part = k.rpartition(".")
                if part not in ("rows", "cols", "vals"):
                    raise ExportError(f"{f}: unexpected tensor {k!r}")
                out.setdefault(name, [None, None, None])[["rows", "cols", "vals"].index(part)] = fh.get_tensor(k)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors on a damaged file
        raise ExportError(f"{f} cannot be read ({' '.join(str(e).split())[:120]}); export the model again") from None
    for name, parts in out.items():
        if any(t is None for t in parts) or not (parts[0].dim() == parts[1].dim() == parts[2].dim() == 1) or \
                not (parts[0].numel() == parts[1].numel() == parts[2].numel()):
            raise ExportError(f"{f}: the sidecar of {name} needs rows, cols and vals of one length each")
    if expected is not None:
        for name, nnz in expected.items():
            have = out[name][0].numel() if name in out else 0
            if have != int(nnz):
                raise ExportError(f"{f}: {name} holds {have} 16-bit weights but manifest.json lists {nnz}; the "
                                  "export is damaged: export it again")
    return {k: tuple(v) for k, v in out.items()}


def check_module(name: str, t: dict[str, torch.Tensor], sparse, bits: int, group_size: int,
                 shape: tuple[int, int], where: Path) -> None:
    """Refuse packed tensors that do not fit the module's ``[out, in]`` weight, naming the tensor."""
    out_f, in_f = shape
    groups = t["scales"].shape[0] if t["scales"].dim() == 2 else -1
    want = {"qweight": (in_f * bits // 32, out_f), "qzeros": (groups, out_f * bits // 32), "scales": (groups, out_f),
            "g_idx": (in_f,)}
    for k, shp in want.items():
        if tuple(t[k].shape) != shp:
            raise ExportError(f"{where}: {name}.{k} has shape {tuple(t[k].shape)}, but a {bits}-bit [{out_f}, {in_f}] "
                              f"weight needs {shp}; the checkpoint is damaged or not for this config")
    if t["g_idx"].numel() and (int(t["g_idx"].min()) < 0 or int(t["g_idx"].max()) >= groups):
        raise ExportError(f"{where}: {name}.g_idx points outside its {groups} groups; the checkpoint is damaged")
    if sparse is not None and sparse[0].numel():
        rows, cols = sparse[0], sparse[1]
        if int(rows.min()) < 0 or int(rows.max()) >= out_f or int(cols.min()) < 0 or int(cols.max()) >= in_f:
            raise ExportError(f"{where.parent / SPARSE_DIR / SPARSE_FILE}: the 16-bit sidecar of {name} has an index outside its [{out_f}, {in_f}] "
                              "weight; the export is damaged: export it again")


def load_packed(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Rebuild a plain HF model from a circuitq ``gptq/`` directory (codes + 16-bit sidecar)."""
    path = Path(path)
    if (path / "gptq").is_dir():
        path = path / "gptq"
    if not (path / "model.safetensors").exists():
        raise ExportError(f"{path} holds no packed checkpoint (model.safetensors missing)")
    cfg = AutoConfig.from_pretrained(path)
    q = cfg.quantization_config
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if cfg.model_type in ARCHITECTURES:
        as_linear(model)   # codes are [out, in]; GPT-2's Conv1D modules become nn.Linear, as circuitq reads them
    sparse = read_sparse(path, required=getattr(cfg, "circuitq", None) is not None)
    dyn = {k[2:]: v for k, v in (q.get("dynamic") or {}).items()}
    fmt = format_of(q.get("checkpoint_format"))
    f = path / "model.safetensors"
    try:
        with safe_open(str(f), framework="pt") as fh:
            keys = set(fh.keys())
            state = {k: fh.get_tensor(k) for k in keys
                     if not k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")}
            modules = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(".qweight")})
            for name in modules:
                lost = [p for p in ("qzeros", "scales", "g_idx") if f"{name}.{p}" not in keys]
                if lost:
                    raise ExportError(f"{f}: {name} has a qweight but no {', '.join(lost)}; the checkpoint is damaged")
                t = {p: fh.get_tensor(f"{name}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx")}
                bits = next((v["bits"] for pat, v in dyn.items() if re.search(pat, name)), q["bits"])
                try:
                    shape = tuple(model.get_submodule(name).weight.shape)
                except AttributeError:
                    raise ExportError(f"{f}: {name} is not a module of this model's config") from None
                check_module(name, t, sparse.get(name), bits, q["group_size"], shape, f)
                qw = unpack_gptq(t, bits, q["group_size"], q["sym"], sparse.get(name), fmt)
                state[f"{name}.weight"] = qw.dequantize(dtype)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors on a damaged or truncated file
        raise ExportError(f"{f} cannot be read ({' '.join(str(e).split())[:120]}); the checkpoint is damaged") from None
    stray = sorted(set(sparse) - set(modules))
    if stray:
        raise ExportError(f"{path / SPARSE_DIR / SPARSE_FILE} holds 16-bit weights of {stray[:3]}, which have no packed "
                          "codes; the export is damaged")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"packed checkpoint does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.to(device).eval()
