"""Are the same kinds of heads involved in IOI in two models? (issue 25: Gemma 3 270M vs SmolLM2.)

    .venv/bin/python analyses/ioi_head_kinds.py \
        --run smollm2-135m-instruct=runs/faithful-maps-072/faith-ioi-3bit-s0.json \
        --run gemma-3-270m=runs/gemma3/faith-ioi-3bit-s0.json \
        --items 96 --top 10 --out analyses/results/ioi_head_kinds.json

For each model: which heads matter is read from a ``circuitq faithfulness --units heads --all-units``
report (each query head alone at Q(W), the task loss measured on held-out items: ``measured_loss``);
what a head *does* is read from its attention on held-out IOI items (names from the evaluation
pool, ``circuit_tasks.ioi_items("eval")``), at the four positions the IOI literature uses (Wang et
al. 2022): from the last token to the indirect object (name movers), to the subject (S
attention), from the second subject token to the first (duplicate-token heads) and to the token
after the first (induction heads). A head is given the kind whose mean attention is highest if
that mean is at least ``--threshold`` (else "other"). Pure functions (``positions``,
``head_patterns``, ``kinds``) and a thin driver; the models' weights are dequantized from 4-bit
GGUF files.

Writes ``OUT`` (per model: every head's patterns, kind and measured change; the top heads; kind
counts among the top heads and among all heads) and ``OUT`` with ``.md`` (the tables).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import REPO, machine

sys.path.insert(0, str(REPO))

PATTERNS = ("end->io", "end->s", "s2->s1", "s2->s1+1")
KIND_OF = {"end->io": "name mover", "end->s": "S attention", "s2->s1": "duplicate token", "s2->s1+1": "induction"}


def positions(ids: list[int], io_id: int, s_id: int) -> dict[str, int] | None:
    """Token positions of one IOI prompt: ``io`` (the indirect object), ``s1``/``s2`` (the
    subject's two occurrences), ``end`` (the last token). None when the names are not found as
    single tokens (a tokenizer that merges them with their neighbours)."""
    io = [i for i, t in enumerate(ids) if t == io_id]
    s = [i for i, t in enumerate(ids) if t == s_id]
    if len(io) != 1 or len(s) != 2:
        return None
    return {"io": io[0], "s1": s[0], "s2": s[1], "end": len(ids) - 1}


def head_patterns(attn: list[torch.Tensor], pos: dict[str, int]) -> torch.Tensor:
    """``[L, H, 4]``: each head's attention weight at the four IOI positions (``PATTERNS``
    order) of one prompt. ``attn``: per layer ``[H, T, T]`` (rows: query positions)."""
    out = []
    for a in attn:
        end, s2 = a[:, pos["end"]], a[:, pos["s2"]]
        out.append(torch.stack([end[:, pos["io"]], end[:, pos["s1"]] + end[:, pos["s2"]],
                                s2[:, pos["s1"]], s2[:, pos["s1"] + 1]], dim=-1))
    return torch.stack(out).float()


def kinds(patterns: torch.Tensor, threshold: float) -> list[list[str]]:
    """Per head, the kind of its largest mean pattern if at least ``threshold``, else "other"."""
    best, idx = patterns.max(-1)
    return [[KIND_OF[PATTERNS[int(idx[i, h])]] if float(best[i, h]) >= threshold else "other"
             for h in range(patterns.shape[1])] for i in range(patterns.shape[0])]


def measure(alias: str, faith: Path, n_items: int, top: int, threshold: float) -> dict:
    from circuitq.data.circuit_tasks import ioi_items
    from circuitq.model.loading import load_model

    lm = load_model(alias)
    model, tok = lm.model.eval(), lm.tokenizer
    model.set_attn_implementation("eager")           # attention weights are returned only by eager attention
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    total, used = torch.zeros(L, H, 4, dtype=torch.float64), 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for prompt, _, meta in ioi_items("eval", 0, n_items):
            ids = tok(prompt)["input_ids"]
            one = [tok(meta[k], add_special_tokens=False)["input_ids"] for k in ("target", "distractor")]
            if any(len(x) != 1 for x in one):
                continue
            pos = positions(ids, one[0][0], one[1][0])
            if pos is None:
                continue
            out = model(input_ids=torch.tensor([ids]), output_attentions=True)
            total += head_patterns([a[0] for a in out.attentions], pos).double()
            used += 1
    if used == 0:
        raise SystemExit(f"{alias}: no IOI item had single-token names; nothing measured")
    pat = (total / used).float()
    kind = kinds(pat, threshold)
    rep = json.loads(faith.read_text())
    measured = {u["label"]: u["measured_loss"] for u in rep["units"]}
    heads = []
    for i in range(L):
        for h in range(H):
            label = f"L{i}.H{h}"
            heads.append({"head": label, "layer": i, "depth": i / max(L - 1, 1), "kind": kind[i][h],
                          "measured_loss": measured.get(label),
                          **{p: float(pat[i, h, j]) for j, p in enumerate(PATTERNS)}})
    ranked = sorted((x for x in heads if x["measured_loss"] is not None), key=lambda x: -x["measured_loss"])
    top_heads = ranked[:top]

    def counts(xs):
        c = {}
        for x in xs:
            c[x["kind"]] = c.get(x["kind"], 0) + 1
        return c

    return {"model": alias, "model_note": lm.note, "layers": L, "heads_per_layer": H, "items": used,
            "faithfulness_report": str(faith), "bits": rep.get("bits") or rep.get("measurement", {}).get("bits"),
            "ablation": rep.get("ablation"), "measured_items": rep.get("items"),
            "base_metric": rep["base"]["metric"], "seconds": round(time.perf_counter() - t0, 1),
            "top": top_heads, "kinds_top": counts(top_heads), "kinds_all": counts(heads),
            "mean_depth_top": sum(x["depth"] for x in top_heads) / max(len(top_heads), 1), "heads": heads}


def table(res: dict) -> str:
    lines = [f"### {res['model']} ({res['layers']} layers × {res['heads_per_layer']} heads; patterns over "
             f"{res['items']} held-out items; importance: each head alone, {res['ablation']} ablation at {res['bits']} bits, "
             f"{res['measured_items']} items)", "",
             "| head | depth | Δ loss (nats) | end→IO | end→S | S2→S1 | S2→S1+1 | kind |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for x in res["top"]:
        lines.append(f"| {x['head']} | {x['depth']:.2f} | {x['measured_loss']:+.4f} | {x['end->io']:.2f} | "
                     f"{x['end->s']:.2f} | {x['s2->s1']:.2f} | {x['s2->s1+1']:.2f} | {x['kind']} |")
    lines += ["", f"Kinds among the top {len(res['top'])}: " + ", ".join(f"{k} {v}" for k, v in sorted(res["kinds_top"].items()))
              + f"; among all {res['layers'] * res['heads_per_layer']}: "
              + ", ".join(f"{k} {v}" for k, v in sorted(res["kinds_all"].items()))
              + f". Mean depth of the top heads {res['mean_depth_top']:.2f}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="MODEL=FAITH.json")
    ap.add_argument("--items", type=int, default=96)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--out", type=Path, default=REPO / "analyses" / "results" / "ioi_head_kinds.json")
    a = ap.parse_args()
    results = []
    for spec in a.run:
        alias, _, path = spec.partition("=")
        if not Path(path).is_file():
            raise SystemExit(f"--run {spec}: no faithfulness report at {path}; run circuitq faithfulness first")
        results.append(measure(alias, Path(path), a.items, a.top, a.threshold))
        print(table(results[-1]), flush=True)
    doc = {"machine": machine(), "threshold": a.threshold, "patterns": PATTERNS, "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(a.out)
    md = a.out.with_suffix(".md")
    md.with_suffix(".mdtmp").write_text("\n".join(table(r) for r in results) + "\n")
    md.with_suffix(".mdtmp").replace(md)
    print(f"wrote {a.out} and {md}")


if __name__ == "__main__":
    main()
