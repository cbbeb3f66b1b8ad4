"""Evaluating a (quantized) model, alone and against a reference model on the same items.

Pure metrics on tensors:

* ``kl_divergence(ref, q)``: ``Σ_v p_ref(v) (log p_ref(v) − log p_q(v))`` per scored position
  (reference ‖ quantized), from logits ``[N, V]``;
* ``top1_agreement``: the two argmaxes agree;
* ``mc_correct``: multiple-choice correctness from the log-likelihoods of the choices;
* ``count_flips``: questions whose correctness changed, in both directions.

The driver ``evaluate`` runs batched, padded, deterministic passes: MMLU accuracy from the
log-likelihood of each answer letter after the prompt (overall and per category) and the NLL
of the correct letter; teacher-forced mean NLL per solution token for GSM8k and custom tasks;
perplexity for text. With a reference model, KL, top-1 agreement (over every scored token) and
MMLU flips are added. Worked example: identical logits give KL 0 and agreement 1.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from circuitq.data.prompts import LETTERS
from circuitq.data.tasks import Batch, collate, tokenize_examples, wants_bos
from circuitq.errors import CircuitqError, UsageError


# ---------------------------------------------------------------------------------------------
# pure metrics
# ---------------------------------------------------------------------------------------------
def kl_divergence(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ q) per row: ``[N, V]`` logits -> ``[N]`` nats (computed in float32).

    Memory: two ``[N, V]`` float32 blocks beyond its inputs (the two log-softmaxes, then reused in
    place for ``log p − log q`` and ``p``; the row sums are a batched dot product), the count
    ``pipeline.budget`` assumes. The plain ``(p * (lr − lq)).sum()`` holds five, 0.8 GB more
    at ``N = 256`` with Gemma's 262k-token vocabulary."""
    lr = F.log_softmax(ref_logits.float(), -1)
    diff = F.log_softmax(q_logits.float(), -1).neg_().add_(lr)      # log p − log q
    p = lr.exp_()
    return (p.unsqueeze(-2) @ diff.unsqueeze(-1))[..., 0, 0].clamp(min=0)


def top1_agreement(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the argmax tokens agree."""
    return ref_logits.argmax(-1) == q_logits.argmax(-1)


def mc_correct(choice_logprobs: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` log-likelihoods and ``[N]`` answer indices -> ``[N]`` bool correct."""
    return choice_logprobs.argmax(-1) == answers


def count_flips(ref_correct: torch.Tensor, q_correct: torch.Tensor) -> dict:
    """Items whose correctness changed: ``lost`` (right -> wrong) and ``gained``."""
    return {"lost": int((ref_correct & ~q_correct).sum()), "gained": int((~ref_correct & q_correct).sum()),
            "total": int((ref_correct != q_correct).sum())}


def mean_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, device=None) -> float:
    """Mean next-token NLL (nats) over all predicted tokens of ``windows`` (``[k, L]``), from the
    final hidden states ``CHUNK`` positions at a time (memory: a ``[CHUNK, V]`` block, never the
    ``[b, L, V]`` logits of a batch)."""
    device = device or next(model.parameters()).device
    head = _Head(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, windows.shape[0], batch_size):
            ids = windows[b:b + batch_size].to(device)
            ones = torch.ones_like(ids, dtype=torch.bool)
            h = head.hidden(Batch(ids, ones, ones))[:, :-1]
            h = h.reshape(-1, h.shape[-1])
            tgt = ids[:, 1:].reshape(-1)
            for c in range(0, tgt.numel(), CHUNK):
                total += float(F.cross_entropy(head.logits(h[c:c + CHUNK]), tgt[c:c + CHUNK], reduction="sum"))
            count += tgt.numel()
    return total / max(count, 1)


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, device=None) -> float:
    return math.exp(mean_nll(model, windows, batch_size, device))


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    metrics: dict
    items: list[dict] = field(default_factory=list)


class TokenizerMismatch(CircuitqError, ValueError):
    pass


def check_same_vocab(tok_a, tok_b, model_a, model_b) -> None:
    """Refuse comparisons across different tokenizers or vocabularies."""
    va, vb = model_a.config.vocab_size, model_b.config.vocab_size
    if va != vb or tok_a.get_vocab() != tok_b.get_vocab():
        raise TokenizerMismatch(f"the model and the reference use different tokenizers or vocabularies "
                                f"(vocab sizes {va} vs {vb}); KL and agreement would be meaningless")


def _letter_ids(tokenizer, completion_prefix: str) -> list[int]:
    ids = []
    for l in LETTERS:
        t = tokenizer(completion_prefix + l, add_special_tokens=False)["input_ids"]
        ids.append(t[-1])
    if len(set(ids)) != 4:
        raise UsageError("the tokenizer does not give the four answer letters distinct tokens")
    return ids


@torch.no_grad()
def _scored_logits(model, batch, positions):
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), logits_to_keep=positions,
                use_cache=False)
    return out.logits.float()


CHUNK = 256   # positions per every-token comparison step: memory 4 · CHUNK · V bytes per logits copy


class _Head(NamedTuple):
    """A causal LM split at its output head: ``hidden(batch)`` -> ``[b, L, d]`` final hidden
    states; ``logits(h)`` -> ``[..., V]`` float32 (soft-capped where the config says so)."""

    model: torch.nn.Module

    @torch.no_grad()
    def hidden(self, batch) -> torch.Tensor:
        return self.model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                                        use_cache=False).last_hidden_state

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.model.get_output_embeddings()(h).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(out / cap) * cap if cap else out


def _all_key(b: int, j: int, c: int) -> str:
    return f"all/{b}/{j}/{c}"


def _all_token_record(q: _Head, hq, r: _Head | None, hr, ref_cache, out_cache, b: int, j: int,
                      targets, real) -> dict:
    """Every-token comparison of item ``j`` of batch ``b`` in chunks of ``CHUNK`` positions:
    ``hq``/``hr`` ``[T, d]`` final hidden states of the model and the reference (or the
    reference's float16 logits from ``ref_cache``), ``targets`` ``[T]``, ``real`` ``[T]`` bool.
    Writes this model's float16 logits into ``out_cache`` when given. Memory: a few ``[CHUNK, V]``."""
    idx = real.nonzero().flatten()
    n = int(idx.numel())
    nll = kl = agree = 0.0
    with_ref = r is not None or ref_cache is not None
    for c, c0 in enumerate(range(0, n, CHUNK)):
        pos = idx[c0:c0 + CHUNK]
        lq = q.logits(hq[pos])
        if out_cache is not None:
            out_cache[_all_key(b, j, c)] = lq.half().cpu()
        nll += float(F.cross_entropy(lq, targets[pos], reduction="sum"))
        if with_ref:
            lr = r.logits(hr[pos]) if r is not None else ref_cache[_all_key(b, j, c)].to(lq.device).float()
            kl += float(kl_divergence(lr, lq).sum())
            agree += float(top1_agreement(lr, lq).sum())
    rec = {"tokens_all": n, "nll_all": nll / max(n, 1)}
    if with_ref:
        rec.update(kl_all=kl / max(n, 1), top1_all=agree / max(n, 1))
    return rec


def evaluate(model, tokenizer, examples, kind: str, *, reference=None, batch_size: int = 8, seq_len: int = 1024,
             progress: bool = True, logits_out=None, reference_logits=None, all_tokens: bool = False) -> EvalResult:
    """Evaluate ``model`` (and compare to ``reference``) on ``examples`` of task ``kind``
    (``mmlu``, ``gsm8k``, ``jsonl``, ``text`` or a circuit task). Items run in order of length for
    little padding; per-item records keep the original order.

    Logits are made from the final hidden states ``CHUNK`` positions of one item at a time and
    reduced to the metrics at once (NLL, KL, top-1), so memory is the model, one batch's
    activations and a few ``[CHUNK, V]`` float32 blocks, never a batch's or the evaluation's logits.

    ``logits_out``: any ``{str: tensor}`` sink (a dict, or a ``storage.TensorWriter`` that puts
    them on disk) that receives this model's logits at the scored tokens (float32, a ``[≤CHUNK, V]``
    block per item and chunk); pass them back (the dict, or ``storage.LazyTensors`` over the file)
    as ``reference_logits`` to compare other models on the same examples and batch size without
    running the reference again.

    ``all_tokens`` (MMLU): also compare at every token of each item (``kl_all``, ``top1_all``,
    ``nll_all``), not only at the answer letter; the cached reference logits for that are float16."""
    device = next(model.parameters()).device
    tok = tokenize_examples(examples, tokenizer, seq_len)
    order = sorted(range(len(tok.ids)), key=lambda i: len(tok.ids[i]))
    letters = _letter_ids(tokenizer, examples[0].completion[:-1]) if kind == "mmlu" else None
    circuit = CircuitMetric(kind, tokenizer) if kind in CIRCUIT_KINDS else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    whole = all_tokens and kind == "mmlu"
    q_head, r_head = _Head(model), (_Head(reference) if reference is not None else None)
    with_ref = reference is not None or reference_logits is not None
    items: list[dict | None] = [None] * len(examples)
    kl_sum = agree_sum = n_tok = 0.0
    for b in tqdm(range(0, len(order), batch_size), desc=f"eval {kind}", disable=not progress):
        idx = order[b:b + batch_size]
        batch = collate([tok.ids[i] for i in idx], [tok.scored_from[i] for i in idx], pad)
        batch = type(batch)(*(t.to(device) for t in batch))
        hq = q_head.hidden(batch)
        hr = r_head.hidden(batch) if r_head is not None else None
        for j, i in enumerate(idx):
            pos = batch.loss_mask[j, :-1].nonzero().flatten()
            tgt = batch.input_ids[j, pos + 1]
            keep_all = circuit is not None and circuit.kind == "induction"
            sc = _scored(q_head, hq[j], r_head, hr[j] if hr is not None else None, reference_logits, logits_out,
                         f"{b}/{j}", pos, tgt, keep_all)
            n = int(pos.numel())
            rec = {"index": i, "tokens": n, "nll": sc.nll / max(n, 1)}
            if with_ref:
                rec.update(kl=sc.kl / max(n, 1), top1_agree=sc.agree / max(n, 1))
                kl_sum += sc.kl
                agree_sum += sc.agree
            n_tok += n
            if whole:
                rec.update(_all_token_record(q_head, hq[j, :-1], r_head, hr[j, :-1] if hr is not None else None,
                                             reference_logits, logits_out, b, j, batch.input_ids[j, 1:],
                                             batch.attention_mask[j, 1:]))
            if circuit is not None:
                rec.update(circuit.record(sc.first_q, sc.all_q, tgt, examples[i]))
            if letters is not None:
                rec.update(_mc_record(sc.first_q, sc.first_r, letters, examples[i]))
            items[i] = rec
    return EvalResult(_summarize(items, kind, kl_sum, agree_sum, n_tok, with_ref), items)


class _Sums(NamedTuple):
    nll: float
    kl: float
    agree: float
    first_q: torch.Tensor            # [V] logits at the first scored position
    first_r: torch.Tensor | None     # [V] the reference's there
    all_q: torch.Tensor | None       # [k, V] every scored position (only when asked)


def _scored(q: _Head, hq, r: _Head | None, hr, ref_cache, out_cache, key: str, pos, tgt, keep_all: bool) -> _Sums:
    """Sums of NLL, KL(reference ‖ model) and top-1 agreement over one item's scored positions
    ``pos`` (targets ``tgt``), ``CHUNK`` at a time; ``hq``/``hr``: ``[T, d]`` final hidden states
    (the reference's logits come from ``hr`` or from ``ref_cache`` under ``KEY/c``)."""
    nll = kl = agree = 0.0
    first_q = first_r = None
    blocks = []
    for c, c0 in enumerate(range(0, int(pos.numel()), CHUNK)):
        p = pos[c0:c0 + CHUNK]
        lq = q.logits(hq[p])
        if out_cache is not None:
            out_cache[f"{key}/{c}"] = lq.cpu()
        nll += float(F.cross_entropy(lq, tgt[c0:c0 + CHUNK], reduction="sum"))
        lr = None
        if r is not None:
            lr = r.logits(hr[p])
        elif ref_cache is not None:
            lr = ref_cache[f"{key}/{c}"].to(lq.device).float()
        if lr is not None:
            kl += float(kl_divergence(lr, lq).sum())
            agree += float(top1_agreement(lr, lq).sum())
        if c == 0:   # copies: a view would keep this chunk's [CHUNK, V] blocks alive through the next
            first_q, first_r = lq[0].clone(), (lr[0].clone() if lr is not None else None)
        if keep_all:
            blocks.append(lq)
    return _Sums(nll, kl, agree, first_q, first_r, torch.cat(blocks) if keep_all else None)


CIRCUIT_KINDS = ("ioi", "greater-than", "induction", "capitals")
CIRCUIT_METRIC = {"ioi": "logit_diff", "greater-than": "prob_diff", "induction": "token_accuracy",
                  "capitals": "logit_margin"}


class CircuitMetric:
    """The canonical metric of a circuit task (``data.circuit_tasks``) from the logits at the
    completion. ``first``: ``[V]`` logits at the first completion position; ``all_``/``tgt``:
    ``[k, V]`` logits and ``[k]`` targets over the completion.

    * ioi: ``logit(IO) − logit(S)`` (first tokens of the two names), correct when > 0;
    * greater-than: over the ten digit tokens, ``P(d > start) − P(d < start)``, correct when > 0;
    * induction: top-1 accuracy over the repeated half;
    * capitals: correct when the capital's first token is the argmax; margin = its logit minus
      the best other token's.
    Worked example (ioi): logits 3.0 at " Mary" and 1.0 at " John" give logit_diff 2.0, correct."""

    def __init__(self, kind: str, tokenizer):
        self.kind, self.tok, self._ids = kind, tokenizer, {}
        if kind == "greater-than":
            ids = [tokenizer(str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
            if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != 10:
                raise UsageError("greater-than needs a tokenizer with one token per digit")
            self.digits = [i[0] for i in ids]

    def _first(self, text: str) -> int:
        if text not in self._ids:
            self._ids[text] = self.tok(text, add_special_tokens=False)["input_ids"][0]
        return self._ids[text]

    def record(self, first: torch.Tensor, all_: torch.Tensor, tgt: torch.Tensor, ex) -> dict:
        if self.kind == "ioi":
            d = float(first[self._first(ex.meta["target"])] - first[self._first(ex.meta["distractor"])])
            return {"logit_diff": d, "correct": d > 0}
        if self.kind == "greater-than":
            p = F.softmax(first.float(), -1)[self.digits]
            s = ex.meta["start"]
            d = float(p[s + 1:].sum() - p[:s].sum())
            return {"prob_diff": d, "correct": d > 0}
        if self.kind == "induction":
            acc = float((all_.argmax(-1) == tgt).float().mean())
            return {"token_accuracy": acc, "correct": acc > 0.5}
        t = self._first(ex.meta["target"])
        others = first.clone()
        others[t] = float("-inf")
        margin = float(first[t] - others.max())
        return {"logit_margin": margin, "correct": margin > 0}


def _mc_record(lq_row, lr_row, letters, ex) -> dict:
    ans = LETTERS.index(ex.meta["answer"])
    lp = F.log_softmax(lq_row[letters], -1)
    rec = {"category": ex.meta.get("category"), "subject": ex.meta.get("subject"), "answer": ex.meta["answer"],
           "pred": LETTERS[int(lp.argmax())], "correct": bool(lp.argmax() == ans),
           "letter_nll": float(-F.log_softmax(lq_row, -1)[letters[ans]])}
    if lr_row is not None:
        rec["ref_correct"] = bool(lr_row[letters].argmax() == ans)
    return rec


def _summarize(items, kind, kl_sum, agree_sum, n_tok, with_ref) -> dict:
    n = len(items)
    tok = sum(r["tokens"] for r in items)
    out = {"task": kind, "items": n, "scored_tokens": tok,
           "nll_per_token": sum(r["nll"] * r["tokens"] for r in items) / max(tok, 1)}
    if kind == "text":
        out["perplexity"] = math.exp(out["nll_per_token"])
    if with_ref:
        out["kl"] = kl_sum / max(n_tok, 1)
        out["top1_agreement"] = agree_sum / max(n_tok, 1)
    if items and "tokens_all" in items[0]:
        tall = sum(r["tokens_all"] for r in items)
        out["scored_tokens_all"] = tall
        out["nll_all"] = sum(r["nll_all"] * r["tokens_all"] for r in items) / max(tall, 1)
        if with_ref:
            out["kl_all"] = sum(r["kl_all"] * r["tokens_all"] for r in items) / max(tall, 1)
            out["top1_all"] = sum(r["top1_all"] * r["tokens_all"] for r in items) / max(tall, 1)
    if kind in CIRCUIT_KINDS:
        key = CIRCUIT_METRIC[kind]
        out["task_metric"] = key
        out[key] = sum(r[key] for r in items) / max(n, 1)
        out["accuracy"] = sum(r["correct"] for r in items) / max(n, 1)
    if kind == "mmlu":
        correct = torch.tensor([r["correct"] for r in items])
        out["accuracy"] = float(correct.float().mean())
        out["letter_nll"] = sum(r["letter_nll"] for r in items) / n
        cats: dict[str, list[bool]] = {}
        for r in items:
            cats.setdefault(r["category"], []).append(r["correct"])
        out["accuracy_by_category"] = {c: sum(v) / len(v) for c, v in sorted(cats.items())}
        if with_ref:
            ref = torch.tensor([r["ref_correct"] for r in items])
            out["reference_accuracy"] = float(ref.float().mean())
            out["flips"] = count_flips(ref, correct)
    return out


# ---------------------------------------------------------------------------------------------
# GSM8k generation (optional: slow on a CPU)
# ---------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_final_number(text: str) -> str | None:
    """The final answer of a GSM8k-style solution: the text is cut where a next few-shot question
    starts (``\\nQ:``); then the number after ``The answer is`` (the chain-of-thought format) or
    after ``####`` if present, else the last number; commas and a trailing ``.0`` dropped. None
    when there is no number. Worked example: ``"3 + 4 = 7\\n#### 7"`` -> ``"7"``; ``"so 1,200
    apples."`` -> ``"1200"``; ``"2 + 2 = 4. The answer is 4.\\n\\nQ: 9 cats"`` -> ``"4"``."""
    text = text.split("\nQ:", 1)[0]
    marker = next((m for m in ("The answer is", "####") if m in text), None)
    part = text.split(marker, 1)[1] if marker == "The answer is" else text.rsplit("####", 1)[-1] if marker else text
    found = _NUMBER.findall(part)
    if not found:
        return None
    n = found[0] if marker else found[-1]
    n = n.replace(",", "")
    return n[:-2] if n.endswith(".0") else n


@torch.no_grad()
def generate_exact_match(model, tokenizer, examples, max_new_tokens: int = 256, batch_size: int = 8,
                         progress: bool = True) -> dict:
    """Greedy generation after each prompt, the final number parsed and compared with the
    reference answer (``meta["final"]``). Returns accuracy over the parseable outputs, the count of
    outputs with no number (reported, never an error) and per-item records."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    items, unparsed = [], 0
    try:
        for b in tqdm(range(0, len(examples), batch_size), desc="generate", disable=not progress):
            chunk = examples[b:b + batch_size]
            enc = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=wants_bos(tokenizer)).to(device)   # BOS where the model wants it
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for e, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                text = tokenizer.decode(seq, skip_special_tokens=True)
                pred = parse_final_number(text)
                unparsed += pred is None
                ref = parse_final_number(str(e.meta.get("final", "")))
                items.append({"pred": pred, "answer": ref, "correct": pred is not None and pred == ref})
    finally:
        tokenizer.padding_side = side
    n = len(items)
    return {"exact_match": sum(r["correct"] for r in items) / max(n, 1), "items": n, "unparseable": unparsed,
            "records": items}
