"""What a gradient pass differentiates, per item: the objective of the per-sample gradients.

* ``nll`` (default): the mean next-token NLL over the item's scored positions
  (``capture.sample_losses``), the loss TaCQ's scores and every estimator have used.
* ``metric``: minus the circuit task's own metric at the first completion position, the quantity
  a circuit is judged by (Wang et al. 2022; Hanna et al. 2023; the same definitions as
  ``evals.CircuitMetric``):

  - ioi: ``−(logit(IO) − logit(S))``;
  - greater-than: ``−(P(d > start) − P(d < start))`` over the ten digit tokens (softmax over the
    whole vocabulary);
  - capitals: ``−(logit(capital) − max over other tokens)``.

  Induction's metric (top-1 accuracy) has no gradient and the benchmarks' tasks have no
  contrast: they take ``nll``. The sign keeps circuitq's convention: a positive attribution means
  replacing the weight is predicted to *hurt* the task. Attribution patching on the IOI logit
  difference is the classical form (Nanda 2023; Syed et al. 2023); on IOI, quantizing heads lowers
  the NLL of the answer and the logit difference by different amounts, so the two objectives
  rank heads differently (``analyses/faithful_maps.py``).

Pure functions of logits: ``[B, K, V]`` logits at the scored positions ``pos`` (``[K]``, as
``logits_to_keep`` returns them), the batch's ``loss_mask`` ``[B, T]`` and its items; returns
``[B]`` float32.
"""
from __future__ import annotations

import torch

from circuitq.config import METRIC_KINDS, OBJECTIVES  # ("ioi", "greater-than", "capitals"), ("nll", "metric")
from circuitq.errors import UsageError


def sample_losses(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token NLL over each sample's scored positions: ``[B]``. ``loss_mask[b, t]``
    marks that position ``t`` predicting token ``t+1`` is scored. With ``positions`` (``[K]``),
    ``logits`` holds only those positions (``[B, K, V]``), as computed with ``logits_to_keep``."""
    if positions is None:
        positions = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
        logits = logits[:, :-1]
    targets = input_ids[:, positions + 1]
    lp = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    m = loss_mask[:, positions].to(lp.dtype)
    return (lp * m).sum(1) / m.sum(1).clamp(min=1)


def first_completion_logits(logits: torch.Tensor, loss_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[B, V]``: each item's logits at its first scored position (the one predicting the first
    completion token). Worked example: scored positions ``pos = [3, 4]``, an item scored from 4
    takes ``logits[b, 1]``."""
    first = loss_mask.float().argmax(1)                       # first True per row
    k = (pos[None, :] == first[:, None]).float().argmax(1)    # its index among the kept positions
    return logits[torch.arange(logits.shape[0], device=logits.device), k]


class Objective:
    """Per-item losses ``[B]`` of one batch under ``name`` (``OBJECTIVES``); ``tokenizer`` resolves
    the metric's tokens (first token of each name, the ten digits) once."""

    def __init__(self, name: str, tokenizer=None):
        if name not in OBJECTIVES:
            raise UsageError(f"unknown objective '{name}' for --objective; choose one of {', '.join(OBJECTIVES)}")
        self.name, self.tok, self._ids, self._digits = name, tokenizer, {}, None

    def _first(self, text: str) -> int:
        if text not in self._ids:
            self._ids[text] = self.tok(text, add_special_tokens=False)["input_ids"][0]
        return self._ids[text]

    def digits(self) -> list[int]:
        if self._digits is None:
            ids = [self.tok(str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
            if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != 10:
                raise UsageError("greater-than needs a tokenizer with one token per digit")
            self._digits = [i[0] for i in ids]
        return self._digits

    def metric(self, first: torch.Tensor, examples) -> torch.Tensor:
        """``[B]`` the task metric from ``first`` (``[B, V]``) of each item (``Example.meta``'s
        ``kind`` and its tokens)."""
        out = []
        for b, ex in enumerate(examples):
            kind, row = ex.meta.get("kind"), first[b].float()
            if kind == "ioi":
                out.append(row[self._first(ex.meta["target"])] - row[self._first(ex.meta["distractor"])])
            elif kind == "greater-than":
                p = torch.softmax(row, -1)[self.digits()]
                s = ex.meta["start"]
                out.append(p[s + 1:].sum() - p[:s].sum())
            elif kind == "capitals":
                t = self._first(ex.meta["target"])
                others = torch.cat([row[:t], row[t + 1:]])
                out.append(row[t] - others.max())
            else:
                raise UsageError(f"--objective metric needs a circuit task with a differentiable metric "
                                 f"({', '.join(METRIC_KINDS)}); this item's task is {kind or 'a benchmark'}: "
                                 "use --objective nll")
        return torch.stack(out)

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, pos: torch.Tensor,
                 examples) -> torch.Tensor:
        if self.name == "nll":
            return sample_losses(logits, input_ids, loss_mask, pos)
        return -self.metric(first_completion_logits(logits, loss_mask, pos), examples)


def check_objective(name: str, kind: str, loss: str = "answer") -> None:
    """One line before any work when ``name`` cannot be taken on a task of ``kind``."""
    if name not in OBJECTIVES:
        raise UsageError(f"unknown objective '{name}' for --objective; choose one of {', '.join(OBJECTIVES)}")
    if name == "metric" and kind not in METRIC_KINDS:
        raise UsageError(f"--objective metric needs a circuit task with a differentiable metric ({', '.join(METRIC_KINDS)}), "
                         f"not {kind}; use --objective nll")
    if name == "metric" and loss != "answer":
        raise UsageError(f"--objective metric reads the first completion position: it needs --loss answer, not {loss}")
