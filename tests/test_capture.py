import pytest
import torch

from circuitq.saliency.capture import GradStats, accumulate, collect_stats, per_sample_grads, sample_losses
from circuitq.model.arch import target_shapes
from circuitq.data.tasks import Example, collate, tokenize_examples
from circuitq.errors import UsageError


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


def _rand_batch(seed=1, B=5, T=7, n_in=6, n_out=4):
    g = torch.Generator().manual_seed(seed)
    x, gr = torch.randn(B, T, n_in, generator=g), torch.randn(B, T, n_out, generator=g)
    lengths = [7, 5, 3, 7, 1]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return x, gr, mask, lengths


def test_per_sample_loop_and_batched_matmul_agree_on_every_statistic():
    x, gr, mask, lengths = _rand_batch()
    gr[2, 1, 0] = float("inf")          # a bad sample, inside its tokens
    x[1, 6, 2] = float("nan")           # NaN at a padded position: ignored, sample 1 kept
    shapes = {"w": (4, 6)}
    ok_all = torch.ones(5, dtype=torch.bool)
    runs = {}
    for name, kw in {"loop+lengths": dict(per_sample=True, lengths=lengths), "loop+mask": dict(per_sample=True),
                     "batched": dict(per_sample=False)}.items():
        st = GradStats.zeros(shapes, "cpu")
        ok = accumulate(st, "w", x, gr, mask, ok_all, **kw)
        assert ok.tolist() == [True, True, False, True, True], name
        runs[name] = st
    keep = [0, 1, 3, 4]
    G = torch.stack([gr[s, :lengths[s]].T @ x[s, :lengths[s]] for s in keep])
    xm = torch.stack([torch.where(mask[s, :, None], x[s], 0.0) for s in keep])
    direct = {"sum_abs": G.abs().sum(0), "sum": G.sum(0), "sum_sq": (G * G).sum(0), "act_sq": (xm * xm).sum((0, 1))}
    for name, st in runs.items():
        for s, want in direct.items():
            assert torch.allclose(st.tensors[s]["w"], want, atol=1e-5), (name, s)
    only_sum = GradStats.zeros(shapes, "cpu", ("sum",))     # the one-matmul path: same sum, same samples
    ok = accumulate(only_sum, "w", x, gr, mask, ok_all)
    assert ok.tolist() == [True, True, False, True, True]
    assert torch.allclose(only_sum.tensors["sum"]["w"], direct["sum"], atol=1e-5)


def test_right_padded_lengths_and_finite_samples():
    from circuitq.saliency.capture import finite_samples, right_padded_lengths

    _, _, mask, lengths = _rand_batch()
    assert right_padded_lengths(mask) == lengths
    holes = mask.clone()
    holes[0, 2] = False
    assert right_padded_lengths(holes) is None
    t = torch.zeros(5, 7, 3)
    t[1, 6, 0] = float("nan")   # padded: fine
    t[3, 0, 2] = float("-inf")  # real token: bad
    assert finite_samples(t, mask).tolist() == [True, True, True, False, True]


def test_plan_batches_respects_count_and_token_budget_and_resumes_the_same():
    from circuitq.saliency.capture import plan_batches

    lengths = [300, 200, 120, 120, 100, 60, 60, 50, 40, 10]   # longest first
    b = plan_batches(lengths, batch_size=3, batch_tokens=256)
    assert b == [[0], [1], [2, 3], [4, 5], [6, 7, 8], [9]]
    assert all(len(x) <= 3 and (len(x) == 1 or len(x) * lengths[x[0]] <= 256) for x in b)
    assert [i for x in b for i in x] == list(range(len(lengths)))
    assert plan_batches(lengths, 3, 256, start=4) == b[3:]
    assert plan_batches(lengths, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_fused_attention_equals_bridge_attention_and_restores_the_bridge(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitq.saliency.capture import bridged, fused_attention

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    ex = _examples()
    out = {a: collect_stats(model, tok, ex, str(d), batch_size=3, seq_len=64, progress=False, attention=a,
                            batch_tokens=40)["stats"] for a in ("sdpa", "bridge")}
    for s in ("sum_abs", "sum"):
        for n, t in out["bridge"].tensors[s].items():
            assert (out["sdpa"].tensors[s][n] - t).norm() <= 1e-5 * t.norm(), (s, n)
    names = [n for n, _ in model.named_parameters()]
    state_keys = list(model.state_dict())
    layer_type = type(model.model.layers[0])
    impl = model.config._attn_implementation
    with bridged(model, tok, str(d)) as bridge:
        assert type(model.model.layers[0]) is not layer_type    # booting rewires the model in place ...
        attn = bridge.blocks[0].attn
        with fused_attention(bridge, model) as n_swapped:
            assert n_swapped == model.config.num_hidden_layers
            assert "forward" in vars(attn) and model.config._attn_implementation == "sdpa"
        assert "forward" not in vars(attn)
    # ... and bridged() puts it back: HF names, HF modules, attention implementation
    assert [n for n, _ in model.named_parameters()] == names and type(model.model.layers[0]) is layer_type
    assert model.config._attn_implementation == impl
    assert list(model.state_dict()) == state_keys   # no tensor the bridge registered (lm_head bias) stays behind
    again = collect_stats(model, tok, ex, str(d), batch_size=3, seq_len=64, progress=False, batch_tokens=40)["stats"]
    for n, t in out["sdpa"].tensors["sum_abs"].items():
        assert torch.equal(again.tensors["sum_abs"][n], t), n   # a second scoring sees the same model


def test_recomputed_down_projection_input_gives_the_same_statistics(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import circuitq.saliency.capture as C

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    ex = _examples()
    seen = {}
    orig = C.HookCapture.__init__

    def spy(self, *a, recompute_mlp=True, **k):
        orig(self, *a, recompute_mlp=recompute_mlp and seen["on"] != "off", **k)
        if seen["on"] == "wrong":   # an MLP that is not act(gate) * up: the check must catch it
            self.act_fns = {i: torch.tanh for i in self.act_fns}
        seen["cap"] = self

    runs = {}
    for on in ("on", "off", "wrong"):
        seen.clear()
        seen["on"] = on
        C.HookCapture.__init__ = spy
        try:
            runs[on] = collect_stats(model, tok, ex, str(d), batch_size=3, seq_len=64, progress=False)["stats"]
        finally:
            C.HookCapture.__init__ = orig
        cap = seen["cap"]
        assert cap.recompute_ok is (on == "on")   # checked bit for bit on the real input
        assert not cap._gate_up and not cap.acts            # nothing left behind
    for s in ("sum_abs", "sum", "sum_sq", "act_sq"):
        for n, t in runs["off"].tensors[s].items():
            assert torch.equal(runs["on"].tensors[s][n], t), (s, n)
            assert torch.equal(runs["wrong"].tensors[s][n], t), (s, n)


def test_layer_recompute_gives_the_same_statistics_bit_for_bit_and_reruns_each_layer(tiny_dir):
    """``recompute``: a checkpointed batch runs each decoder layer twice (a forward without
    activations, then the rerun in the backward pass) and gives the same sums, bit for bit; "long"
    checkpoints exactly the batches over the token budget; the layers' forwards are restored after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    ex = _examples() + [Example("the quick brown fox " * 6, " jumps over the lazy dog" * 3)]   # one long item
    layer = model.model.layers[0]
    calls = []
    h = layer.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    runs, reruns = {}, {}
    try:
        for mode in ("none", "all", "long"):
            calls.clear()
            runs[mode] = collect_stats(model, tok, ex, str(d), batch_size=3, seq_len=64, progress=False,
                                       batch_tokens=60, recompute=mode)["stats"]
            reruns[mode] = calls.count(False)     # first forwards of a checkpointed layer run without grad
    finally:
        h.remove()
    lengths = sorted((len(x) for x in tokenize_examples(ex, tok, 64).ids), reverse=True)
    assert lengths[0] > 60 >= lengths[1]     # the long item alone over the budget; every other batch fits
    assert reruns["none"] == 0 and reruns["long"] == 1 and reruns["all"] >= 3
    for s in ("sum_abs", "sum", "sum_sq", "act_sq"):
        for n, t in runs["none"].tensors[s].items():
            assert torch.equal(runs["all"].tensors[s][n], t), (s, n)
            assert torch.equal(runs["long"].tensors[s][n], t), (s, n)
    assert "forward" not in vars(layer) and "forward" not in vars(model.model.layers[1])
    with pytest.raises(UsageError, match="recompute must be one of long, all, none"):
        collect_stats(model, tok, ex, str(d), progress=False, recompute="sometimes")


def test_loss_all_gradients_equal_autograd_over_every_token(tiny_dir):
    """``--loss all`` (the official TaCQ code's choice): the statistics are of the loss on every
    token of the item, not just the completion, and equal plain autograd per sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ex = _examples()
    shapes = target_shapes(model)
    params = dict(model.named_parameters())
    ref = {n: torch.zeros(s) for n, s in shapes.items()}
    t = tokenize_examples(ex, tok, 64)
    for ids in t.ids:
        b = collate([ids], [1], tok.pad_token_id)   # every position predicts its next token
        assert int(b.loss_mask.sum()) == len(ids) - 1
        model.zero_grad()
        sample_losses(model(input_ids=b.input_ids).logits, b.input_ids, b.loss_mask).sum().backward()
        for n in shapes:
            ref[n] += params[n].grad.abs()
    model.zero_grad()
    st = collect_stats(model, tok, ex, str(d), batch_size=4, seq_len=64, progress=False, loss="all")["stats"]
    answer = collect_stats(model, tok, ex, str(d), batch_size=4, seq_len=64, progress=False)["stats"]
    for n in ref:
        err = (st.tensors["sum_abs"][n] - ref[n]).norm() / ref[n].norm()
        assert err <= 1e-5, (n, float(err))
    n0 = next(iter(ref))
    assert not torch.allclose(st.tensors["sum_abs"][n0], answer.tensors["sum_abs"][n0])  # the scope matters


CHAT = ("{% for m in messages %}### System:\nYou are a helpful assistant.\n### {{ m['role'] }}:\n{{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}")


def _chat_examples(tok):
    from circuitq.data.tasks import mmlu_example

    qs = [{"subject": "anatomy", "question": f"Which bone number {i} is longest?",
           "choices": ["femur", "tibia", "ulna", "rib"], "answer": "ABCD"[i % 4]} for i in range(4)]
    return [mmlu_example(q, [], tok, "chat") for q in qs]


def test_loss_text_leaves_out_exactly_the_chat_template_tokens(tiny_dir):
    """``--loss text``: every token but the chat template's. The template's tokens are found
    independently here, by tokenizing the prompt in three pieces around the task's text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir[0])
    tok.chat_template = CHAT
    ex = _chat_examples(tok)
    t = tokenize_examples(ex, tok, 512, loss="text")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for e, ids, st, skip in zip(ex, t.ids, t.scored_from, t.unscored):
        a, b = e.content
        assert e.prompt[a:b].startswith("The following are multiple choice questions") and st == 1
        pre, body, post = enc(e.prompt[:a]), enc(e.prompt[a:b]), enc(e.prompt[b:])
        assert pre + body + post == enc(e.prompt)          # the pieces tokenize as the whole does
        want = list(range(1, len(pre))) + list(range(len(pre) + len(body), len(pre) + len(body) + len(post)))
        assert skip == want and len(want) > 5
        m = collate([ids], [st], tok.pad_token_id, [skip]).loss_mask[0]
        # scored next tokens: the task's text from its second token on, and the answer letter
        assert int(m.sum()) == len(ids) - 1 - len(want) and bool(m[len(ids) - 2])
    t_all = tokenize_examples(ex, tok, 512, loss="all")
    assert t_all.unscored is None and t_all.ids == t.ids
    # without a chat template the task's text is all of the prompt: text == all
    raw = tokenize_examples(_examples(), tok, 64, loss="text")
    assert all(s == [] for s in raw.unscored) and raw.scored_from == [1] * len(raw.ids)
    # a truncated sequence keeps its template indices aligned with its end
    short = tokenize_examples(ex[:1], tok, len(t.ids[0]) - 3, loss="text")
    assert short.truncated == 1 and short.unscored[0] == [i - 3 for i in t.unscored[0] if i - 3 >= 1]


def test_loss_text_gradients_equal_autograd_without_the_template(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ex = _chat_examples(tok)
    shapes = target_shapes(model)
    params = dict(model.named_parameters())
    t = tokenize_examples(ex, tok, 512, loss="text")
    ref = {n: torch.zeros(s) for n, s in shapes.items()}
    for ids, skip in zip(t.ids, t.unscored):
        b = collate([ids], [1], tok.pad_token_id, [skip])
        model.zero_grad()
        sample_losses(model(input_ids=b.input_ids).logits, b.input_ids, b.loss_mask).sum().backward()
        for n in shapes:
            ref[n] += params[n].grad.abs()
    model.zero_grad()
    kw = dict(batch_size=4, seq_len=512, progress=False)
    text = collect_stats(model, tok, ex, str(d), loss="text", **kw)["stats"].tensors["sum_abs"]
    every = collect_stats(model, tok, ex, str(d), loss="all", **kw)["stats"].tensors["sum_abs"]
    for n in ref:
        assert (text[n] - ref[n]).norm() / ref[n].norm() <= 1e-5, n
    n0 = next(iter(ref))
    assert not torch.allclose(text[n0], every[n0])      # leaving the template out changes the gradients


def test_a_gradient_turning_nan_mid_backward_is_in_no_sum(tiny_dir):
    """A sample whose loss is finite but whose gradient turns NaN at layer 0 (after the later
    layers have summed it) is taken back everywhere: the statistics equal those of the other
    samples alone, and it is counted as skipped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _ = tiny_dir
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    ex = _examples()
    poison = Example("the lazy dog", " 9999 9999")
    others = set().union(*(tok(e.prompt + e.completion)["input_ids"] for e in ex))
    marker = set(tok(" 9999")["input_ids"]) - others     # tokens only the poisoned sample has
    assert marker
    rows = {}

    def find(module, args, out):      # which rows of this batch hold the poisoned sample
        ids = args[0]
        rows["now"] = torch.tensor([bool(marker & set(r.tolist())) for r in ids])

    def poison_grad(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        sel = rows["now"].clone()
        if h.requires_grad and sel.any():
            h.register_hook(lambda g: torch.where(sel[:, None, None], torch.full_like(g, float("nan")), g))

    hooks = [model.get_input_embeddings().register_forward_hook(find),
             model.model.layers[0].register_forward_hook(poison_grad)]
    try:
        got = collect_stats(model, tok, ex + [poison], str(d), batch_size=3, seq_len=64, progress=False)["stats"]
    finally:
        for h in hooks:
            h.remove()
    want = collect_stats(model, tok, ex, str(d), batch_size=3, seq_len=64, progress=False)["stats"]
    assert got.n_skipped == 1 and got.n_samples == len(ex)
    for s in ("sum_abs", "sum", "sum_sq", "act_sq"):
        for n, t in want.tensors[s].items():
            err = float((got.tensors[s][n] - t).norm() / t.norm().clamp(min=1e-12))
            assert err <= 1e-5, (s, n, err)


def test_every_hook_point_the_capture_uses_exists_in_the_bridge(tmp_path, model_type):
    """The TransformerLens hook names circuitq hooks (``blocks.N.attn.q.hook_in`` ...; the MLP's
    gate/up ``hook_out`` for the recomputed down-projection input) exist in the bridge of each
    supported family: a TransformerLens release that renames them fails here, not mid-run."""
    from conftest import tiny_model, tiny_tokenizer

    from circuitq.model.arch import arch_for
    from circuitq.saliency.capture import HookCapture, bridged

    d = tmp_path / model_type
    tiny_model(model_type).save_pretrained(d)
    tok = tiny_tokenizer()
    tok.save_pretrained(d)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d)
    with bridged(model, tok, str(d)) as bridge:
        cap = HookCapture(bridge, model.config.num_hidden_layers, GradStats(), arch_for(model_type))
        names = [f"{n}.{h}" for n, *_ in cap.targets for h in ("hook_in", "hook_out")]
        names += [f"blocks.{i}.{tl}.hook_out" for i in cap.act_fns for tl in cap.gate_up_tl.values()]
        missing = [n for n in names if n not in bridge.hook_dict]
        assert not missing, missing
        assert len(names) == model.config.num_hidden_layers * (2 * 7 + 2)
