import torch

from circuitq.capture import GradStats, accumulate, collect_stats, per_sample_grads, sample_losses
from circuitq.quantize import target_shapes
from circuitq.tasks import Example, collate, tokenize_examples


def _autograd_per_sample(model, tok, examples, seq_len):
    """Reference: one sample at a time, plain autograd on the HF model, |grad| summed."""
    shapes = target_shapes(model)
    ref_abs = {n: torch.zeros(s) for n, s in shapes.items()}
    ref_sum = {n: torch.zeros(s) for n, s in shapes.items()}
    params = dict(model.named_parameters())
    t = tokenize_examples(examples, tok, seq_len)
    for ids, st in zip(t.ids, t.scored_from):
        b = collate([ids], [st], tok.pad_token_id)
        model.zero_grad()
        logits = model(input_ids=b.input_ids).logits
        sample_losses(logits, b.input_ids, b.loss_mask).sum().backward()
        for n in shapes:
            ref_abs[n] += params[n].grad.abs()
            ref_sum[n] += params[n].grad
    model.zero_grad()
    return ref_abs, ref_sum


def _examples():
    words = "the quick brown fox jumps over the lazy dog".split()
    return [Example(" ".join(words[: 2 + i % 5]), " " + " ".join(words[i % 3: i % 3 + 2 + i % 4])) for i in range(6)]


def test_hook_grads_equal_autograd_batch1_and_padded_batches(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ex = _examples()
    ref_abs, ref_sum = _autograd_per_sample(model, tok, ex, 64)
    for bs in (1, 4):
        res = collect_stats(model, tok, ex, str(d), batch_size=bs, seq_len=64, progress=False)
        st = res["stats"]
        assert st.n_samples == len(ex) and st.n_skipped == 0
        for n in ref_abs:
            err = (st.tensors["sum_abs"][n] - ref_abs[n]).norm() / ref_abs[n].norm()
            assert err <= 1e-5, (bs, n, float(err))
            err = (st.tensors["sum"][n] - ref_sum[n]).norm() / ref_sum[n].norm()
            assert err <= 1e-5, (bs, n, float(err))
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_accumulate_in_pieces_equals_at_once_and_skips_nonfinite():
    g = torch.Generator().manual_seed(0)
    x, gr = torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, 2, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    shapes = {"w": (2, 3)}
    whole = GradStats.zeros(shapes, "cpu")
    accumulate(whole, "w", x, gr, mask, torch.ones(4, dtype=torch.bool))
    parts = GradStats.zeros(shapes, "cpu")
    for sl in (slice(0, 1), slice(1, 4)):
        accumulate(parts, "w", x[sl], gr[sl], mask[sl], torch.ones(sl.stop - sl.start, dtype=torch.bool))
    for s in whole.tensors:
        assert torch.allclose(whole.tensors[s]["w"], parts.tensors[s]["w"], atol=1e-6)
    G = per_sample_grads(x, gr, mask)
    assert torch.allclose(G[1], gr[1, :3].T @ x[1, :3], atol=1e-6)
    bad = gr.clone()
    bad[2, 0, 0] = float("nan")
    st = GradStats.zeros(shapes, "cpu")
    ok = accumulate(st, "w", x, bad, mask, torch.ones(4, dtype=torch.bool))
    assert ok.tolist() == [True, True, False, True]
    assert torch.isfinite(st.tensors["sum_abs"]["w"]).all()
    assert torch.allclose(st.tensors["sum_abs"]["w"], G[[0, 1, 3]].abs().sum(0), atol=1e-6)
