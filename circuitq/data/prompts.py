"""Prompt formats of the built-in tasks, as data.

* MMLU (Hendrycks et al., 2021): ``The following are multiple choice questions (with answers)
  about SUBJECT.`` then K solved questions from the subject's dev split, then the question; the
  completion is `` X`` (the letter). ``raw`` sends that text as is (as the MMLU paper and the
  official TaCQ code do); ``chat`` wraps it in the model's chat template.
* GSM8k (Wei et al., 2022, chain-of-thought prompting): K of the eight exemplars below as
  ``Q: ...\\nA: CHAIN The answer is N.``, then ``Q: QUESTION\\nA:``; the completion is the
  dataset's worked solution followed by `` The answer is N.`` (the official TaCQ format). With
  0 shots the prompt is ``Question: ...\\nAnswer:`` and the completion the worked solution.

``STANDARD_SHOTS`` is each task's usual count (``--shots -1``): 5 for MMLU, 8 for GSM8k.
"""
from __future__ import annotations

STANDARD_SHOTS = {"mmlu": 5, "gsm8k": 8}
ANSWER_TRIGGER = "The answer is"

# (question, chain of thought, answer): the eight GSM8k exemplars of Wei et al. (2022), Table 20
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. "
     "So there must have been 21 - 15 = 6.", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
     "After eating 35, they had 74 - 35 = 39.", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.",
     "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9.",
     "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
     "So 5 * 4 = 20 computers were added. 9 + 20 is 29.", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
     "After losing 2 more, he had 35 - 2 = 33 golf balls.", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
     "So she has 23 - 15 dollars left. 23 - 15 is 8.", "8"),
)


def resolve_shots(kind: str, shots: int) -> int:
    """The number of shots for a task kind: ``-1`` means the task's standard count (0 for tasks
    without one)."""
    return STANDARD_SHOTS.get(kind, 0) if shots == -1 else shots


LETTERS = "ABCD"   # MMLU's answer letters, in choice order: the one home of this fact


def mmlu_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_question(q: dict, with_answer: bool) -> str:
    """``QUESTION\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` (+ `` X\\n\\n`` for a solved shot)."""
    lines = [q["question"].strip()] + [f"{l}. {c}" for l, c in zip(LETTERS, q["choices"])]
    return "\n".join(lines) + "\nAnswer:" + (f" {q['answer']}\n\n" if with_answer else "")


def gsm8k_prompt(question: str, shots: int) -> str:
    """The GSM8k prompt with the first ``shots`` chain-of-thought exemplars (at most 8)."""
    if shots == 0:
        return f"Question: {question}\nAnswer:"
    demo = "".join(f"Q: {q}\nA: {c} {ANSWER_TRIGGER} {a}.\n\n" for q, c, a in GSM8K_COT_EXEMPLARS[:shots])
    return demo + f"Q: {question}\nA:"


def gsm8k_completion(solution: str, final: str, shots: int) -> str:
    """The completion scored for GSM8k: the worked solution (with few shots, followed by
    `` The answer is N.`` as in the exemplars)."""
    return " " + solution if shots == 0 else f" {solution} {ANSWER_TRIGGER} {final}.\n\n"
