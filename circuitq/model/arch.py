"""Per-architecture facts, one row per model family (never a copied driver).

A row (``ArchSpec``) says, for one family:

* where the decoder layers live (``layers``) and which modules run before them;
* each targeted linear module: its HF path inside a layer, its short type name (``q_proj``), the
  TransformerLens 4.x bridge component whose ``hook_in``/``hook_out`` see its input and output
  gradient (``attn.q``), and what its rows and columns are (query heads, KV heads, MLP neurons);
* the true-sequential groups of modules that read the same input (one Hessian serves a group).

Everything else in circuitq is keyed by HF *weight* name
(``model.layers.3.self_attn.q_proj.weight``); the helpers here build and parse those names, so no
other module hard-codes ``model.layers`` or ``q_proj``.

``Geometry`` holds the numbers a circuit map needs (layers, query heads, KV heads, head size,
MLP width); it is read from the model config.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.pytorch_utils import Conv1D

from circuitq.errors import CircuitqError, UsageError


class Segment(NamedTuple):
    """A block of a fused linear's output rows with its own meaning, stacked in ``Linear.segments``
    order (Phi-3's ``qkv_proj``: q, k, v; ``gate_up_proj``: gate, up)."""

    kind: str          # the module it stands for, e.g. "q_proj" (a column of the circuit maps)
    rows: str | None   # what its rows index: "q_heads", "kv_heads" or "neurons"
    size: str          # its number of rows, from the Geometry: "q" (n_heads·head_dim), "kv", "mlp" (d_mlp)
    tl: str | None = None   # the bridge component whose hooks see this block alone (None: the fused hooks)


class Linear(NamedTuple):
    """One targeted linear module of a layer. ``rows``/``cols``: what the weight's output rows and
    input columns index: ``"q_heads"``, ``"kv_heads"``, ``"neurons"`` or ``None`` (the residual).
    A fused module (``segments``) stacks several modules' rows; its ``tl`` (when not None) sees the
    whole fused output, else each segment's ``tl`` sees its block."""

    path: str          # inside a layer, e.g. "self_attn.q_proj"
    tl: str | None     # TransformerLens bridge component inside a block, e.g. "attn.q"
    rows: str | None
    cols: str | None
    segments: tuple[Segment, ...] = ()
    as_kind: str | None = None   # the map column of a module named otherwise (GPT-NeoX's attention.dense: "o_proj")
    interleaved: bool = False    # segments interleaved per head (GPT-NeoX: q0 k0 v0 q1 k1 v1 …), else stacked
    transposed: bool = False     # stored [in, out] (GPT-2's Conv1D); circuitq works on it as an nn.Linear ([out, in])

    @property
    def kind(self) -> str:
        """Short module type, e.g. ``q_proj`` (``MODULE_TYPES``' name for a module named otherwise)."""
        return self.as_kind or self.path.rsplit(".", 1)[-1]

    @property
    def attention(self) -> bool:
        """Whether the module belongs to attention (an axis indexes heads)."""
        return "heads" in f"{self.rows}{self.cols}" or any("heads" in f"{s.rows}" for s in self.segments)

    def parts(self, geo: "Geometry") -> list[tuple[str, str | None, str | None, "slice | torch.Tensor"]]:
        """``(module kind, rows meaning, cols meaning, rows)`` of each module this weight holds:
        itself, or each segment's rows (sizes from ``geo``): a ``slice`` when the segments are
        stacked, an int64 index (in the segment's own row order, head-major) when they are
        interleaved per head. ``weight[rows]`` is the segment's block either way (a view for a slice)."""
        if not self.segments:
            return [(self.kind, self.rows, self.cols, slice(None))]
        if self.interleaved:   # per head h: [seg0 rows of h, seg1 rows of h, …]; every segment's rows split over heads
            per = [geo.rows_of(seg.size) // geo.n_heads for seg in self.segments]
            stride, out, off = sum(per), [], 0
            for seg, n in zip(self.segments, per):
                idx = (torch.arange(geo.n_heads)[:, None] * stride + off + torch.arange(n)).reshape(-1)
                out.append((seg.kind, seg.rows, self.cols, idx))
                off += n
            return out
        out, r0 = [], 0
        for seg in self.segments:
            n = geo.rows_of(seg.size)
            out.append((seg.kind, seg.rows, self.cols, slice(r0, r0 + n)))
            r0 += n
        return out


_LLAMA_LINEARS = (
    Linear("self_attn.q_proj", "attn.q", "q_heads", None),
    Linear("self_attn.k_proj", "attn.k", "kv_heads", None),
    Linear("self_attn.v_proj", "attn.v", "kv_heads", None),
    Linear("self_attn.o_proj", "attn.o", None, "q_heads"),
    Linear("mlp.gate_proj", "mlp.gate", "neurons", None),
    Linear("mlp.up_proj", "mlp.in", "neurons", None),
    Linear("mlp.down_proj", "mlp.out", None, "neurons"),
)


@dataclass(frozen=True)
class ArchSpec:
    layers: str = "model.layers"
    pre_layers: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")
    linears: tuple[Linear, ...] = _LLAMA_LINEARS
    groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    mlp_act: str = "mlp.act_fn"   # the activation inside a layer (down_proj input = act(gate) * up)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)

    @property
    def module_types(self) -> tuple[str, ...]:
        return tuple(lin.kind for lin in self.linears)

    def linear(self, kind_or_path: str) -> Linear:
        for lin in self.linears:
            if kind_or_path in (lin.kind, lin.path, lin.tl):
                return lin
        raise KeyError(f"no linear module '{kind_or_path}' in this architecture")

    def tl_of(self, kind: str) -> str | None:
        """The bridge component whose hooks see module ``kind`` (``gate_proj``), fused or not."""
        for lin in self.linears:
            if lin.kind == kind:
                return lin.tl
            for seg in lin.segments:
                if seg.kind == kind:
                    return seg.tl
        return None

    @property
    def fused_hooks(self) -> bool:
        """Whether a fused module is seen through its own hooks (which the bridge's step-by-step
        attention does not run: it splits the fused weight into copies)."""
        return any(lin.segments and lin.tl for lin in self.linears)

    def weight_name(self, layer: int, path: str) -> str:
        """HF weight name of module ``path`` in decoder layer ``layer``."""
        return f"{self.layers}.{layer}.{path}.weight"

    def parse(self, weight_name: str) -> tuple[int, Linear] | None:
        """``(layer, Linear)`` of an HF weight name, or None when it is not a targeted weight."""
        m = re.fullmatch(re.escape(self.layers) + r"\.(\d+)\.(.+)\.weight", weight_name)
        if not m:
            return None
        for lin in self.linears:
            if lin.path == m.group(2):
                return int(m.group(1)), lin
        return None


_LLAMA_LIKE = ArchSpec()
# Families whose decoder layers name their linears as Llama does (q/k/v/o_proj, gate/up/down_proj,
# unfused, [out, in]); what differs between them (q/k norms in Qwen3, OLMo 2 and Gemma 3; GeGLU,
# sandwich norms and soft-capping in Gemma 2/3; tied embeddings; head_dim ≠ d/n_heads) lives
# outside the targeted weights, and each row is checked end to end on a tiny random config
# (tests/test_families.py: per-sample gradients = autograd, scores, mask, masked GPTQ, export,
# circuit maps, faithfulness units).
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
}
# Phi-3: q, k and v stacked in one qkv_proj, gate and up in one gate_up_proj (each [out, in]). HF's
# attention (sdpa/eager, which circuitq's gradient pass runs) calls qkv_proj, seen by the bridge's
# attn.qkv hooks; the bridge's MLP runs gate and up as split copies, seen by mlp.gate and mlp.in.
ARCHITECTURES["phi3"] = ArchSpec(
    linears=(
        Linear("self_attn.qkv_proj", "attn.qkv", None, None,
               (Segment("q_proj", "q_heads", "q"), Segment("k_proj", "kv_heads", "kv"),
                Segment("v_proj", "kv_heads", "kv"))),
        Linear("self_attn.o_proj", "attn.o", None, "q_heads"),
        Linear("mlp.gate_up_proj", None, None, None,
               (Segment("gate_proj", "neurons", "mlp", "mlp.gate"), Segment("up_proj", "neurons", "mlp", "mlp.in"))),
        Linear("mlp.down_proj", "mlp.out", None, "neurons"),
    ),
    groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
)
_QKV = (Segment("q_proj", "q_heads", "q"), Segment("k_proj", "kv_heads", "kv"), Segment("v_proj", "kv_heads", "kv"))


def _fused_qkv_two_matrix_mlp(layers: str, pre_layers: tuple[str, ...], qkv: str, o: str, up: str, down: str,
                              **layout) -> ArchSpec:
    """A family with one fused q|k|v module and a gateless two-matrix MLP (GPT-NeoX, GPT-2): its
    module paths; ``layout``: ``interleaved`` or ``transposed`` (``Linear``'s flags)."""
    flat = {k: v for k, v in layout.items() if k == "transposed"}
    return ArchSpec(
        layers=layers, pre_layers=pre_layers,
        linears=(Linear(qkv, "attn.qkv", None, None, _QKV, **layout),
                 Linear(o, "attn.o", None, "q_heads", as_kind="o_proj", **flat),
                 Linear(up, "mlp.in", "neurons", None, as_kind="up_proj", **flat),
                 Linear(down, "mlp.out", None, "neurons", as_kind="down_proj", **flat)),
        groups=((qkv,), (o,), (up,), (down,)), mlp_act="mlp.act")


# GPT-NeoX / Pythia: q, k, v interleaved per head in one query_key_value ([3·d, d], rows head-major:
# q_h, k_h, v_h for each head h, as HF's GPTNeoXAttention views its output [.., heads, 3·head_dim]); a
# two-matrix MLP (no gate) with its activation at ``mlp.act``; parallel residual (attention and MLP
# read two norms of the same stream, so the true-sequential groups stay attention, then MLP). The
# bridge's JointQKV attention runs the HF module, seen by attn.qkv's hooks.
ARCHITECTURES["gpt_neox"] = _fused_qkv_two_matrix_mlp(
    "gpt_neox.layers", ("gpt_neox.embed_in", "gpt_neox.rotary_emb"), "attention.query_key_value",
    "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", interleaved=True)
# GPT-2: Conv1D modules (weight stored [in, out]); c_attn stacks q, k, v (in its output features); a
# two-matrix MLP (c_fc, c_proj) with its activation at ``mlp.act``; learned position embeddings.
# circuitq replaces each Conv1D by an equal nn.Linear when it first reads the model (``as_linear``),
# so every stage sees [out, in]; the hf/ export writes the Conv1D layout back (``conv1d_layout``).
ARCHITECTURES["gpt2"] = _fused_qkv_two_matrix_mlp(
    "transformer.h", ("transformer.wte", "transformer.wpe"), "attn.c_attn", "attn.c_proj", "mlp.c_fc",
    "mlp.c_proj", transposed=True)
MODULE_TYPES = _LLAMA_LIKE.module_types   # the order of the layer × module maps (a fused module's segments too)
_ALL_LINEARS = {lin.path: lin for spec in ARCHITECTURES.values() for lin in spec.linears}


class UnsupportedArchitecture(CircuitqError, ValueError):
    pass


def arch_for(model_type: str) -> ArchSpec:
    """The row for ``config.model_type``; a clear error listing the supported ones otherwise."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture '{model_type}' is not supported; circuitq supports "
            f"{', '.join(sorted(ARCHITECTURES))} (add a row to circuitq/model/arch.py ARCHITECTURES)"
        ) from None


def _transposed_modules(model, spec: ArchSpec) -> list[str]:
    layers = model.get_submodule(spec.layers)
    return [f"{spec.layers}.{i}.{lin.path}" for i in range(len(layers)) for lin in spec.linears if lin.transposed]


def as_linear(model):
    """Replace, in place, every targeted module the family stores transposed (GPT-2's Conv1D,
    weight ``[in, out]``) by an ``nn.Linear`` with the same weights (``[out, in]``, one copy
    each, the old tensor freed) and the same output; idempotent. circuitq's statistics, scores,
    masks and GPTQ are all ``[out, in]`` under the HF weight name; ``conv1d_layout`` writes the
    stored layout back for an HF checkpoint. Returns ``model``."""
    spec = arch_for(model.config.model_type)
    for path in _transposed_modules(model, spec):
        mod = model.get_submodule(path)
        if isinstance(mod, torch.nn.Linear):
            continue
        nx, nf = mod.weight.shape
        lin = torch.nn.Linear(nx, nf, bias=mod.bias is not None, device=mod.weight.device, dtype=mod.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(mod.weight.T)
            if mod.bias is not None:
                lin.bias = mod.bias
        lin.weight.requires_grad_(mod.weight.requires_grad)
        lin.circuitq_conv1d = True
        parent, name = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), name, lin)
    return model


class conv1d_layout:
    """Context manager: the modules ``as_linear`` replaced are Conv1D again (weights transposed
    back, copies) while it is open, so ``save_pretrained`` writes a checkpoint of the family's own
    layout; the nn.Linear modules return on exit."""

    def __init__(self, model):
        self.model, self.swapped = model, []

    def __enter__(self):
        for name, mod in list(self.model.named_modules()):
            if isinstance(mod, torch.nn.Linear) and getattr(mod, "circuitq_conv1d", False):
                conv = Conv1D(mod.out_features, mod.in_features).to(mod.weight.device, mod.weight.dtype)
                with torch.no_grad():
                    conv.weight.copy_(mod.weight.T)
                    conv.bias = mod.bias if mod.bias is not None else conv.bias
                parent, child = name.rsplit(".", 1)
                setattr(self.model.get_submodule(parent), child, conv)
                self.swapped.append((parent, child, mod))
        return self.model

    def __exit__(self, *exc):
        for parent, child, mod in self.swapped:
            setattr(self.model.get_submodule(parent), child, mod)
        self.swapped.clear()


def target_shapes(model) -> dict[str, tuple[int, int]]:
    """``{HF weight name: (out, in)}`` of every targeted linear weight of ``model``, in
    quantization order; a weight whose shape is not what the config and the family's row say
    (a fused module of another size, a mislabelled checkpoint) is refused in one line. A family
    stored transposed (GPT-2's Conv1D) is turned into nn.Linear modules first (``as_linear``)."""
    spec = arch_for(model.config.model_type)
    if any(lin.transposed for lin in spec.linears):
        as_linear(model)
    layers = model.get_submodule(spec.layers)
    shapes = {spec.weight_name(i, n): tuple(layer.get_submodule(n).weight.shape)
              for i, layer in enumerate(layers) for n in spec.linear_names}
    geo, hidden = Geometry.from_config(model.config), model.config.hidden_size
    for name, shape in shapes.items():
        want = expected_shape(spec.parse(name)[1], geo, hidden)
        if shape != want:
            raise UnsupportedArchitecture(
                f"{name} is {list(shape)} ([out, in]), but a {model.config.model_type} model of this config "
                f"({geo.n_heads} heads, {geo.n_kv_heads} KV heads of {geo.head_dim}, MLP {geo.d_mlp}, hidden {hidden}) "
                f"has it {list(want)}; the checkpoint does not match its config.json")
    return shapes


def expected_shape(lin: Linear, geo: "Geometry", hidden: int) -> tuple[int, int]:
    """``(out, in)`` the row says module ``lin`` has: q/KV heads × head size, MLP width or the
    residual width; a fused module the sum of its segments' rows."""
    size = {"q_heads": geo.rows_of("q"), "kv_heads": geo.rows_of("kv"), "neurons": geo.d_mlp, None: hidden}
    rows = sum(geo.rows_of(seg.size) for seg in lin.segments) if lin.segments else size[lin.rows]
    return rows, size[lin.cols]


def module_name(weight_name: str) -> str:
    """``...q_proj.weight`` -> ``...q_proj`` (the module that owns the weight)."""
    if not weight_name.endswith(".weight"):
        raise UsageError(f"'{weight_name}' is not a weight name (it should end in .weight)")
    return weight_name[: -len(".weight")]


def weight_of(module: str) -> str:
    """``...q_proj`` -> ``...q_proj.weight``."""
    return module + ".weight"


_ANY = re.compile(r"^(?P<prefix>.*\.layers|transformer\.h)\.(?P<layer>\d+)\.(?P<path>.+)\.weight$")


def parse_name(name: str, spec: ArchSpec | None = None) -> tuple[int, str] | None:
    """``(layer, module type)`` of an HF weight name (any layers prefix), else None; the module type
    is the stored module's (``qkv_proj`` for a fused one). ``spec``: one family's row (default: any)."""
    lin = _linear_of(name, spec)
    return None if lin is None else (lin[0], lin[1].kind)


def _linear_of(name: str, spec: ArchSpec | None) -> tuple[int, Linear] | None:
    m = _ANY.match(name)
    if not m:
        return None
    lin = {x.path: x for x in spec.linears}.get(m["path"]) if spec is not None else _ALL_LINEARS.get(m["path"])
    return None if lin is None else (int(m["layer"]), lin)


def module_parts(name: str, geo: "Geometry", spec: ArchSpec | None = None) -> list[tuple[int, str, str | None,
                                                                                    str | None, "slice | torch.Tensor"]]:
    """``(layer, module kind, rows meaning, cols meaning, rows)`` of each module the weight
    ``name`` holds (one, or a fused module's segments), as ``MODULE_TYPES`` names them; ``[]`` when
    it is not a targeted weight. Circuit maps and faithfulness units read weights through this."""
    lin = _linear_of(name, spec if spec is not None else arch_for(geo.model_type))
    if lin is None:
        return []
    return [(lin[0], *p) for p in lin[1].parts(geo)]


def row_in(rows: "slice | torch.Tensor", row: int) -> int | None:
    """Position of stored row ``row`` inside a module's ``rows`` (``module_parts``' slice or
    interleaved index), or None when the row is another module's."""
    if isinstance(rows, slice):
        start = rows.start or 0
        return row - start if start <= row and (rows.stop is None or row < rows.stop) else None
    hit = (rows == row).nonzero()
    return int(hit[0, 0]) if len(hit) else None


@dataclass(frozen=True)
class Geometry:
    """The numbers a circuit map needs: ``n_layers``, query heads ``n_heads``, ``n_kv_heads``,
    ``head_dim``, the MLP width ``d_mlp`` and the ``model_type`` whose row (``arch_for``) says
    which axis of each weight is a head or a neuron (files from before 0.6.2 lack it: Llama-like)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    model_type: str = "llama"

    @classmethod
    def from_config(cls, cfg) -> "Geometry":
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        d_mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size  # GPT-2: n_inner or 4d
        return cls(cfg.num_hidden_layers, cfg.num_attention_heads,
                   getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, hd, d_mlp,
                   getattr(cfg, "model_type", "llama"))

    @classmethod
    def infer(cls, shapes: dict[str, tuple[int, int]], n_heads: int) -> "Geometry":
        """From weight shapes and the number of query heads."""
        parsed = {n: parse_name(n) for n in shapes}
        layers = {p[0] for p in parsed.values() if p}
        by = {p[1]: shapes[n] for n, p in parsed.items() if p}
        hd = by["q_proj"][0] // n_heads
        return cls(len(layers), n_heads, by["k_proj"][0] // hd, hd, by["up_proj"][0])

    def rows_of(self, size: str) -> int:
        """Rows of a fused module's segment: ``q`` (n_heads·head_dim), ``kv``, ``mlp`` (d_mlp)."""
        return {"q": self.n_heads * self.head_dim, "kv": self.n_kv_heads * self.head_dim, "mlp": self.d_mlp}[size]

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def units(self, kind: str) -> int:
        """How many units an axis kind indexes (``q_heads``, ``kv_heads``, ``neurons``)."""
        return {"q_heads": self.n_heads, "kv_heads": self.n_kv_heads, "neurons": self.d_mlp}[kind]
