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

import torch
import torch.nn.functional as F

LETTERS = "ABCD"


# ---------------------------------------------------------------------------------------------
# pure metrics
# ---------------------------------------------------------------------------------------------
def kl_divergence(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ q) per row: ``[N, V]`` logits -> ``[N]`` nats (float32 or wider)."""
    lr = F.log_softmax(ref_logits.float(), -1)
    lq = F.log_softmax(q_logits.float(), -1)
    return (lr.exp() * (lr - lq)).sum(-1).clamp(min=0)


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
    """Mean next-token NLL (nats) over all predicted tokens of ``windows`` (``[k, L]``)."""
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, windows.shape[0], batch_size):
            ids = windows[b:b + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
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


class TokenizerMismatch(ValueError):
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
        raise ValueError("the tokenizer does not give the four answer letters distinct tokens")
    return ids


@torch.no_grad()
def _scored_logits(model, batch, positions):
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), logits_to_keep=positions,
                use_cache=False)
    return out.logits.float()


def evaluate(model, tokenizer, examples, kind: str, reference=None, batch_size: int = 8, seq_len: int = 1024,
             progress: bool = True, logits_out: dict | None = None, reference_logits: dict | None = None,
             all_tokens: bool = False) -> EvalResult:
    """Evaluate ``model`` (and compare to ``reference``) on ``examples`` of task ``kind``
    (``mmlu``, ``gsm8k``, ``jsonl`` or ``text``). Items run in order of length for little padding;
    per-item records keep the original order.

    ``logits_out``: filled with this model's logits at the scored tokens (``{batch start: [n, V]}``
    float32 on the CPU); pass it back as ``reference_logits`` to compare other models on the same
    examples and batch size without running the reference again.

    ``all_tokens`` (MMLU): also compare at every token of each item (``kl_all``, ``top1_all``,
    ``nll_all``), not only at the answer letter; the cached reference logits for that are kept
    in float16 under the keys ``("all", batch start)``."""
    from tqdm.auto import tqdm

    from circuitq.data.tasks import collate, scored_positions, tokenize_examples

    device = next(model.parameters()).device
    tok = tokenize_examples(examples, tokenizer, seq_len)
    order = sorted(range(len(tok.ids)), key=lambda i: len(tok.ids[i]))
    letters = _letter_ids(tokenizer, examples[0].completion[:-1]) if kind == "mmlu" else None
    circuit = CircuitMetric(kind, tokenizer) if kind in CIRCUIT_KINDS else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items: list[dict | None] = [None] * len(examples)
    kl_sum = agree_sum = n_tok = 0.0
    for b in tqdm(range(0, len(order), batch_size), desc=f"eval {kind}", disable=not progress):
        idx = order[b:b + batch_size]
        batch = collate([tok.ids[i] for i in idx], [tok.scored_from[i] for i in idx], pad)
        batch = type(batch)(*(t.to(device) for t in batch))
        pos = scored_positions(batch.loss_mask)
        whole = all_tokens and kind == "mmlu"
        full_q = _scored_logits(model, batch, 0)[:, :-1] if whole else None
        lq = full_q[:, pos] if whole else _scored_logits(model, batch, pos)
        m = batch.loss_mask[:, pos]
        if logits_out is not None:
            logits_out[b] = lq[m].cpu()
        full_r = None
        if whole:
            real = batch.attention_mask[:, 1:]
            if logits_out is not None:
                logits_out[("all", b)] = full_q[real].half().cpu()
            if reference is not None:
                full_r = _scored_logits(reference, batch, 0)[:, :-1]
            elif reference_logits is not None:
                full_r = torch.zeros_like(full_q)
                full_r[real] = reference_logits[("all", b)].to(full_q.device).float()
        lr = (full_r[:, pos] if full_r is not None else _scored_logits(reference, batch, pos)) \
            if reference is not None else None
        if reference_logits is not None:
            lr = torch.zeros_like(lq)
            lr[m] = reference_logits[b].to(lq.device)
        tgt = batch.input_ids[:, pos + 1]
        nll = F.cross_entropy(lq.transpose(1, 2), tgt, reduction="none")
        for j, i in enumerate(idx):
            sel = m[j]
            rec = {"index": i, "tokens": int(sel.sum()), "nll": float(nll[j][sel].mean())}
            if lr is not None:
                kl = kl_divergence(lr[j][sel], lq[j][sel])
                ag = top1_agreement(lr[j][sel], lq[j][sel])
                rec.update(kl=float(kl.mean()), top1_agree=float(ag.float().mean()))
                kl_sum += float(kl.sum())
                agree_sum += float(ag.sum())
            n_tok += int(sel.sum())
            if whole:
                rec.update(_all_token_record(full_q[j], full_r[j] if full_r is not None else None,
                                             batch.input_ids[j, 1:], batch.attention_mask[j, 1:]))
            if circuit is not None:
                first = int(sel.nonzero()[0])
                rec.update(circuit.record(lq[j, first], lq[j][sel], tgt[j][sel], examples[i]))
            if letters is not None:
                p = int(sel.nonzero()[0])  # the answer-letter position
                rec.update(_mc_record(lq[j, p], lr[j, p] if lr is not None else None, letters, examples[i]))
            items[i] = rec
    with_ref = reference is not None or reference_logits is not None
    return EvalResult(_summarize(items, kind, kl_sum, agree_sum, n_tok, with_ref), items)


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
                raise ValueError("greater-than needs a tokenizer with one token per digit")
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


def _all_token_record(lq, lr, targets, real) -> dict:
    """Every-token comparison of one item: ``lq``/``lr`` ``[T, V]`` logits, ``targets`` ``[T]``,
    ``real`` ``[T]`` bool."""
    lq, t = lq[real], targets[real]
    rec = {"tokens_all": int(real.sum()), "nll_all": float(F.cross_entropy(lq, t))}
    if lr is not None:
        lr = lr[real]
        rec.update(kl_all=float(kl_divergence(lr, lq).mean()), top1_all=float(top1_agreement(lr, lq).float().mean()))
    return rec


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
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    items, unparsed = [], 0
    try:
        for b in tqdm(range(0, len(examples), batch_size), desc="generate", disable=not progress):
            chunk = examples[b:b + batch_size]
            enc = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
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
