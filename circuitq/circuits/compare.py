"""Driver for ``circuitq compare``: two score directories -> circuits at a budget -> overlap
metrics, circuit maps and plots -> one standalone HTML report (+ JSON metrics and PNG)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from circuitq import __version__
from circuitq.artifacts import atomic_file, check_writable
from circuitq.circuits.maps import aggregate, compare_circuits, compare_masks, signed, top_units
from circuitq.circuits.plots import (
    attribution_heatmaps,
    circuits_png,
    head_heatmaps,
    heatmap_png,
    module_layer_bars,
    overlap_by_layer,
    write_report,
)
from circuitq.config import DEFAULT_FRACTION
from circuitq.errors import CircuitqError
from circuitq.model.arch import MODULE_TYPES, Geometry
from circuitq.saliency.files import load_scores
from circuitq.saliency.masks import select_topk, select_topk_stream


class CompareError(CircuitqError, ValueError):
    pass


def _label(meta: dict, fallback: str) -> str:
    return f"{meta.get('task', fallback)} ({meta.get('method', '?')})"


def compare_dirs(dir_a: str, dir_b: str, fraction: float = DEFAULT_FRACTION, top_n: int = 20) -> dict:
    """Metrics and maps of two scored circuits (raises ``CompareError`` across models)."""
    fa, fb = load_scores(dir_a, lazy=True), load_scores(dir_b, lazy=True)   # one matrix in memory at a time
    return compare_scores(fa, fb, fraction, top_n, (dir_a, dir_b))


def same_model(meta_a: dict, meta_b: dict) -> bool:
    return meta_a.get("model_source") == meta_b.get("model_source") and meta_a.get("geometry") == meta_b.get("geometry")


def compare_scores(fa, fb, fraction: float = DEFAULT_FRACTION, top_n: int = 20, names=("a", "b"), masks=None) -> dict:
    """``compare_dirs`` on loaded score files (``{"scores", "meta"}``); ``masks`` may give the two
    circuits already selected."""
    if not same_model(fa["meta"], fb["meta"]):
        raise CompareError(f"the circuits come from different models ({fa['meta'].get('model')} vs "
                           f"{fb['meta'].get('model')}); a comparison would be meaningless")
    geo = Geometry(**fa["meta"]["geometry"])
    ma, mb = masks if masks is not None else (_select(fa["scores"], fraction), _select(fb["scores"], fraction))
    sa, sb = aggregate(fa["scores"], geo), aggregate(fb["scores"], geo)
    ca, cb = aggregate(_AsFloat(ma), geo), aggregate(_AsFloat(mb), geo)
    return {"labels": (_label(fa["meta"], names[0]), _label(fb["meta"], names[1])), "fraction": fraction,
            "masks": compare_masks(ma, mb, geo), "circuits": compare_circuits(sa, sb, top_n),
            "score_maps": (sa, sb), "mask_maps": (ca, cb), "meta": (fa["meta"], fb["meta"]), "geometry": geo}


def _select(scores, fraction: float) -> dict:
    """The circuit of ``scores`` (a dict, or a ``LazyTensors`` streamed through a running top-k)."""
    if isinstance(scores, dict):
        return select_topk(scores, fraction)
    return select_topk_stream(((n, scores[n]) for n in scores), {n: scores.shape(n) for n in scores}, fraction)


class _AsFloat(Mapping):
    """``{name: mask.float()}``, converted one matrix at a time as it is read."""

    def __init__(self, masks):
        self.masks = masks

    def __getitem__(self, k):
        return self.masks[k].float()

    def __iter__(self):
        return iter(self.masks)

    def __len__(self):
        return len(self.masks)


def write_pngs(res: dict, out: Path, overwrite: bool = True) -> None:
    """``OUT.heads.png`` (head heatmaps) and ``OUT.circuits.png`` (composition and overlap)."""
    la, lb = res["labels"]
    sa, sb = res["score_maps"]
    ca, cb = res["mask_maps"]
    for suffix, draw in ((".heads.png", lambda p: heatmap_png(sa, sb, la, lb, p)),
                         (".circuits.png", lambda p: circuits_png(ca, cb, res["masks"], la, lb, p))):
        with atomic_file(out.with_suffix(suffix), overwrite=overwrite) as tmp:
            draw(tmp.with_suffix(".png"))
            tmp.with_suffix(".png").replace(tmp)


def write_compare_report(res: dict, out: str | Path, overwrite: bool = False) -> Path:
    out = check_writable(Path(out), overwrite)
    for sibling in (".json", ".heads.png", ".circuits.png"):   # every file it writes, refused before any is
        check_writable(out.with_suffix(sibling), overwrite)
    la, lb = res["labels"]
    sa, sb = res["score_maps"]
    ca, cb = res["mask_maps"]
    m, c = res["masks"], res["circuits"]
    g = m["global"]
    summary = [{"metric": k, "value": v} for k, v in (
        ("budget (fraction)", res["fraction"]), (f"|{la}|", g["a"]), (f"|{lb}|", g["b"]),
        ("shared", g["intersection"]), (f"only {la}", g["a"] - g["intersection"]),
        (f"only {lb}", g["b"] - g["intersection"]), ("IoU", g["iou"]), ("intersection / min", g["iom"]),
        ("head Spearman", c["head_spearman"]), ("neuron Spearman", c["neuron_spearman"]),
        (f"shared top-{c['top_n']} heads", c["n_shared_heads"]), (f"shared top-{c['top_n']} neurons", c["n_shared_neurons"]))]
    by_type = [{"module": t, **{k: v for k, v in m["per_module_type"][t].items()}} for t in MODULE_TYPES
               if t in m["per_module_type"]]

    heads = [{"rank": r + 1, f"{la} head": f"L{l}.H{u}", f"{la} share": v / max(sa.total, 1e-30),
              f"{lb} head": f"L{l2}.H{u2}", f"{lb} share": v2 / max(sb.total, 1e-30)}
             for r, ((l, u, v), (l2, u2, v2)) in enumerate(zip(top_units(sa.head, 15), top_units(sb.head, 15)))]
    neurons = [{"rank": r + 1, f"{la} neuron": f"L{l}.N{u}", f"{lb} neuron": f"L{l2}.N{u2}"}
               for r, ((l, u, _), (l2, u2, _)) in enumerate(zip(top_units(sa.neuron, 15), top_units(sb.neuron, 15)))]
    method = res["meta"][0].get("method", "score")
    if signed(sa) or signed(sb):   # an attribution (atp, ig): its sign says whether quantizing a head hurts
        head_fig = attribution_heatmaps([(la, sa), (lb, sb)], f"{method} attribution per attention head (signed: "
                                        "predicted change of the task loss when the head is quantized)")
        heads = [{"rank": r + 1, f"{la} head": f"L{l}.H{u}", f"{la} attribution": v,
                  f"{lb} head": f"L{l2}.H{u2}", f"{lb} attribution": v2}
                 for r, ((l, u, v), (l2, u2, v2)) in enumerate(zip(top_units(sa.head, 15), top_units(sb.head, 15)))]
    else:
        head_fig = head_heatmaps(sa, sb, la, lb, what=f"{method} score")
    sections = [("Summary", summary), ("Heads", head_fig),
                (f"Circuit composition: {la}", module_layer_bars(ca, la)),
                (f"Circuit composition: {lb}", module_layer_bars(cb, lb)),
                ("Overlap by layer", overlap_by_layer(m, f"{la} vs {lb}")),
                ("Overlap by module type", by_type), ("Top heads", heads), ("Top neurons", neurons)]
    settings = {"circuitq_version": __version__, "a": res["meta"][0], "b": res["meta"][1], "fraction": res["fraction"]}
    with atomic_file(out, overwrite=overwrite) as tmp:
        write_report(tmp, f"Circuits: {la} vs {lb}", sections, settings)
    write_pngs(res, out, overwrite)
    metrics = {k: res[k] for k in ("labels", "fraction", "masks", "circuits")}
    with atomic_file(out.with_suffix(".json"), overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return out
