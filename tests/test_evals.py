import json
import math

import pytest
import torch

from circuitq.cli import main
from circuitq.evals import count_flips, kl_divergence, mc_correct, top1_agreement


def test_kl_divergence_holds_two_blocks_beyond_its_inputs():
    """In a fresh process: KL over ``[256, 65536]`` logits raises the resident high-water mark by
    about two ``[256, 65536]`` float32 blocks (``pipeline.budget``'s count), not the five the plain
    ``(p * (lr − lq)).sum()`` holds; and it equals that plain form."""
    import subprocess
    import sys

    code = """
import torch, torch.nn.functional as F
from circuitq.evals import kl_divergence
from circuitq.pipeline.budget import PeakMeter, _proc_kb
n, v = 256, 65536
g = torch.Generator().manual_seed(0)
r, q = torch.randn(n, v, generator=g), torch.randn(n, v, generator=g)
plain = lambda: (F.log_softmax(r, -1).exp() * (F.log_softmax(r, -1) - F.log_softmax(q, -1))).sum(-1)
meter = PeakMeter()
base = _proc_kb("/proc/self/status", "VmRSS")
with meter.stage("kl"):       # the high-water mark reset to what the process holds now
    k = kl_divergence(r, q)
print(meter.ok, (meter.peaks.get("kl", 0) - base) / (4 * n * v), float((k - plain()).abs().max()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("the kernel offers no resettable VmHWM here (Linux only)")
    blocks, diff = float(out[1]), float(out[2])
    assert 1.5 < blocks < 2.6, blocks
    assert diff < 1e-4

def test_kl_of_identical_is_zero_and_known_value():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g)
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(5), atol=1e-6)
    assert top1_agreement(logits, logits).all()
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    expect = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q).item() == pytest.approx(expect, rel=1e-5)
    assert kl_divergence(p, q).item() != pytest.approx(kl_divergence(q, p).item())  # direction matters


def test_accuracy_and_flips_from_known_loglikelihoods():
    ll = torch.tensor([[0.0, -1.0, -2.0, -3.0], [-3.0, -0.1, -2.0, -1.0], [-1.0, -1.5, -0.2, -3.0]])
    correct = mc_correct(ll, torch.tensor([0, 3, 2]))
    assert correct.tolist() == [True, False, True]
    f = count_flips(torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False]))
    assert f == {"lost": 1, "gained": 1, "total": 2}


def _mmlu_dir(tmp_path):
    d = tmp_path / "data" / "mmlu"
    for split in ("dev", "val"):
        (d / split).mkdir(parents=True)
        rows = [f'"the fox {i} jumps over",the,quick,brown,lazy,{"ABCD"[i % 4]}' for i in range(12)]
        (d / split / f"high_school_physics_{split}.csv").write_text("\n".join(rows) + "\n")
        (d / split / f"philosophy_{split}.csv").write_text("\n".join(rows[:6]) + "\n")
    return tmp_path / "data"


def test_eval_cli_mmlu_against_reference(tmp_path, tiny_dir):
    d, _ = tiny_dir
    data = _mmlu_dir(tmp_path)
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(d), "--reference", str(d), "--task", "mmlu", "--data-dir", str(data),
                 "--limit", "100", "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["items"] == 9  # half of 18 rows, --limit larger than the split uses the split
    assert m["kl"] == pytest.approx(0.0, abs=1e-6) and m["top1_agreement"] == 1.0
    assert m["flips"]["total"] == 0 and m["accuracy"] == m["reference_accuracy"]
    assert set(m["accuracy_by_category"]) <= {"stem", "humanities"}
    assert out.with_suffix(".csv").read_text().count("\n") == 10


def test_eval_quantized_differs_from_reference(tmp_path, tiny_dir):
    d, text = tiny_dir
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(d), "--bits", "2", "--method", "rtn", "--calib", f"text:{text}",
                 "--samples", "2", "--seq-len", "16", "--ppl-windows", "0", "--out", str(q)]) == 0
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(q / "hf"), "--reference", str(d), "--task", f"text:{text}",
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["kl"] > 1e-4 and 0 <= m["top1_agreement"] <= 1 and m["perplexity"] > 1


def test_eval_refuses_different_vocabularies(tmp_path, tiny_dir, capsys):
    from conftest import tiny_model

    d, text = tiny_dir
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tiny_model(vocab=400).save_pretrained(other)
    AutoTokenizer.from_pretrained(d).save_pretrained(other)
    rc = main(["eval", "--model", str(d), "--reference", str(other), "--task", f"text:{text}",
               "--out", str(tmp_path / "e.json")])
    assert rc == 2 and "different tokenizers or vocabularies" in capsys.readouterr().err


def test_parse_final_number():
    from circuitq.evals import parse_final_number

    assert parse_final_number("3 + 4 = 7\n#### 7") == "7"
    assert parse_final_number("so she has 1,200 apples.") == "1200"
    assert parse_final_number("#### -3.0") == "-3"
    assert parse_final_number("no idea") is None


def test_eval_cli_gsm8k_generation_counts_unparseable(tmp_path, tiny_dir):
    from conftest import task_data

    d, _ = tiny_dir
    data = task_data(tmp_path)
    out = tmp_path / "g.json"
    assert main(["eval", "--model", str(d), "--task", "gsm8k", "--data-dir", str(data), "--limit", "3",
                 "--generate", "--max-new-tokens", "8", "--out", str(out)]) == 0
    g = json.loads(out.read_text())["metrics"]["generation"]
    assert g["items"] == 3 and 0 <= g["unparseable"] <= 3 and 0 <= g["exact_match"] <= 1
    assert main(["eval", "--model", str(d), "--task", "mmlu", "--data-dir", str(data), "--generate",
                 "--out", str(tmp_path / "m.json")]) == 2


def test_generation_exact_match_and_unparseable_counts_are_exact(tiny_dir):
    """A model whose generations are fixed: one right, one without a number, one wrong."""
    from transformers import AutoTokenizer

    from circuitq.data.tasks import Example
    from circuitq.evals import generate_exact_match

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    outs = ["so #### 7", "the fox", "#### 5"]

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.i = 0

        def generate(self, input_ids, **kw):
            rows = []
            for _ in range(input_ids.shape[0]):
                rows.append(tok(outs[self.i], add_special_tokens=False)["input_ids"])
                self.i += 1
            width = max(map(len, rows))
            gen = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
            return torch.cat([input_ids, gen], 1)

    ex = [Example("the fox", " #### 7", {"final": "7"}), Example("the dog", " #### 8", {"final": "8"}),
          Example("the cat", " #### 9", {"final": "9"})]
    g = generate_exact_match(Fixed(), tok, ex, 8, batch_size=2, progress=False)
    assert g["items"] == 3 and g["unparseable"] == 1 and g["exact_match"] == pytest.approx(1 / 3)
    assert [r["correct"] for r in g["records"]] == [True, False, False]
