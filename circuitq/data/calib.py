"""Calibration token windows (pure given the examples and the tokenizer).

Every calibration path takes its text from a task's *calibration* items (``data.tasks.Task``),
so evaluation items never enter calibration.

* ``calibration_sequences``: one item per sequence, right-padded, with a mask of the real tokens
  (what ``circuitq run``, ``score`` and ``quantize`` give GPTQ's Hessians, as the official TaCQ
  code does: no window spans two items and no token is an EOS the items never had);
* ``random_windows``: seeded random windows (GPTQ's C4 recipe; the speed benchmark uses it);
* ``heldout_windows``: consecutive windows of the evaluation items, for perplexity.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from circuitq.data.readers import DataError
from circuitq.data.tasks import tokenize_examples


class Sequences(NamedTuple):
    """Calibration token sequences of different lengths, right-padded: ``ids`` ``[N, L]`` int64,
    ``mask`` ``[N, L]`` bool (True at real tokens). A plain ``[N, L]`` tensor means every token is
    real (``as_sequences``)."""

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def as_sequences(calib) -> Sequences:
    """``Sequences`` from ``Sequences`` or an ``[N, L]`` token tensor (all tokens real)."""
    if isinstance(calib, Sequences):
        return calib
    return Sequences(calib, torch.ones_like(calib, dtype=torch.bool))


def calibration_sequences(examples, tokenizer, seq_len: int) -> Sequences:
    """Each calibration item as its own sequence (prompt + completion, at most ``seq_len`` tokens,
    keeping the end), sorted longest first so that batches carry little padding. Worked example:
    items of 5, 3 and 4 tokens give ``ids`` ``[3, 5]`` with masks of 5, 4 and 3 True."""
    if not examples:
        raise DataError("no calibration items")
    ids = sorted(tokenize_examples(list(examples), tokenizer, seq_len).ids, key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = torch.full((len(ids), len(ids[0])), pad, dtype=torch.long)
    mask = torch.zeros(out.shape, dtype=torch.bool)
    for i, s in enumerate(ids):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return Sequences(out, mask)

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


def example_texts(examples) -> list[str]:
    """The text of each example: prompt followed by completion."""
    return [e.prompt + e.completion for e in examples]


def heldout_windows(examples, tokenizer, seq_len: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` consecutive ``seq_len`` windows of the evaluation items: ``[k, seq_len]``
    (shorter windows when the items hold fewer tokens)."""
    stream = token_stream(example_texts(examples), tokenizer, limit * seq_len + 1)
    return consecutive_windows(stream, min(seq_len, max(stream.numel() // 2, 8)), limit)
