"""Tasks as (prompt, completion) examples, tokenized with a loss mask on the completion.

* ``mmlu`` / ``mmlu:stem|humanities|social_sciences|other`` / ``mmlu:SUBJECT``: question and
  lettered choices (k-shot from the dev split; ``template`` auto/chat puts it through the model's
  chat template when it has one, raw does not); the completion is the answer letter.
* ``gsm8k``: question -> worked solution (k-shot: the chain-of-thought exemplars and
  "The answer is N."); loss on the solution tokens only.

Prompt formats are data in ``data.prompts``; ``shots=-1`` is each task's standard count.
* ``text:PATH``: a .txt or .jsonl corpus; loss on all tokens.
* ``jsonl:PATH``: custom ``{"prompt", "completion"}`` lines.

Calibration and evaluation splits are a seeded permutation of the rows: ``calib`` takes the
first part and ``eval`` the rest, so they never overlap. The MMLU subject -> category table is
the MMLU paper's grouping (Hendrycks et al., 2021).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from circuitq.config import LOSS_SCOPES, DataConfig
from circuitq.data.circuit_tasks import CIRCUIT_TASKS, GENERATORS, SIZED_TASKS
from circuitq.data.prompts import (
    GSM8K_COT_EXEMPLARS,
    LETTERS,
    gsm8k_completion,
    gsm8k_prompt,
    mmlu_header,
    mmlu_question,
    resolve_shots,
)
from circuitq.data.readers import (
    DataError,
    default_data_dir,
    read_gsm8k,
    read_mmlu,
    read_prompt_completion,
    read_text_corpus,
)
from circuitq.errors import UsageError

_SUBCATEGORY = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
_CATEGORY_OF_SUB = {
    "stem": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social_sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other": ("other", "business", "health"),
}
MMLU_CATEGORY = {s: next(c for c, subs in _CATEGORY_OF_SUB.items() if sub in subs) for s, sub in _SUBCATEGORY.items()}
MMLU_CATEGORIES = tuple(_CATEGORY_OF_SUB)


@dataclass(frozen=True)
class Example:
    """``prompt`` + ``completion``; ``content``: the character span ``[a, b)`` of the task's own
    text inside ``prompt`` when a chat template wraps it (``None``: the prompt is all task text).
    ``--loss text`` leaves the tokens outside that span, the template's, out of the loss."""

    prompt: str
    completion: str
    meta: dict = field(default_factory=dict)
    content: tuple[int, int] | None = None


@dataclass(frozen=True)
class TaskKind:
    """What the rest of circuitq needs to know about a kind of task: ``chance``, the accuracy of
    guessing (None where the task has no accuracy)."""

    name: str
    chance: float | None = None


TASK_KINDS = {k.name: k for k in (TaskKind("mmlu", 0.25), TaskKind("gsm8k"), TaskKind("text"), TaskKind("jsonl"),
                                  TaskKind("ioi", 0.5), TaskKind("greater-than", 0.5), TaskKind("induction", 0.0),
                                  TaskKind("capitals", 0.0))}
assert set(CIRCUIT_TASKS) <= set(TASK_KINDS), "every circuit task needs its TaskKind"


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task name. ``kind``: mmlu, gsm8k, text or jsonl; ``arg``: category, subject or path."""

    kind: str
    arg: str | None = None

    @classmethod
    def parse(cls, name: str) -> "TaskSpec":
        kind, _, arg = name.partition(":")
        if kind not in TASK_KINDS:
            raise DataError(f"unknown task '{name}': use mmlu, mmlu:CATEGORY ({', '.join(MMLU_CATEGORIES)}), "
                            f"mmlu:SUBJECT, gsm8k, {', '.join(CIRCUIT_TASKS)}, text:PATH or jsonl:PATH")
        if kind in CIRCUIT_TASKS and arg and (kind not in SIZED_TASKS or not arg.isdigit() or not 1 <= int(arg) <= 100_000):
            raise DataError(f"task '{name}': " + (f"the argument is the number of items per split, 1 to 100000, e.g. "
                                                  f"{kind}:800 (default {SIZED_TASKS[kind]})" if kind in SIZED_TASKS
                                                  else f"'{kind}' takes no argument (its pool is fixed)"))
        if kind in ("text", "jsonl") and not arg:
            raise DataError(f"task '{name}' needs a path, e.g. {kind}:corpus.{'txt' if kind == 'text' else 'jsonl'}")
        if kind == "mmlu" and arg and arg not in MMLU_CATEGORIES and arg not in _SUBCATEGORY:
            raise DataError(f"unknown MMLU subject or category '{arg}'; categories: {', '.join(MMLU_CATEGORIES)}; "
                            f"subjects like {', '.join(list(_SUBCATEGORY)[:4])}, ...")
        return cls(kind, arg or None)

    @property
    def name(self) -> str:
        return self.kind + (f":{self.arg}" if self.arg else "")


class Examples(list):
    """A list of ``Example`` that also counts the rows left out because their answer could not be
    parsed (``skipped``), so a run reports them instead of crashing."""

    skipped: int = 0


def _parseable(r: dict) -> bool:
    return str(r.get("answer", "")).strip() in tuple(LETTERS)


def _mmlu_rows(spec: TaskSpec, data_dir, source: str = "val") -> tuple[list[dict], list[dict]]:
    rows, dev = read_mmlu(data_dir, source), [d for d in read_mmlu(data_dir, "dev") if _parseable(d)]
    if spec.arg in MMLU_CATEGORIES:
        keep = lambda r: MMLU_CATEGORY.get(r["subject"]) == spec.arg  # noqa: E731
    elif spec.arg:
        keep = lambda r: r["subject"] == spec.arg  # noqa: E731
    else:
        keep = lambda r: True  # noqa: E731
    rows = [r for r in rows if keep(r)]
    if not rows:
        raise DataError(f"MMLU selection '{spec.name}' has no questions in the {source} split")
    return rows, dev


def mmlu_example(q: dict, shots: list[dict], tokenizer=None, template: str = "auto") -> Example:
    """One MMLU question as an example; the completion is the answer letter. ``template``:
    ``raw`` (plain text, the official recipe), ``chat`` (the model's chat template; an error when it
    has none) or ``auto`` (chat when the tokenizer has a template)."""
    body = mmlu_header(q["subject"]) + "".join(mmlu_question(s, True) for s in shots) + mmlu_question(q, False)
    meta = {"subject": q["subject"], "category": MMLU_CATEGORY.get(q["subject"], "other"), "answer": q["answer"]}
    has_chat = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    if template == "chat" and not has_chat:
        raise DataError("--template chat: this tokenizer has no chat template; use --template raw")
    if template != "raw" and has_chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                               add_generation_prompt=True)
        a = prompt.find(body)
        return Example(prompt, q["answer"], meta, (a, a + len(body)) if a >= 0 else None)
    return Example(body, " " + q["answer"], meta)


def gsm8k_example(r: dict, shots: int) -> Example:
    final = r["answer"].rsplit("####", 1)[-1].strip()
    return Example(gsm8k_prompt(r["question"], shots), gsm8k_completion(r["answer"], final, shots), {"final": final})


def _shots_used(kind: str, shots: int, available: int, what: str, say=print) -> int:
    """Shots asked for, capped at what the source holds (and said so)."""
    k = resolve_shots(kind, shots)
    if k > available:
        say(f"[circuitq] --shots {shots}: {what} holds only {available}; using {available}")
        k = available
    return k


def _permute(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


# the public split each task calibrates on, and its standard test split
CALIB_SOURCE = {"mmlu": "val", "gsm8k": "train"}
TEST_PATHS = {"mmlu": "mmlu/test/SUBJECT_test.csv", "gsm8k": "gsm8k/test.jsonl"}


def has_test_split(kind: str, data_dir) -> bool:
    """Whether the standard test split of ``kind`` is present in the data directory."""
    d = Path(data_dir) if data_dir else default_data_dir()
    if kind not in TEST_PATHS or d is None:
        return False
    return any((d / "mmlu" / "test").glob("*_test.csv")) if kind == "mmlu" else (d / "gsm8k" / "test.jsonl").exists()


def resolve_eval_split(kind: str, eval_split: str, data_dir) -> str:
    """``test`` or ``halves`` for a task kind: ``auto`` picks the test split when it is present."""
    if eval_split == "auto":
        return "test" if has_test_split(kind, data_dir) else "halves"
    if eval_split == "test" and not has_test_split(kind, data_dir):
        if kind not in TEST_PATHS:
            raise DataError(f"--eval-split test: task kind '{kind}' has no standard test split; use --eval-split halves")
        raise DataError(f"--eval-split test: {TEST_PATHS[kind]} not found under the data directory; put the public "
                        "test split there or use --eval-split halves")
    return eval_split


def split_description(task: str, eval_split: str, data_dir, split_seed: int, calib_fraction: float) -> dict:
    """Where a task's calibration and evaluation items come from, in words (for reports)."""
    kind = TaskSpec.parse(task).kind
    if kind in CIRCUIT_TASKS:
        return {"mode": "generated", "eval": f"{kind} items generated from the evaluation pool (seed {split_seed})",
                "calib": "items from the disjoint calibration pool (other names, countries, years or sequences)"}
    mode = resolve_eval_split(kind, eval_split, data_dir)
    src = CALIB_SOURCE.get(kind, "rows")
    if mode == "test":
        return {"mode": "test", "eval": f"{kind} test split", "calib": f"{kind} {src} split (all of it)"}
    return {"mode": "halves", "eval": f"{1 - calib_fraction:.0%} of {kind} {src} (split_seed {split_seed})",
            "calib": f"the other {calib_fraction:.0%} (disjoint)",
            "note": "no test split in the data directory: calibration and evaluation are disjoint halves"
            if kind in TEST_PATHS else "custom task: disjoint halves"}


def load_examples(task: str, split: str = "calib", n: int | None = None, *, seed: int = 0, shots: int = 0,
                  data_dir: str | Path | None = None, tokenizer=None, calib_fraction: float = 0.5,
                  template: str = "auto", eval_split: str = "halves") -> list[Example]:
    """Examples of ``task`` for ``split`` (``calib`` or ``eval``, disjoint by construction).
    ``shots``: few-shot examples (``-1``: the task's standard count), capped at what exists.
    ``eval_split``: ``halves`` (a seeded permutation of MMLU val / GSM8k train cut in two),
    ``test`` (evaluate on the standard test split, calibrate on all of val / train) or ``auto``
    (test when present)."""
    if split not in ("calib", "eval"):
        raise DataError(f"split must be 'calib' or 'eval', got '{split}'")
    spec = TaskSpec.parse(task)
    if spec.kind in CIRCUIT_TASKS:   # generated: the two splits come from disjoint pools
        size = {"n": int(spec.arg)} if spec.arg else {}   # ioi:800: 800 items per split, the first 400 ioi's own
        out = Examples(Example(p, c, {**m, "kind": spec.kind}) for p, c, m in GENERATORS[spec.kind](split, seed, **size))
        return out[:n] if n is not None else out
    mode = resolve_eval_split(spec.kind, eval_split, data_dir)
    source = ("test" if split == "eval" else CALIB_SOURCE[spec.kind]) if mode == "test" else None
    if spec.kind == "mmlu":
        rows, dev = _mmlu_rows(spec, data_dir, source or "val")
        by_subject: dict[str, list[dict]] = {}
        for d in dev:
            by_subject.setdefault(d["subject"], []).append(d)
        fewest = min((len(by_subject.get(r["subject"], [])) for r in rows), default=0)
        k = _shots_used("mmlu", shots, fewest, "the MMLU dev split (per subject)") if shots else 0
        make = lambda r: mmlu_example(r, by_subject.get(r["subject"], [])[:k], tokenizer, template)  # noqa: E731
    elif spec.kind == "gsm8k":
        rows = read_gsm8k(data_dir, source or "train")
        k = _shots_used("gsm8k", shots, len(GSM8K_COT_EXEMPLARS), "the chain-of-thought exemplar set") if shots else 0
        make = lambda r: gsm8k_example(r, k)  # noqa: E731
    elif spec.kind == "text":
        rows = read_text_corpus(spec.arg)
        make = lambda r: Example("", r)  # noqa: E731
    else:
        rows = read_prompt_completion(spec.arg)
        make = lambda r: Example(r["prompt"], r["completion"])  # noqa: E731
    order = _permute(len(rows), seed)
    cut = int(round(len(rows) * calib_fraction))
    idx = order if mode == "test" else order[:cut] if split == "calib" else order[cut:]
    if not idx:
        hint = (" (a .txt corpus is split into documents at blank lines: separate them with empty lines, or use "
                "a .jsonl file with one {\"text\": ...} per line)") if task.startswith("text:") else \
            " (it needs at least two rows: one to calibrate on, one to evaluate on)"
        raise DataError(f"the {split} split of '{task}' is empty ({len(rows)} rows in all){hint}")
    ok = _parseable if spec.kind == "mmlu" else (lambda r: "####" in r["answer"]) if spec.kind == "gsm8k" else None
    out = Examples()
    if ok is not None:
        bad = [i for i in idx if not ok(rows[i])]
        idx = [i for i in idx if ok(rows[i])]
        out.skipped = len(bad)
        if bad:
            print(f"[circuitq] {task}: {len(bad)} rows of the {split} split have no parseable answer and are left out")
        if not idx:
            raise DataError(f"no row of the {split} split of '{task}' has a parseable answer")
    if n is not None:
        idx = idx[:n]
    out.extend(make(rows[i]) for i in idx)
    return out


class Batch(NamedTuple):
    input_ids: torch.Tensor      # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] bool
    loss_mask: torch.Tensor       # [B, T] bool: position t predicts token t+1 and is scored


class Tokenized(NamedTuple):
    ids: list[list[int]]
    scored_from: list[int]   # index of the first scored token in each sequence (the completion's, or 1)
    truncated: int
    # per sequence, indices of tokens at or after ``scored_from`` that are not scored (the chat
    # template's, under ``loss="text"``); ``None``: none
    unscored: list[list[int]] | None = None


def _template_tokens(ex: Example, tokenizer, n_prompt: int) -> list[int]:
    """Indices of the prompt tokens that lie outside ``ex.content`` (the chat template's)."""
    if ex.content is None:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("--loss text needs a fast tokenizer (its offsets locate the chat template); "
                        "use --loss all, or --template raw")
    a, b = ex.content
    offs = tokenizer(ex.prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offs) == n_prompt, (len(offs), n_prompt)
    return [i for i, (s, e) in enumerate(offs) if not (s < b and e > a)]


def wants_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every text with its BOS token by itself (Gemma, Llama 3): such a
    model was trained with it and degrades without it (Gemma 3 270M's IOI logit difference falls from
    5.2 to 1.3 on one prompt). SmolLM2 and Qwen2 add none."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def tokenize_examples(examples: list[Example], tokenizer, max_len: int, loss: str = "answer") -> Tokenized:
    """Token ids of [BOS +] prompt + completion; sequences longer than ``max_len`` keep their end
    (the completion; a BOS the model wants stays first) and are counted as truncated. BOS leads when
    the tokenizer adds it by itself (``wants_bos``) or the prompt is empty (the first completion
    token needs a context). ``loss`` (``LOSS_SCOPES``) sets which predicted tokens are scored: the
    completion's; all (``scored_from`` 1); or all but the chat template's (``unscored`` lists those)."""
    if loss not in LOSS_SCOPES:
        raise UsageError(f"loss must be one of {LOSS_SCOPES}, got {loss!r}")
    always = wants_bos(tokenizer)
    ids, starts, skip, truncated = [], [], [], 0
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if ((always or not p) and tokenizer.bos_token_id is not None) else []
        seq, start = bos + p + c, len(bos) + len(p)
        tmpl = [len(bos) + i for i in _template_tokens(ex, tokenizer, len(p))] if loss == "text" else []
        if len(seq) > max_len:
            truncated += 1
            keep = len(bos) if always else 0      # a BOS the model always sees stays in front
            cut = len(seq) - max_len
            seq = seq[:keep] + seq[keep + cut:]
            start = max(start - cut, keep, 1)
            tmpl = [i - cut for i in tmpl if i - cut >= max(keep, 1)]
        ids.append(seq)
        starts.append(1 if loss != "answer" else max(start, 1))
        skip.append([i for i in tmpl if i >= 1])
    return Tokenized(ids, starts, truncated, skip if loss == "text" else None)


def collate(ids: list[list[int]], scored_from: list[int], pad_id: int,
            unscored: list[list[int]] | None = None) -> Batch:
    """Right-pad a batch; the loss mask marks positions whose next token is scored: tokens from
    ``scored_from`` on, less those in ``unscored`` (per sequence, token indices)."""
    T = max(len(s) for s in ids)
    B = len(ids)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.bool)
    loss = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, st) in enumerate(zip(ids, scored_from)):
        input_ids[b, :len(s)] = torch.tensor(s)
        attn[b, :len(s)] = True
        loss[b, st - 1:len(s) - 1] = True
        if unscored is not None and unscored[b]:
            loss[b, torch.tensor(unscored[b]) - 1] = False
    return Batch(input_ids, attn, loss)


class Task:
    """One task as one object: its rows are split once (``DataConfig.split_seed``) into
    calibration and evaluation items that never overlap, and every consumer (gradients, Hessians,
    Q(W), evaluation, perplexity, the explorer's export) takes its items from here, so
    disjointness holds by construction.

    ``calib_items(n, seed)`` draws ``n`` items from the calibration split by a seeded permutation
    (``seed`` varies the calibration sample, ``split_seed`` fixes which rows may be drawn);
    ``eval_items(n)`` is the first ``n`` of the evaluation split."""

    def __init__(self, name: str, data=None, tokenizer=None):
        self.spec = TaskSpec.parse(name)
        self.name = name
        self.data = data if data is not None else DataConfig()
        self.tokenizer = tokenizer
        self._splits: dict[str, Examples] = {}

    @property
    def kind(self) -> str:
        """``mmlu``, ``gsm8k``, ``text`` or ``jsonl``: decides the metric (``evals.evaluate``)."""
        return self.spec.kind

    def split(self, which: str) -> "Examples":
        if which not in self._splits:
            d = self.data
            self._splits[which] = load_examples(self.name, which, None, seed=d.split_seed, shots=d.shots,
                                                data_dir=d.data_dir, tokenizer=self.tokenizer,
                                                calib_fraction=d.calib_fraction, template=d.template,
                                                eval_split=d.eval_split)
        return self._splits[which]

    def calib_items(self, n: int | None = None, seed: int = 0) -> list[Example]:
        pool = self.split("calib")
        order = _permute(len(pool), seed)
        return [pool[i] for i in (order if n is None else order[:n])]

    def calib_budget(self, tokens: int, seed: int = 0, max_len: int | None = None) -> list[Example]:
        """Calibration items in the seeded order of ``calib_items`` while their token count (each
        capped at ``max_len``) stays within ``tokens``: the official TaCQ budget of ``samples ×
        seq_len`` tokens, one item per sequence. Worked example: items of 300, 500, 400 tokens and a
        budget of 900 give the first two."""
        if self.tokenizer is None:
            raise UsageError("a token budget needs the task's tokenizer: Task(name, data, tokenizer)")
        out, used = [], 0
        for ex in self.calib_items(None, seed):
            n = len(self.tokenizer(ex.prompt + ex.completion, add_special_tokens=False)["input_ids"])
            n = min(n, max_len) if max_len else n
            if used + n > tokens:
                break
            out.append(ex)
            used += n
        if not out:
            raise DataError(f"the calibration token budget of {tokens} holds no item of '{self.name}'; raise --calib-tokens")
        return out

    def calib_for(self, calib) -> list[Example]:
        """The calibration items a ``CalibConfig`` asks for: ``calib.samples`` items, or with a
        token budget (``calib.tokens > 0``) as many as fit in it."""
        if calib.tokens:
            return self.calib_budget(calib.tokens, calib.seed, calib.seq_len)
        items = self.calib_items(calib.samples, calib.seed)
        if len(items) < calib.samples:
            print(f"[circuitq] {self.name}: --calib-samples {calib.samples}, but the calibration split holds only "
                  f"{len(items)} items; using {len(items)}", flush=True)
        return items

    def eval_items(self, n: int | None = None) -> list[Example]:
        ex = self.split("eval")
        return list(ex if n is None else ex[:n])

    @property
    def sources(self) -> dict:
        """Where the calibration and evaluation items come from, in words."""
        d = self.data
        return split_description(self.name, d.eval_split, d.data_dir, d.split_seed, d.calib_fraction)

    @property
    def skipped(self) -> dict[str, int]:
        """Rows left out per split because their answer could not be parsed."""
        return {k: getattr(v, "skipped", 0) for k, v in self._splits.items()}


def scored_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions scored in any sample of the batch: ``[K]`` (logits are computed only there)."""
    return loss_mask[:, :-1].any(0).nonzero().flatten()
