"""GPTQ's Hessians of every linear input, collected from the unquantized model (shared mode).

Two collectors, equal up to float32 rounding order (they run the same layer on the same batches):

* ``collect_hessians``: hooks on every layer, one pass of the whole model per batch; every
  layer's Hessians are held at once. Memory: ``4 · L · Σ_g in_g²`` bytes (``g`` over the input
  groups of a layer: q/k/v, o, gate/up, down), 0.4 GB for SmolLM2-135M, 33 GB for Llama-3-8B.
* ``write_hessians``: layer by layer (GPTQ's own driver shape): the calibration items' hidden
  states enter layer 0, each layer's Hessians are accumulated while the layer maps them to the next
  layer's inputs, then written to disk with GPTQ's factor of each (``hessian_factor``: computed
  once, shared by every mask and bit width). Memory: the hidden states of the calibration tokens
  (``4 · d · N · L_max``, padded) + one layer's Hessians and factors (``8 · Σ_g in_g²``).
  Disk: ``8 · L · Σ_g in_g²`` bytes (H and its factor).

``HessianFile`` reads such a directory back one module at a time: ``hessians[name]`` is a
``HessianState``, ``hessians.factor(name, damp)`` the stored factor when the damping matches.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from circuitq.data.calib import Sequences, as_sequences
from circuitq.model.arch import arch_for
from circuitq.quant.gptq import Factor, HessianState, hessian_factor, hessian_update
from circuitq.storage import LazyTensors, TensorWriter

HESSIAN_FILE = "hessians.safetensors"
FACTOR_FILE = "factors.safetensors"


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


def batches(seqs: Sequences, batch_size: int, device):
    """``(ids [b, L'], mask [b, L'])`` batches on ``device``, cut to the batch's longest item."""
    for b in range(0, seqs.ids.shape[0], batch_size):
        mask = seqs.mask[b:b + batch_size]
        width = int(mask.sum(1).max())
        yield seqs.ids[b:b + batch_size, :width].to(device), mask[:, :width].to(device)


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_first_inputs(model, spec, calib, batch_size: int, device) -> tuple[list, list, list]:
    """Run each calibration batch to the first decoder layer; returns its hidden states
    (``[b, L, d]`` per batch), keyword arguments (masks, rotary embeddings) and token masks
    (``[b, L]`` bool: the real tokens) per batch. ``calib``: ``Sequences`` or ``[N, L]`` ids."""
    seqs = as_sequences(calib)
    layers = model.get_submodule(spec.layers)
    moved = [(model.get_submodule(n), next(model.get_submodule(n).parameters(), None)) for n in spec.pre_layers]
    homes = {n: (p.device if p is not None else None) for n, (_, p) in zip(spec.pre_layers, moved)}
    for m, _ in moved:
        m.to(device)
    hidden, kwargs, tmask = [], [], []

    def hook(_mod, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids, mask in batches(seqs, batch_size, device):
                tmask.append(mask)
                try:
                    model(input_ids=ids, attention_mask=mask.long(), use_cache=False, logits_to_keep=1)
                except _Stop:
                    pass
    finally:
        handle.remove()
        for (m, _), n in zip(moved, spec.pre_layers):
            if homes[n] is not None:
                m.to(homes[n])
    return hidden, kwargs, tmask


def _group_hooks(layer, prefix: str, groups, states: dict, current: list) -> list:
    handles = []
    for group in groups:
        key = f"{prefix}.{group[0]}"
        states[key] = HessianState.zeros(layer.get_submodule(group[0]).weight.shape[1], current[1])

        def pre(_mod, args, key=key):
            states[key] = hessian_update(states[key], args[0], current[0])
        handles.append(layer.get_submodule(group[0]).register_forward_pre_hook(pre))
    return handles


def collect_hessians(model: torch.nn.Module, calib: Sequences | torch.Tensor, batch_size: int = 8, device=None,
                     progress: bool = True) -> dict[str, HessianState]:
    """Hessians of every targeted module's input in one pass of the unquantized model, all in
    memory (see the module docstring for the cost; ``write_hessians`` streams them to disk).

    ``calib``: ``Sequences`` (only real tokens count) or ``[N, L]`` token ids. Returns ``{module
    name: HessianState}``; modules that share an input (q/k/v, gate/up) share one state object."""
    seqs = as_sequences(calib)
    spec = arch_for(model.config.model_type)
    layers = model.get_submodule(spec.layers)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    current: list = [None, device]
    states: dict[str, HessianState] = {}
    handles = []
    for i, layer in enumerate(layers):
        handles += _group_hooks(layer, f"{spec.layers}.{i}", spec.groups, states, current)
    home = next(model.parameters()).device
    model.to(device)
    try:
        with torch.no_grad():
            n_batches = -(-seqs.ids.shape[0] // batch_size)
            for ids, mask in tqdm(batches(seqs, batch_size, device), total=n_batches, desc="hessians", unit="batch",
                                  disable=not progress):
                current[0] = mask
                model(input_ids=ids, attention_mask=mask.long(), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        model.to(home)
    return {f"{spec.layers}.{i}.{n}": states[f"{spec.layers}.{i}.{group[0]}"]
            for i in range(len(layers)) for group in spec.groups for n in group}


def write_hessians(model: torch.nn.Module, calib: Sequences | torch.Tensor, dest: str | Path, *, batch_size: int = 8,
                   damp: float = 0.01, damp_max: float = 10.0, device=None, progress: bool = True) -> Path:
    """``collect_hessians``, layer by layer, into the existing directory ``dest``
    (``hessians.safetensors`` + ``factors.safetensors``); returns ``dest``. Only one layer's
    Hessians are in memory at a time (module docstring)."""
    dest = Path(dest)
    spec = arch_for(model.config.model_type)
    layers = model.get_submodule(spec.layers)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    hidden, kwargs, tmask = capture_first_inputs(model, spec, calib, batch_size, device)
    members, tokens, damps = {}, {}, {}
    with TensorWriter(dest / HESSIAN_FILE) as hw, TensorWriter(dest / FACTOR_FILE) as fw:
        for i in tqdm(range(len(layers)), desc="hessians", unit="layer", disable=not progress):
            layer, prefix = layers[i], f"{spec.layers}.{i}"
            home = next(layer.parameters()).device
            layer.to(device)
            states: dict[str, HessianState] = {}
            current: list = [None, device]
            handles = _group_hooks(layer, prefix, spec.groups, states, current)
            try:
                with torch.no_grad():
                    for j, (h, kw, tm) in enumerate(zip(hidden, kwargs, tmask)):
                        current[0] = tm
                        hidden[j] = first_output(layer(h, **kw))
            finally:
                for hd in handles:
                    hd.remove()
                layer.to(home)
            for group in spec.groups:
                key = f"{prefix}.{group[0]}"
                st = states.pop(key)
                f = hessian_factor(st.H, damp, damp_max)
                hw[key], fw[f"U/{key}"], fw[f"dead/{key}"] = st.H, f.U, f.dead
                tokens[key], damps[key] = st.n, f.damp
                members.update({f"{prefix}.{n}": key for n in group})
        meta = {"format": "circuitq.hessians", "members": json.dumps(members), "tokens": json.dumps(tokens)}
        hw.close(meta)
        fw.close({**meta, "damp": json.dumps(damp), "damp_max": json.dumps(damp_max), "damps": json.dumps(damps)})
    return dest


class HessianFile(Mapping):
    """``{module name: HessianState}`` over a directory written by ``write_hessians``, read one
    Hessian at a time (q/k/v and gate/up share theirs). ``factor(name, damp)`` returns the stored
    GPTQ factor when it was made with that damping, else computes it from ``H``."""

    def __init__(self, directory: str | Path, device=None):
        self.dir = Path(directory)
        self._h = LazyTensors(self.dir / HESSIAN_FILE, device=device)
        meta = self._h.metadata()
        self.members: dict[str, str] = json.loads(meta["members"])
        self.tokens: dict[str, int] = json.loads(meta["tokens"])
        self.device = device
        fpath = self.dir / FACTOR_FILE
        self._f = LazyTensors(fpath, device=device) if fpath.exists() else None
        fmeta = self._f.metadata() if self._f is not None else {}
        self._damp = (json.loads(fmeta["damp"]), json.loads(fmeta["damp_max"])) if fmeta else None
        self._damps = json.loads(fmeta.get("damps", "{}"))

    def __getitem__(self, name: str) -> HessianState:
        key = self.members[name]
        return HessianState(self._h[key], self.tokens[key])

    def __iter__(self):
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def factor(self, name: str, damp: float, damp_max: float = 10.0) -> Factor:
        key = self.members[name]
        if self._f is not None and self._damp == (damp, damp_max):
            return Factor(self._f[f"U/{key}"], self._damps[key], self._f[f"dead/{key}"])
        return hessian_factor(self[name].H, damp, damp_max)
