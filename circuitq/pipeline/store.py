"""The run's step store: every step (gradient statistics, scores, masks, evaluations) is a
directory under ``RUN/steps/`` whose ``step.json`` records the settings it depends on (its *key*);
a step whose key matches is reused, whatever its name, so a rerun or a resumed interrupted run
only does what is missing or changed. Keys are pure functions of the settings and of the content
of the items (``examples_digest``) and the model (``model_fingerprint``).
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from circuitq import __version__
from circuitq.artifacts import atomic_dir


class StepStore:
    """Artifacts under ``root/steps/NAME/`` with ``step.json`` = ``{"kind", "key", ...}``. Lookup
    compares ``kind`` and ``key`` (the settings the step depends on); names are only for people."""

    def __init__(self, root: Path):
        self.root = Path(root) / "steps"
        self._index: dict[str, Path] | None = None

    @staticmethod
    def _digest(kind: str, key: dict) -> str:
        return hashlib.sha256(json.dumps({"kind": kind, "key": key}, sort_keys=True, default=str).encode()).hexdigest()

    def _scan(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for f in sorted(self.root.glob("*/step.json")):
                try:
                    d = json.loads(f.read_text())
                    self._index[self._digest(d["kind"], d["key"])] = f.parent
                except (OSError, ValueError, KeyError):
                    continue  # a foreign or damaged entry is never reused
        return self._index

    def find(self, kind: str, key: dict) -> Path | None:
        return self._scan().get(self._digest(kind, json.loads(json.dumps(key, default=str))))

    @contextmanager
    def create(self, kind: str, key: dict, name: str):
        """Yield a temporary directory that becomes the step once the block succeeds."""
        key = json.loads(json.dumps(key, default=str))
        digest = self._digest(kind, key)
        out = self.root / f"{name}-{digest[:10]}"
        with atomic_dir(out, overwrite=True) as tmp:
            yield tmp
            (tmp / "step.json").write_text(json.dumps({"kind": kind, "key": key, "circuitq_version": __version__,
                                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
        self._scan()[digest] = out


def examples_digest(examples) -> str:
    """Content hash of task examples: a step is reused only on the very same items."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.prompt.encode() + b"\x00" + e.completion.encode() + b"\x01")
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap content hash: config, parameter names and shapes, and a strided sample of values."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for n, p in model.state_dict().items():
        h.update(f"{n}{tuple(p.shape)}".encode())
        flat = p.detach().flatten()
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
