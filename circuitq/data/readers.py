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
import sys
from pathlib import Path

from circuitq.data.prompts import LETTERS
from circuitq.errors import CircuitqError


class DataError(CircuitqError, ValueError):
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
                 "answer": LETTERS[int(r["answer"])]} for r in ds]
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear error
        raise DataError(f"no task data directory was found and the hub could not provide {kind} "
                        f"({e.__class__.__name__}); pass --data-dir pointing at a folder with mmlu/ "
                        "and gsm8k/ in their public layouts") from None


def read_gsm8k(data_dir: str | Path | None = None, split: str = "train") -> list[dict]:
    """GSM8k rows ``{"question", "answer"}`` from ``DATA/gsm8k/{split}.jsonl``; a bad line is an
    error naming the file and its line number (blank lines counted)."""
    if data_dir is None and default_data_dir() is None:
        return _from_hub("gsm8k", split)
    path = resolve_data_dir(data_dir) / "gsm8k" / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"GSM8k split '{split}' not found: looked for {path}")
    rows = []
    for line, obj in read_jsonl_lines(path):
        rows.append(_string_fields(path, line, obj, ("question", "answer")))
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
    rows, empty = [], []
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        n = len(rows)
        try:
            with f.open(newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                for rec in reader:
                    if not rec:
                        continue
                    if len(rec) != 6:
                        raise DataError(f"{f}:{reader.line_num}: expected 6 columns (question,A,B,C,D,answer), "
                                        f"got {len(rec)}")
                    rows.append({"subject": subject, "question": rec[0], "choices": rec[1:5],
                                 "answer": rec[5].strip()})
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
        if len(rows) == n:
            empty.append(f.name)
    if empty:
        print(f"[circuitq] warning: {len(empty)} MMLU file(s) in {folder} have no rows and are left out: "
              f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}", file=sys.stderr)
    if not rows:
        raise DataError(f"every MMLU file in {folder} is empty")
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


def read_jsonl_lines(path: str | Path) -> list[tuple[int, object]]:
    """``(line number, value)`` for each non-empty line (numbers count blank lines, as editors do);
    a bad line is an error naming the file and that line."""
    p = Path(path)
    rows = []
    for i, line in enumerate(read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except (json.JSONDecodeError, RecursionError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            col = f", column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise DataError(f"{p}:{i}: not valid JSON ({why}{col})") from None
    return rows


def _string_fields(path, line: int, obj, keys: tuple[str, str]) -> dict:
    """``obj`` when it is an object whose ``keys`` are strings; else an error naming file and line."""
    if not isinstance(obj, dict) or not set(keys) <= set(obj):
        raise DataError(f"{path}:{line}: each line needs \"{keys[0]}\" and \"{keys[1]}\"")
    bad = [k for k in keys if not isinstance(obj[k], str)]
    if bad:
        raise DataError(f"{path}:{line}: \"{bad[0]}\" must be a string, got {type(obj[bad[0]]).__name__}")
    return obj


def read_jsonl(path: str | Path) -> list:
    """One JSON value per non-empty line; a bad line is an error naming file and line."""
    return [obj for _, obj in read_jsonl_lines(path)]


def read_prompt_completion(path: str | Path) -> list[dict]:
    """Custom task rows ``{"prompt", "completion"}`` from a JSONL file. The completion is what is
    scored, so a row whose completion is empty is refused (it would score nothing: NaN)."""
    rows, empty = [], []
    for line, obj in read_jsonl_lines(path):
        _string_fields(path, line, obj, ("prompt", "completion"))
        if not obj["completion"].strip():
            empty.append(line)
        rows.append(obj)
    if empty:
        raise DataError(f"{path}: line{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty[:5]))}"
                        f"{' ...' if len(empty) > 5 else ''} ha{'ve' if len(empty) > 1 else 's'} an empty "
                        "\"completion\" (the text that is scored); fill it in or remove the line")
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
        for line, obj in read_jsonl_lines(p):
            if isinstance(obj, dict) and "text" in obj and not isinstance(obj["text"], str):
                raise DataError(f"{p}:{line}: \"text\" must be a string, got {type(obj['text']).__name__}")
            docs.append(obj["text"] if isinstance(obj, dict) and "text" in obj else
                        "\n".join(v for v in (obj.values() if isinstance(obj, dict) else [obj]) if isinstance(v, str)))
    else:
        docs = [d.strip() for d in read_text(p, "text corpus").split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"text corpus {p} has no text")
    return docs
