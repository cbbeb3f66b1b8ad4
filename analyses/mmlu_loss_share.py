"""What the all-token loss measures on MMLU: how much of it is SmolLM2's chat template.

    HF_HUB_OFFLINE=1 .venv/bin/python analyses/mmlu_loss_share.py --samples 32 --out analyses/results/mmlu_loss_share.json

Tests the hypothesis left open in FINDINGS_0.5 §3: that under ``--loss all`` the MMLU gradient
signal is dominated by text that is not MMLU (the chat template puts the same system prompt in
front of every question). For ``--samples`` MMLU calibration items (0-shot, chat template, as
``circuitq run`` builds them), plain autograd at batch 1 on the HF model; every predicted token is
put in one part of the prompt:

* ``template``: the system prompt and the chat wrappers (``<|im_start|>…``, ``<|im_end|>``);
* ``preamble``: "The following are multiple choice questions (with answers) about SUBJECT.";
* ``question``: the question, the four choices and "Answer:";
* ``answer``: the answer letter (the only token of ``--loss answer``).

Reports each part's share of the tokens, of the summed loss and of Σ_s ‖G_s‖₁ (each sample's
gradient of that part's loss over every targeted linear weight), and how far the `grad` circuit
(top 0.35% of Σ_s |G_s|) moves when the template's tokens are left out of the all-token loss:
IoU of the masks from all tokens, from all tokens but the template, and from the answer alone.
Weights dequantized from a 4-bit (Q4_1) GGUF file.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PARTS = ("template", "preamble", "question", "answer")


def parts_of(prompt: str, completion: str, tokenizer) -> tuple[list[int], list[str]]:
    """Token ids of prompt + completion (tokenized apart, as ``tokenize_examples`` does) and the
    part each token belongs to."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    user = prompt.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    end = prompt.index("<|im_end|>", user)
    body = prompt.index("\n\n", user) + 2          # after the subject preamble
    labels = []
    for a, b in enc["offset_mapping"]:
        mid = (a + b) / 2
        labels.append("template" if mid < user or mid >= end else "preamble" if mid < body else "question")
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return enc["input_ids"] + c, labels + ["answer"] * len(c)


def iou(a: dict, b: dict) -> float:
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / union


def topk_masks(scores: dict, fraction: float) -> dict:
    flat = torch.cat([v.flatten() for v in scores.values()])
    k = int(fraction * flat.numel())
    thr = torch.topk(flat, k).values.min()
    return {n: v >= thr for n, v in scores.items()}


def main() -> int:
    from circuitq.data.tasks import load_examples
    from circuitq.model.arch import target_shapes
    from circuitq.model.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.0035)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "mmlu_loss_share.json"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m-instruct")
    model, tok = lm.model, lm.tokenizer
    ex = load_examples("mmlu", "calib", a.samples, seed=a.seed, shots=0, data_dir=None, tokenizer=tok)
    shapes = target_shapes(model)
    params = dict(model.named_parameters())
    tokens = {p: 0 for p in PARTS}
    loss = {p: 0.0 for p in PARTS}
    l1 = {p: 0.0 for p in PARTS}
    scopes = {"all": set(PARTS), "all but template": {"preamble", "question", "answer"}, "answer": {"answer"}}
    sums = {s: {n: torch.zeros(shape) for n, shape in shapes.items()} for s in scopes}
    for i, e in enumerate(ex):
        ids, labels = parts_of(e.prompt, e.completion, tok)
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")   # [T-1]: token t+1
        lab = labels[1:]
        grads = {}
        for p in PARTS:
            sel = torch.tensor([l == p for l in lab])
            tokens[p] += int(sel.sum())
            loss[p] += float(nll[sel].detach().sum())
            g = torch.autograd.grad(nll[sel].sum(), [params[n] for n in shapes], retain_graph=True, allow_unused=True)
            grads[p] = {n: (gi if gi is not None else torch.zeros(shapes[n])) for n, gi in zip(shapes, g)}
            l1[p] += sum(float(gi.abs().sum()) for gi in grads[p].values())
        for s, ps in scopes.items():
            for n in shapes:
                sums[s][n] += sum(grads[p][n] for p in ps).abs()
        print(f"[mmlu_loss_share] {i + 1}/{len(ex)}", flush=True)
    masks = {s: topk_masks(v, a.fraction) for s, v in sums.items()}
    T, L, G = sum(tokens.values()), sum(loss.values()), sum(l1.values())
    res = {"samples": len(ex), "seed": a.seed, "fraction": a.fraction,
           "model_note": "SmolLM2-135M-Instruct, weights dequantized from a 4-bit (Q4_1) GGUF file",
           "parts": {p: {"tokens": tokens[p], "token_share": tokens[p] / T, "loss_share": loss[p] / L,
                         "mean_nll": loss[p] / max(tokens[p], 1), "grad_l1_share": l1[p] / G} for p in PARTS},
           "mask_iou": {"all vs all but template": iou(masks["all"], masks["all but template"]),
                        "all vs answer": iou(masks["all"], masks["answer"]),
                        "all but template vs answer": iou(masks["all but template"], masks["answer"])},
           "seconds": time.perf_counter() - t0}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out)
    print("| part | tokens | token share | loss share | mean NLL | Σ‖G‖₁ share |\n| --- | --- | --- | --- | --- | --- |")
    for p, r in res["parts"].items():
        print(f"| {p} | {r['tokens']} | {r['token_share']:.3f} | {r['loss_share']:.3f} | {r['mean_nll']:.3f} | "
              f"{r['grad_l1_share']:.3f} |")
    for k, v in res["mask_iou"].items():
        print(f"mask IoU, {k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
