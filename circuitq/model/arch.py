"""Per-architecture facts, one row per model family (never a copied driver).

Each row names where the decoder layers live, the modules to run before them, and the linear
modules of a layer in true-sequential order, grouped by shared input: the modules of a group read
the same activations, so one Hessian serves all of them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    layers: str = "model.layers"
    pre_layers: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")
    groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)


_LLAMA_LIKE = ArchSpec()
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
}


class UnsupportedArchitecture(ValueError):
    pass


def arch_for(model_type: str) -> ArchSpec:
    """The row for ``config.model_type``; a clear error listing the supported ones otherwise."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture '{model_type}' is not supported; circuitq supports "
            f"{', '.join(sorted(ARCHITECTURES))} (add a row to circuitq/arch.py ARCHITECTURES)"
        ) from None


def linear_weight_names(model_type: str, num_layers: int) -> list[str]:
    """HF parameter names of every targeted linear weight, in quantization order."""
    spec = arch_for(model_type)
    return [f"{spec.layers}.{i}.{n}.weight" for i in range(num_layers) for n in spec.linear_names]
