"""Calibration token windows for quantization (pure given the documents and tokenizer).

GPTQ calibrates on random fixed-length windows of a corpus (the C4 recipe). Documents are first
split by a seeded permutation into a calibration part and a held-out part that never overlap; the
windows are drawn from the concatenated token stream of each part.

Sources (``--calib``): ``text:PATH`` (``.txt`` or ``.jsonl``), ``gsm8k`` (question + worked
solution), ``mmlu`` (question, choices and answer), read from the data directory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from circuitq.data.readers import DataError, read_gsm8k, read_mmlu, read_text_corpus


@dataclass(frozen=True)
class CalibConfig:
    source: str = "gsm8k"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    heldout_fraction: float = 0.2


def source_documents(source: str, data_dir: str | None = None) -> list[str]:
    """Plain-text documents for a calibration source name."""
    if source.startswith("text:"):
        return read_text_corpus(source[5:])
    if source == "gsm8k":
        return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in read_gsm8k(data_dir)]
    if source == "mmlu":
        out = []
        for split in ("dev", "val"):
            for r in read_mmlu(data_dir, split):
                ch = "\n".join(f"{l}. {c}" for l, c in zip("ABCD", r["choices"]))
                out.append(f"{r['question']}\n{ch}\nAnswer: {r['answer']}")
        return out
    raise DataError(f"unknown calibration source '{source}': use text:PATH, gsm8k or mmlu")


class DocSplit(NamedTuple):
    calib: list[str]
    heldout: list[str]


def split_documents(docs: list[str], heldout_fraction: float, seed: int) -> DocSplit:
    """Seeded, disjoint split of documents into calibration and held-out parts, each in seeded
    random order (so a prefix of either is a random sample)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    n_held = max(1, int(round(len(docs) * heldout_fraction))) if len(docs) > 1 else 0
    return DocSplit([docs[i] for i in order[n_held:]], [docs[i] for i in order[:n_held]])


def token_stream(docs: list[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the documents joined with EOS: ``[T]`` int64 (stops after ``max_tokens``)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` seeded random windows of ``seq_len`` tokens: ``[n, seq_len]``."""
    if stream.numel() <= seq_len:
        raise DataError(f"the calibration text has {stream.numel()} tokens, fewer than one window "
                        f"of {seq_len}; use more text or a smaller --seq-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n,), generator=g)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def consecutive_windows(stream: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows for perplexity: ``[k, seq_len]``."""
    k = stream.numel() // seq_len
    if limit is not None:
        k = min(k, limit)
    if k == 0:
        raise DataError(f"held-out text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    return stream[: k * seq_len].view(k, seq_len)


class CalibData(NamedTuple):
    calib: torch.Tensor     # [samples, seq_len]
    heldout: torch.Tensor   # [k, seq_len], disjoint documents


def build_calibration(cfg: CalibConfig, tokenizer, data_dir: str | None = None,
                      heldout_windows: int = 32) -> CalibData:
    docs = source_documents(cfg.source, data_dir)
    split = split_documents(docs, cfg.heldout_fraction, cfg.seed)
    need = cfg.samples * cfg.seq_len * 4
    calib = random_windows(token_stream(split.calib, tokenizer, need), cfg.samples, cfg.seq_len, cfg.seed)
    held = consecutive_windows(token_stream(split.heldout, tokenizer, heldout_windows * cfg.seq_len + 1),
                               cfg.seq_len, heldout_windows)
    return CalibData(calib, held)
