"""Reading task data from the public layouts (MMLU CSVs, GSM8k JSONL) and plain text corpora.

Layouts (see ``../shared/data/README.md``): ``mmlu/{dev,val}/SUBJECT_{dev,val}.csv`` without a
header (``question,A,B,C,D,answer``) and ``gsm8k/train.jsonl`` with ``{"question", "answer"}``.
The data directory is ``--data-dir``, else ``$CIRCUITQ_DATA_DIR``, else the first ``shared/data``
found next to the working directory or the repository.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path


class DataError(ValueError):
    pass


def default_data_dir() -> Path | None:
    env = os.environ.get("CIRCUITQ_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), Path.cwd().parent, here, here.parent):
        cand = base / "shared" / "data"
        if (cand / "README.md").exists() or (cand / "gsm8k").exists():
            return cand
    return None


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    d = Path(data_dir) if data_dir else default_data_dir()
    if d is None or not d.is_dir():
        raise DataError(f"task data directory not found (looked for {data_dir or 'shared/data, $CIRCUITQ_DATA_DIR'}); "
                        "pass --data-dir pointing at a folder with mmlu/ and gsm8k/ in their public layouts")
    return d


def _from_hub(kind: str, split: str) -> list[dict]:
    """No data directory at all: Hugging Face ``datasets`` from the hub, when it is reachable."""
    try:
        from datasets import load_dataset

        if kind == "gsm8k":
            return [dict(r) for r in load_dataset("openai/gsm8k", "main", split=split)]
        ds = load_dataset("cais/mmlu", "all", split={"val": "validation", "dev": "dev"}.get(split, split))
        return [{"subject": r["subject"], "question": r["question"], "choices": list(r["choices"]),
                 "answer": "ABCD"[int(r["answer"])]} for r in ds]
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear error
        raise DataError(f"no task data directory was found and the hub could not provide {kind} "
                        f"({e.__class__.__name__}); pass --data-dir pointing at a folder with mmlu/ "
                        "and gsm8k/ in their public layouts") from None


def read_gsm8k(data_dir: str | Path | None = None, split: str = "train") -> list[dict]:
    """GSM8k rows ``{"question", "answer"}`` from ``DATA/gsm8k/{split}.jsonl``."""
    if data_dir is None and default_data_dir() is None:
        return _from_hub("gsm8k", split)
    path = resolve_data_dir(data_dir) / "gsm8k" / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"GSM8k split '{split}' not found: looked for {path}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise DataError(f"{path} is empty")
    return rows


def read_mmlu(data_dir: str | Path | None = None, split: str = "val") -> list[dict]:
    """MMLU rows ``{"subject", "question", "choices": [4], "answer": "A".."D"}``, sorted by subject."""
    if data_dir is None and default_data_dir() is None:
        return _from_hub("mmlu", split)
    folder = resolve_data_dir(data_dir) / "mmlu" / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise DataError(f"MMLU split '{split}' not found: looked for {folder}/*_{split}.csv")
    rows = []
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        with f.open(newline="", encoding="utf-8") as fh:
            for rec in csv.reader(fh):
                if len(rec) != 6:
                    raise DataError(f"{f}: expected 6 columns (question,A,B,C,D,answer), got {len(rec)}")
                rows.append({"subject": subject, "question": rec[0], "choices": rec[1:5], "answer": rec[5].strip()})
    return rows


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file; a missing path, a folder or bytes that are not UTF-8 are errors naming
    the file (and the byte offset)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    if not p.is_file():
        raise DataError(f"{what} {p} is a folder, not a file; give the path of a .txt or .jsonl file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None


def read_jsonl(path: str | Path) -> list:
    """One JSON value per non-empty line; a bad line is an error naming file and line."""
    p = Path(path)
    rows = []
    for i, line in enumerate(read_text(p).splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{i + 1}: not valid JSON ({e.msg})") from None
    return rows


def read_prompt_completion(path: str | Path) -> list[dict]:
    """Custom task rows ``{"prompt", "completion"}`` from a JSONL file."""
    rows = read_jsonl(path)
    for i, obj in enumerate(rows):
        if not isinstance(obj, dict) or not {"prompt", "completion"} <= set(obj):
            raise DataError(f"{path}: row {i + 1}: each line needs \"prompt\" and \"completion\"")
        bad = [k for k in ("prompt", "completion") if not isinstance(obj[k], str)]
        if bad:
            raise DataError(f"{path}: row {i + 1}: \"{bad[0]}\" must be a string, got {type(obj[bad[0]]).__name__}")
    if not rows:
        raise DataError(f"custom task file {path} has no rows")
    return rows


def read_text_corpus(path: str | Path) -> list[str]:
    """Documents of a ``.txt`` file (blank-line separated) or a ``.jsonl`` file (its ``text``
    field, else every string field joined)."""
    p = Path(path)
    if p.suffix == ".jsonl":
        read_text(p, "text corpus")
        docs = []
        for i, obj in enumerate(read_jsonl(p)):
            if isinstance(obj, dict) and "text" in obj and not isinstance(obj["text"], str):
                raise DataError(f"{p}: row {i + 1}: \"text\" must be a string, got {type(obj['text']).__name__}")
            docs.append(obj["text"] if isinstance(obj, dict) and "text" in obj else
                        "\n".join(v for v in (obj.values() if isinstance(obj, dict) else [obj]) if isinstance(v, str)))
    else:
        docs = [d.strip() for d in read_text(p, "text corpus").split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"text corpus {p} has no text")
    return docs
