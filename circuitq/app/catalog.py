"""A runs directory as a catalog: which runs it holds, their score directories, masks, results and
exported models. Used by the explorer app; reads only through circuitq's own safe loaders
(safetensors and JSON; nothing is unpickled) and never follows a path out of the runs directory.

A run is a sub-directory holding either ``run.json`` (``circuitq run``: its scores and masks are in
``steps/``) or score directories (``score.json`` from ``circuitq score``), itself or one level down.
A run that cannot be read is listed with the reason; the others still work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from circuitq.errors import CircuitqError, UsageError
from circuitq.model.loading import cache_dir


class PathOutsideRuns(CircuitqError, ValueError):
    pass


_MD_SPECIAL = set("\\`*_{}[]()<>#+-.!|~$&:")


def md(text) -> str:
    """``text`` (a run, task, job or model name, an error) safe to put in Streamlit markdown: every
    markdown and HTML special character is backslash-escaped, so a hostile name shows as itself and
    never becomes a link, an image, HTML or LaTeX. Line breaks become spaces."""
    s = " ".join(str(text).split())
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in s)


def confine(root: str | Path, path: str | Path) -> Path:
    """``path`` resolved, refused unless it lies inside ``root`` (symlinks resolved too)."""
    root = Path(root).resolve()
    p = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    if p != root and root not in p.parents:
        raise PathOutsideRuns(f"{path} is outside the runs directory {root}")
    return p


def model_dir(root: str | Path, source: str | None) -> Path | None:
    """The model directory an artifact names, only when it lies inside the runs directory or
    circuitq's own model cache (a foreign file cannot point the app at other paths)."""
    if not source:
        return None
    for base in (Path(root), cache_dir()):
        try:
            p = confine(base, source)
        except PathOutsideRuns:
            continue
        return p if (p / "config.json").exists() else None
    return None


@dataclass
class ScoreEntry:
    path: Path
    task: str
    method: str
    bits: int | None
    model: str
    model_source: str
    samples: int | None
    seed: int | None = None

    @property
    def label(self) -> str:
        return f"{self.task} · {self.method} · {self.bits}-bit" + (f" · seed {self.seed}" if self.seed is not None else "")


@dataclass
class MaskEntry:
    path: Path
    meta: dict

    @property
    def label(self) -> str:
        m = self.meta
        return f"{m.get('method', '?')} · {m.get('task', '?')} · {m.get('bits', '?')}-bit · {_pct(m.get('fraction'))}"


@dataclass
class ModelEntry:
    path: Path
    meta: dict
    evals: list[dict] = field(default_factory=list)


@dataclass
class RunEntry:
    name: str
    path: Path
    kind: str                       # "run" (circuitq run), "scores" (circuitq score dirs), "unreadable"
    error: str = ""
    scores: list[ScoreEntry] = field(default_factory=list)
    masks: list[MaskEntry] = field(default_factory=list)
    models: list[ModelEntry] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    transfer: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    faithfulness: list[tuple[Path, dict]] = field(default_factory=list)
    maps: dict = field(default_factory=dict)   # {task: map.safetensors} attribution maps (circuitq run --head-maps atp)

    @property
    def ok(self) -> bool:
        return self.kind != "unreadable"


def _pct(f) -> str:
    try:
        return f"{float(f):.3%}"
    except (TypeError, ValueError):
        return "?"


def _json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e.__class__.__name__
        raise UsageError(f"{p.name} is not readable JSON ({why})") from None


def _score_entry(d: Path) -> ScoreEntry:
    meta = _json(d / "score.json")
    if meta.get("format") != "circuitq.scores":
        raise UsageError(f"{d.name}/score.json is not a circuitq scores file")
    f = d / "scores.safetensors"
    try:
        with safe_open(str(f), framework="pt") as fh:
            if (fh.metadata() or {}).get("format") != "circuitq.scores":
                raise UsageError(f"{f.name} is not a circuitq scores file")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes a reason
        raise UsageError(f"{d.name}/scores.safetensors cannot be read ({e.__class__.__name__})") from None
    return ScoreEntry(d, str(meta.get("task")), str(meta.get("method")), meta.get("bits"), str(meta.get("model")),
                      str(meta.get("model_source")), meta.get("n_samples") or meta.get("samples"), meta.get("seed"))


def _mask_entry(f: Path) -> MaskEntry:
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{f.name} is not a safetensors mask ({e.__class__.__name__})") from None
    if meta.get("format") != "circuitq.mask":
        raise UsageError(f"{f.name} is not a circuitq mask")
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return MaskEntry(f, out)


def _models(d: Path) -> list[ModelEntry]:
    out = []
    for m in sorted((d / "models").glob("*/circuitq.json")) if (d / "models").is_dir() else []:
        try:
            meta = _json(m)
        except ValueError:
            continue
        evals = []
        for e in sorted(m.parent.glob("eval-*.json")):
            try:
                evals.append(_json(e))
            except ValueError:
                pass
        out.append(ModelEntry(m.parent, meta, evals))
    return out


def _check_inside(root: Path, d: Path) -> None:
    """Refuse a run holding any symlink (at any depth) that leads outside ``root``."""
    base = root.resolve()
    for p in [d, *d.rglob("*")]:
        if p.is_symlink():
            target = p.resolve()
            if target != base and base not in target.parents:
                raise UsageError(f"{p.relative_to(d.parent)} is a symlink leading outside the runs directory; "
                                 "the explorer only reads files inside it")


def read_run(d: Path, root: Path | None = None) -> RunEntry:
    """Catalog one run directory; raises ``ValueError`` with the reason when it is unreadable
    (including a symlink anywhere inside it that leads outside ``root``, the runs directory)."""
    _check_inside(Path(root) if root is not None else d.parent, d)
    if (d / "run.json").exists():
        info = _json(d / "run.json")
        if info.get("format") != "circuitq.run":
            raise UsageError("run.json is not a circuitq run file")
        e = RunEntry(d.name, d, "run", info=info)
        res = _json(d / "results.json") if (d / "results.json").exists() else {}
        e.results, e.transfer = res.get("rows", []), res.get("transfer", [])
        steps = d / "steps"
        e.scores = [_score_entry(s) for s in sorted(steps.glob("*")) if (s / "score.json").exists()]
        e.masks = [_mask_entry(f) for f in sorted(steps.glob("*/mask.safetensors"))]
        for task, rel in (info.get("maps") or {}).items():
            f = d / str(rel) / "map.safetensors"
            if f.is_file() and (d.resolve() in f.resolve().parents):   # confined to the run
                e.maps[str(task)] = f
    else:
        dirs = [d] if (d / "score.json").exists() else [s for s in sorted(d.iterdir()) if (s / "score.json").exists()]
        if not dirs and not list(d.glob("*.safetensors")) and not (d / "masks").is_dir():
            raise UsageError("no run.json, score directories or masks found")
        e = RunEntry(d.name, d, "scores")
        e.scores = [_score_entry(s) for s in dirs]
        e.masks = [_mask_entry(f) for f in sorted(d.glob("*.safetensors"))]
    if (d / "masks").is_dir():
        e.masks += [_mask_entry(f) for f in sorted((d / "masks").glob("*.safetensors"))]
    e.models = _models(d)
    e.faithfulness = _faithfulness(d)
    return e


def _faithfulness(d: Path) -> list[tuple[Path, dict]]:
    """``circuitq faithfulness`` reports in the run directory or one level below (e.g. inside a
    scores directory); files of another format are ignored."""
    out = []
    for f in sorted([*d.glob("*.json"), *d.glob("*/*.json")]):
        if f.name in ("run.json", "results.json", "score.json", "step.json", "circuitq.json"):
            continue
        try:
            doc = _json(f)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("format") == "circuitq.faithfulness":
            out.append((f, doc))
    return out


def scan_runs(runs_dir: str | Path) -> list[RunEntry]:
    """Every run under ``runs_dir`` (readable or not), by name. Symlinks out of it are refused."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            confine(root, d)
            out.append(read_run(d, root))
        except Exception as err:  # noqa: BLE001 - one bad run is listed with its reason, never takes the page down
            out.append(RunEntry(d.name, d, "unreadable", error=str(err) or err.__class__.__name__))
    return out
