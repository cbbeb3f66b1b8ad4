"""Precision plans (which weight gets how many bits) and exact bit accounting.

A plan is data: a default bit width and an ordered list of ``(pattern, bits)`` rules keyed by HF
parameter name (``model.layers.3.self_attn.q_proj.weight``). Precedence: a rule whose pattern is
exactly the name wins; otherwise the *first* rule whose regex ``fullmatch``es the name; otherwise
the default. ``bits = 16`` keeps a module unquantized.

Bit accounting per linear weight ``[out, in]`` quantized to ``b`` bits with ``G`` groups per row
and ``k`` weights kept in 16-bit (TaCQ's accounting):
``(out·in − k)·b + G·out·(16 + b) + 32·k`` — quantized weights at ``b`` bits, each group's
float16 scale and ``b``-bit zero, and each 16-bit weight as 16 bits of value plus 16 of index.
A 16-bit module costs ``16·out·in``. Average bits = total / number of weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from circuitq.errors import UsageError
from circuitq.quant.quantizer import SUPPORTED_BITS

FULL_PRECISION = 16


@dataclass(frozen=True)
class PrecisionPlan:
    default_bits: int = 3
    rules: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for pat, bits in ((None, self.default_bits), *self.rules):
            if bits not in (*SUPPORTED_BITS, FULL_PRECISION):
                raise UsageError(f"unsupported bits {bits}{' for ' + pat if pat else ''}: "
                                 f"use one of {SUPPORTED_BITS} or {FULL_PRECISION} (keep)")
            if pat is not None:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise UsageError(f"plan rule '{pat}' is not a valid regex: {e}") from None

    def bits_for(self, name: str) -> int:
        for pat, bits in self.rules:
            if pat == name:
                return bits
        for pat, bits in self.rules:
            if re.fullmatch(pat, name):
                return bits
        return self.default_bits

    @classmethod
    def parse(cls, default_bits: int, specs: list[str] | None) -> "PrecisionPlan":
        """From CLI strings ``PATTERN=BITS``."""
        rules = []
        for s in specs or []:
            pat, sep, bits = s.rpartition("=")
            if not sep or not bits.isdigit():
                raise UsageError(f"plan rule '{s}' must look like PATTERN=BITS, e.g. '.*down_proj.weight=4'")
            rules.append((pat, int(bits)))
        return cls(default_bits, tuple(rules))

    def to_dict(self) -> dict:
        return {"default_bits": self.default_bits, "rules": [list(r) for r in self.rules],
                "precedence": "exact name, then first regex fullmatch, then default"}


@dataclass
class ModuleBits:
    numel: int
    bits: int
    groups: int
    nnz: int
    total_bits: int


@dataclass
class BitReport:
    per_module: dict[str, ModuleBits] = field(default_factory=dict)

    @property
    def total_bits(self) -> int:
        return sum(m.total_bits for m in self.per_module.values())

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.per_module.values())

    @property
    def nnz(self) -> int:
        return sum(m.nnz for m in self.per_module.values())

    @property
    def average_bits(self) -> float:
        return self.total_bits / max(self.numel, 1)

    def to_dict(self) -> dict:
        return {"average_bits": self.average_bits, "total_bits": self.total_bits, "numel": self.numel,
                "nnz_16bit": self.nnz, "formula": "(numel-nnz)*b + groups*out*(16+b) + 32*nnz; 16*numel if kept"}


def module_bits(out_f: int, in_f: int, bits: int, group_size: int, nnz: int) -> ModuleBits:
    numel = out_f * in_f
    if bits >= FULL_PRECISION:
        return ModuleBits(numel, bits, 0, 0, FULL_PRECISION * numel)
    groups = 1 if group_size == -1 else in_f // group_size
    total = (numel - nnz) * bits + groups * out_f * (16 + bits) + 32 * nnz
    return ModuleBits(numel, bits, groups, nnz, total)


def bit_report(shapes: dict[str, tuple[int, int]], plan: PrecisionPlan, group_size: int,
               nnz: dict[str, int] | None = None) -> BitReport:
    """Exact bit accounting over the targeted weights ``{name: (out, in)}``."""
    rep = BitReport()
    for name, (o, i) in shapes.items():
        rep.per_module[name] = module_bits(o, i, plan.bits_for(name), group_size, (nnz or {}).get(name, 0))
    return rep
