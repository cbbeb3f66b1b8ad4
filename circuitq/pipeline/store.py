"""The run's step store: every step (gradient statistics, scores, masks, evaluations) is a
directory under ``RUN/steps/`` whose ``step.json`` records the settings it depends on (its *key*);
a step whose key matches is reused, whatever its name, so a rerun or a resumed interrupted run
only does what is missing or changed. Keys are pure functions of the settings and of the content
of the items (``examples_digest``) and the model (``model_fingerprint``).

Each step also records the SHA-256 of its files. A step whose files are missing, truncated or
edited is never trusted: it is moved aside to ``steps/.damaged-NAME-TIME`` (kept for
inspection), the run says so, and the step is computed again.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from circuitq import __version__
from circuitq.artifacts import atomic_dir, file_sha256

KEY_FORMAT = 2   # 2: every setting a step depends on is in its key (1: some only when not the default)


class StepStore:
    """Artifacts under ``root/steps/NAME/`` with ``step.json`` = ``{"kind", "key", "key_format",
    ...}``. Lookup compares ``kind`` and ``key`` (the settings the step depends on); names are only
    for people. ``migrate(key)`` turns a key of an older ``key_format`` into today's, so that a
    step written by an older version is found exactly when today's settings equal its own."""

    def __init__(self, root: Path, say=print, migrate=None):
        self.migrate = migrate
        self.counts = {"reused": 0, "computed": 0}
        self.root = Path(root) / "steps"
        self._index: dict[str, Path] | None = None
        self._verified: set[Path] = set()
        self.say = say

    @staticmethod
    def _digest(kind: str, key: dict) -> str:
        return hashlib.sha256(json.dumps({"kind": kind, "key": key}, sort_keys=True, default=str).encode()).hexdigest()

    def _scan(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for f in sorted(self.root.glob("*/step.json")):
                try:
                    d = json.loads(f.read_text())
                    key = d["key"]
                    if d.get("key_format", 1) < KEY_FORMAT:
                        if self.migrate is None:
                            continue
                        key = self.migrate(key)
                    self._index[self._digest(d["kind"], key)] = f.parent
                except (OSError, ValueError, KeyError):
                    continue  # a foreign or damaged entry is never reused
        return self._index

    def find(self, kind: str, key: dict) -> Path | None:
        digest = self._digest(kind, json.loads(json.dumps(key, default=str)))
        path = self._scan().get(digest)
        if path is None or path in self._verified:
            return path
        problem = _damage(path)
        if problem is None:
            self._verified.add(path)
            return path
        aside = self.root / f".damaged-{path.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        path.rename(aside)
        del self._index[digest]
        self.say(f"step {path.name} is damaged ({problem}); moved aside to {aside.name}, computing it again")
        return None

    def step(self, kind: str, key: dict, name: str, compute, valid=None) -> Path:
        """The one find -> compute -> store of every step: the directory of ``(kind, key)`` when it
        is stored (and ``valid(path)``, when given, accepts it), else ``compute(tmp)`` fills a new
        one under ``name``. ``counts`` records which happened."""
        found = self.find(kind, key)
        if found and (valid is None or valid(found)):
            self.counts["reused"] += 1
            return found
        if found:
            self.say(f"step {found.name} lacks what this version needs; computing it again")
        with self.create(kind, key, name) as tmp:
            compute(tmp)
        return self.find(kind, key)

    def reuse(self, kind: str, key: dict) -> Path | None:
        """``find``, counting a hit as reused (for callers that compute several steps at once)."""
        found = self.find(kind, key)
        if found:
            self.counts["reused"] += 1
        return found

    @contextmanager
    def create(self, kind: str, key: dict, name: str):
        """Yield a temporary directory that becomes the step once the block succeeds."""
        key = json.loads(json.dumps(key, default=str))
        digest = self._digest(kind, key)
        out = self.root / f"{name}-{digest[:10]}"
        with atomic_dir(out, overwrite=True) as tmp:
            yield tmp
            files = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file() and f.name != "step.json"}
            (tmp / "step.json").write_text(json.dumps({"kind": kind, "key": key, "key_format": KEY_FORMAT,
                                                       "circuitq_version": __version__,
                                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                       "files": files}, indent=2) + "\n")
        self._scan()[digest] = out
        self._verified.add(out)
        self.counts["computed"] += 1


def _sha256(path: Path) -> str:
    return file_sha256(path)


def _damage(step: Path) -> str | None:
    """Why a step's files cannot be trusted, or None. Steps from before checksums (no
    ``files`` in ``step.json``) are trusted as they were."""
    files = json.loads((step / "step.json").read_text()).get("files")
    if files is None:
        return None
    for name, digest in files.items():
        f = step / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum: truncated or edited"
    return None


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
