"""Per-sample weight-gradient statistics through TransformerLens hooks.

For a linear layer ``y = W x`` the gradient of sample ``s``'s loss is
``G_s = Σ_t g_tᵀ x_t`` (``g_t = ∂L_s/∂y_t`` ``[out]``, ``x_t`` ``[in]``), summed over the sample's
tokens. A forward hook on ``blocks.{i}.attn.q.hook_in`` (and k, v, o, mlp gate/in/out) keeps
``x``; a backward hook on the matching ``hook_out`` receives ``g``; the pure accumulator
``accumulate`` turns a batch of both into ``Σ_s |G_s|``, ``Σ_s G_s``, ``Σ_s G_s²`` and the
activation norms ``Σ_t x_t²`` on the model's device in float32, keyed by HF parameter name.
Weight ``.grad`` is never computed (parameters are frozen; the embedding output carries the
graph), and nothing per sample leaves the device.

The model is a ``TransformerBridge`` (TransformerLens 4.x) booted around the loaded HF model with
no weight processing, so the HF weights are untouched and names map one to one.
"""
from __future__ import annotations

import contextlib
import functools
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

from circuitq.config import LOSS_SCOPES, RECOMPUTE_MODES
from circuitq.data.tasks import collate, scored_positions, tokenize_examples
from circuitq.errors import UsageError
from circuitq.model.arch import ArchSpec, Geometry, arch_for, target_shapes
from circuitq.saliency.objectives import Objective, sample_losses  # noqa: F401  (sample_losses: re-exported)

STATS = ("sum_abs", "sum", "sum_sq", "act_sq")
# padded tokens per forward/backward: memory grows with tokens in flight, throughput hardly does
# (SmolLM2-135M on 2 CPU cores: 512 tokens peak 2.2 GiB, 256 tokens 1.9 GiB and 5-10% slower; docs/memory.md)
DEFAULT_BATCH_TOKENS = 256   # the CLI default, CalibConfig.batch_tokens (docs/memory.md)


@dataclass
class GradStats:
    """Accumulated statistics: ``sum_abs``, ``sum``, ``sum_sq`` map HF weight names to
    ``[out, in]`` float32; ``act_sq`` to ``[in]`` (Σ_t x_t², so ``sqrt`` is ‖X_j‖)."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    n_samples: int = 0
    n_tokens: int = 0
    n_skipped: int = 0   # samples with a non-finite loss or gradient, in no sum (``collect_stats``)

    @classmethod
    def zeros(cls, shapes: dict[str, tuple[int, int]], device, stats=STATS) -> "GradStats":
        t = {}
        for s in stats:
            t[s] = {n: torch.zeros(shape if s != "act_sq" else shape[1:], device=device) for n, shape in shapes.items()}
        return cls(t)

    def merge(self, other: "GradStats") -> "GradStats":
        """Sum of two partial accumulations (shards, resumed runs)."""
        t = {s: {n: self.tensors[s][n] + other.tensors[s][n].to(self.tensors[s][n].device) for n in self.tensors[s]}
             for s in self.tensors}
        return GradStats(t, self.n_samples + other.n_samples, self.n_tokens + other.n_tokens,
                         self.n_skipped + other.n_skipped)


def per_sample_grads(x: torch.Tensor, g: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """``G_s = Σ_t m_t g_tᵀ x_t``: ``x`` ``[B, T, in]``, ``g`` ``[B, T, out]``, ``token_mask``
    ``[B, T]`` -> ``[B, out, in]`` float32."""
    g = g.float() * token_mask[..., None].to(torch.float32)
    return torch.bmm(g.transpose(1, 2), x.float())


def right_padded_lengths(token_mask: torch.Tensor) -> list[int] | None:
    """Each row's token count when ``token_mask`` ``[B, T]`` is right padding (every row a run of
    ``True`` from position 0), else ``None``."""
    n = token_mask.sum(1)
    prefix = torch.arange(token_mask.shape[1], device=token_mask.device)[None, :] < n[:, None]
    return n.tolist() if torch.equal(prefix, token_mask.bool()) else None


def finite_samples(t: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: whether ``t`` ``[B, T, d]`` is finite at every unmasked token (one pass: a
    non-finite entry makes its row sum non-finite)."""
    return (torch.isfinite(t.sum(-1, dtype=torch.float32)) | ~token_mask.bool()).all(1)


def accumulate(state: GradStats, name: str, x: torch.Tensor, g: torch.Tensor, token_mask: torch.Tensor,
               sample_ok: torch.Tensor, *, x_ok: torch.Tensor | None = None, lengths: list[int] | None = None,
               per_sample: bool | None = None, scratch: dict | None = None, sign: float = 1.0) -> torch.Tensor:
    """Add one module's batch to ``state`` in place; returns the per-sample flags ``[B]`` of the
    samples summed.

    ``x`` ``[B, T, in]``, ``g`` ``[B, T, out]``, ``token_mask`` ``[B, T]``. ``sample_ok`` (``[B]``
    bool) excludes samples already known to be bad; samples whose ``g`` or ``x`` is not finite at
    an unmasked token are excluded too (the caller counts them). ``x_ok`` passes ``x``'s flags
    when the caller has them (inputs shared by several modules); ``lengths`` the right-padding
    lengths (``right_padded_lengths``), so padded tokens are sliced away rather than multiplied
    by zero.

    ``Σ_s G_s`` alone (the ``sum`` statistic without ``sum_sq``/``sum_abs``) needs no per-sample
    matrix: it is one ``[out, T] @ [T, in]`` product over every kept token of the batch.
    Otherwise, two equal ways to form ``G_s``: ``per_sample=True`` loops over samples with one ``[out, in]``
    scratch matrix that stays in cache and is added into the sums straight away (the CPU
    default); ``False`` forms the ``[B, out, in]`` batch with one batched matmul (the GPU
    default). ``sign=-1`` subtracts the same contributions (``collect_stats`` takes back a sample
    whose gradient turned non-finite part-way through the backward pass).
    """
    ok = sample_ok & finite_samples(g, token_mask) & (finite_samples(x, token_mask) if x_ok is None else x_ok)
    t = state.tensors
    want_sum, want_sq, want_abs = "sum" in t, "sum_sq" in t, "sum_abs" in t
    if want_sum and not (want_sq or want_abs):
        # Σ_s G_s alone is the gradient of the summed loss: one matmul over every kept token
        keep = (ok[:, None] & token_mask.bool())[..., None]
        gm = torch.where(keep, g.float(), 0.0).reshape(-1, g.shape[-1])
        xm = torch.where(keep, x.float(), 0.0).reshape(-1, x.shape[-1])
        t["sum"][name].addmm_(gm.T, xm, alpha=sign)
    elif want_sum or want_sq or want_abs:
        if per_sample is None:
            per_sample = x.device.type == "cpu"
        xf, gf = x.float(), g.float()
        if per_sample:
            flags = ok.tolist()
            shape = (g.shape[-1], x.shape[-1])
            key = (shape, x.device)
            buf = scratch.get(key) if scratch is not None else None
            if buf is None:
                buf = torch.empty(shape, dtype=torch.float32, device=x.device)
                if scratch is not None:
                    scratch[key] = buf
            for s, keep in enumerate(flags):
                if not keep:
                    continue
                if lengths is not None:
                    gs, xs = gf[s, :lengths[s]], xf[s, :lengths[s]]
                else:
                    idx = token_mask[s].nonzero().flatten()
                    gs, xs = gf[s, idx], xf[s, idx]
                torch.mm(gs.T, xs, out=buf)
                if want_sum:
                    t["sum"][name].add_(buf, alpha=sign)
                if want_sq:
                    t["sum_sq"][name].addcmul_(buf, buf, value=sign)
                if want_abs:
                    t["sum_abs"][name].add_(buf.abs_(), alpha=sign)
        else:
            keep = (ok[:, None] & token_mask.bool())[..., None]
            G = torch.bmm(torch.where(keep, gf, 0.0).transpose(1, 2), torch.where(keep, xf, 0.0))
            if want_sum:
                t["sum"][name].add_(G.sum(0), alpha=sign)
            if want_sq:
                t["sum_sq"][name].add_((G * G).sum(0), alpha=sign)
            if want_abs:
                t["sum_abs"][name].add_(G.abs_().sum(0), alpha=sign)
    if "act_sq" in t:
        keep = (ok[:, None] & token_mask.bool())[..., None]
        xm = torch.where(keep, x.float(), 0.0)
        t["act_sq"][name].add_((xm * xm).sum((0, 1)), alpha=sign)
    return ok


def boot_bridge(model, tokenizer, name_or_path: str):
    """Wrap a loaded HF model in a TransformerLens ``TransformerBridge`` (no weight processing).

    Booting rewires ``model`` in place (its submodules become bridge components, and the
    attention implementation is forced to eager); ``bridged`` undoes that afterwards."""
    return TransformerBridge.boot_transformers(name_or_path, hf_model=model, tokenizer=tokenizer)


def _attn_configs(model) -> dict:
    return {id(c): c for c in [model.config] + [getattr(m, "config", None) for m in model.modules()]
            if c is not None and hasattr(c, "_attn_implementation")}


@contextmanager
def bridged(model, tokenizer, name_or_path: str):
    """A ``TransformerBridge`` around ``model`` for the duration of the block; afterwards the HF
    module tree and attention implementation are as before, so the caller's model keeps its HF
    parameter names and a later bridge does not nest inside this one."""
    tree = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set))
            for m in model.modules()]
    configs = _attn_configs(model)
    impl = {k: c._attn_implementation for k, c in configs.items()}
    try:
        yield boot_bridge(model, tokenizer, name_or_path)
    finally:
        # booting also registers tensors on HF modules (e.g. an lm_head bias buffer): restore them too
        for m, children, params, buffers, non_persistent in tree:
            for d, saved in ((m._modules, children), (m._parameters, params), (m._buffers, buffers)):
                d.clear()
                d.update(saved)
            m._non_persistent_buffers_set.clear()
            m._non_persistent_buffers_set.update(non_persistent)
        for k, c in configs.items():
            c._attn_implementation = impl[k]


@contextmanager
def fused_attention(bridge, model, impl: str = "sdpa"):
    """Within the block, the bridge's attention components delegate to the HF attention module
    (TransformerLens's own ``AttentionBridge.forward``: ``hook_in`` -> HF -> ``hook_out``) and HF
    runs ``impl`` (fused scaled-dot-product attention) instead of the bridge's step-by-step
    reimplementation. The q/k/v/o LinearBridges sit inside the HF module, so their hooks fire as
    before; only the attention-internal hooks (``hook_attn_scores``, ``hook_pattern``, ...) are
    silent, which scoring never uses. The same math, without the ``[B, heads, T, T]`` pattern
    kept for the backward pass. Restores the forwards and the attention implementation after."""
    swapped, wrapped = [], []
    for m in bridge.modules():
        if isinstance(m, AttentionBridge) and type(m).forward is not AttentionBridge.forward \
                and getattr(m, "original_component", None) is not None:
            # object.__setattr__: the bridge's own __setattr__ would pass the name on to the HF module
            object.__setattr__(m, "forward", types.MethodType(AttentionBridge.forward, m))
            swapped.append(m)
            # a projection the adapter left unwrapped inside the HF module (GPT-2's joint-QKV attention
            # leaves c_proj bare): its LinearBridge put there, so its hooks fire when HF calls it
            hf = m.original_component
            for comp in m.children():
                raw = getattr(comp, "original_component", None)
                name = getattr(comp, "name", None)
                if raw is not None and name and hf._modules.get(name) is raw:
                    hf._modules[name] = comp
                    wrapped.append((hf, name, raw))
    configs = _attn_configs(model)
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = impl
        yield len(swapped)
    finally:
        for hf, name, raw in wrapped:
            hf._modules[name] = raw
        for m in swapped:
            object.__delattr__(m, "forward")
        for k, c in configs.items():
            c._attn_implementation = before[k]


CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


class LayerRecompute:
    """Layer checkpointing for the gradient pass, switched per batch (``on``). While on, each
    decoder layer's forward runs without keeping its activations and is run again, with them, when
    the backward pass reaches it (``torch.utils.checkpoint``, reentrant: the first forward runs under
    ``no_grad``, so ``HookCapture`` keeps nothing then and captures during the recomputation).
    The recomputation is the same computation on the same inputs, so the statistics are equal bit for
    bit; the batch costs about one more forward (measured +26% on the default model's longest items).
    Memory of a batch of ``T`` padded tokens: ``4·T·d`` per layer (the layer inputs) plus one layer's
    working set, instead of every layer's activations (``budget.run_stages``).

    Use as a context manager around the batches, after the bridge is booted: it patches the forward
    of each decoder layer (the family's ``ArchSpec.layers``; the bridge's block components) and
    restores it after."""

    def __init__(self, model):
        self.model, self.on, self._patched = model, False, []

    def __enter__(self) -> "LayerRecompute":
        for layer in self.model.get_submodule(arch_for(self.model.config.model_type).layers):
            original = layer.forward

            def forward(*args, _original=original, **kwargs):
                if self.on and torch.is_grad_enabled() and args and torch.is_tensor(args[0]) \
                        and args[0].requires_grad:
                    # a KV cache would be written twice (the rerun appends again): none while checkpointing
                    kwargs = {k: (None if k in CACHE_KWARGS else v) for k, v in kwargs.items()}
                    if "use_cache" in kwargs:
                        kwargs["use_cache"] = False
                    return torch.utils.checkpoint.checkpoint(functools.partial(_original, **kwargs), *args,
                                                             use_reentrant=True)
                return _original(*args, **kwargs)
            # object.__setattr__: the bridge's own __setattr__ would pass the name on to the HF module
            object.__setattr__(layer, "forward", forward)
            self._patched.append(layer)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self._patched:
            object.__delattr__(layer, "forward")
        self._patched.clear()


class HookCapture:
    """Registers the forward/backward hooks on a bridge for the targeted modules of every layer
    and feeds ``accumulate``. Use as a context manager around forward + backward of a batch.

    Modules that read the same input (q/k/v; gate/up) share it: its finiteness flags are
    computed once per batch. ``per_sample`` picks ``accumulate``'s way of forming ``G_s``.

    The down projection's input ``act(gate) * up`` is the largest tensor the hooks would keep,
    and autograd keeps ``gate`` and ``up`` anyway (for the activation's and the product's
    backward): with ``recompute_mlp`` the hooks keep references to those two and recompute the
    input in the backward hook. The first forward checks that the recomputation equals the real
    input bit for bit; where it does not (another MLP form), the input is kept as usual."""

    def __init__(self, bridge, n_layers: int, state: GradStats, spec: ArchSpec,
                 per_sample: bool | None = None, recompute_mlp: bool = True, geometry: Geometry | None = None):
        self.bridge, self.state, self.per_sample = bridge, state, per_sample
        # (hook component, accumulation key, layer, component): a module's own hooks, or, for a fused
        # module whose blocks the bridge runs apart, each segment's hooks into its block of rows
        self.targets, self.views = [], {}
        for i in range(n_layers):
            for lin in spec.linears:
                name = spec.weight_name(i, lin.path)
                if lin.tl is not None:
                    self.targets.append((f"blocks.{i}.{lin.tl}", name, i, lin.tl))
                    continue
                for j, (seg, (_, _, _, rows)) in enumerate(zip(lin.segments, lin.parts(geometry))):
                    key = f"{name}#{seg.kind}"
                    # views of the fused statistics' rows; the shared input's Σx² counted once (first segment)
                    self.views[key] = GradStats({st: {key: t[name] if st == "act_sq" else t[name][rows]}
                                                 for st, t in state.tensors.items()
                                                 if st != "act_sq" or j == 0})
                    self.targets.append((f"blocks.{i}.{seg.tl}", key, i, seg.tl))
        self.down_tl = spec.tl_of("down_proj")
        self.gate_up_tl = {"gate": spec.tl_of("gate_proj"), "up": spec.tl_of("up_proj")}
        self.acts: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.token_mask = self.sample_ok = self.lengths = None
        self.bad = None
        self.sign = 1.0
        self.scratch: dict = {}
        self._x_ok: dict = {}
        self.act_fns: dict[int, object] = {}
        if recompute_mlp:
            for i in range(n_layers):
                try:
                    act = getattr(bridge.blocks[i].mlp, "act_fn", None)
                except (AttributeError, IndexError):
                    act = None
                if callable(act):
                    self.act_fns[i] = act
        self.recompute_ok: bool | None = None if self.act_fns else False   # None: not checked yet
        self._gate_up: dict[tuple[int, str], torch.Tensor] = {}

    def _down_input(self, i: int) -> torch.Tensor:
        with torch.no_grad():
            return self.act_fns[i](self._gate_up[(i, "gate")]) * self._gate_up[(i, "up")]

    def _keep_out(self, i: int, which: str):
        def hook(y, hook):
            if torch.is_grad_enabled():   # not in a checkpointed layer's first forward (LayerRecompute)
                self._gate_up[(i, which)] = y.detach()
        return hook

    def _fwd(self, hf, i, tl):
        def hook(x, hook):
            if not torch.is_grad_enabled():   # a checkpointed layer's first forward: captured when it reruns
                return
            key = (i, x.data_ptr(), tuple(x.shape))   # a rerun layer may reuse a freed layer's address
            x = x.detach()
            if key not in self._x_ok:
                self._x_ok[key] = finite_samples(x.flatten(2), self.token_mask)
            if tl == self.down_tl and i in self.act_fns and self.recompute_ok is not False:
                if self.recompute_ok is None:
                    self.recompute_ok = torch.equal(self._down_input(i), x)
                if self.recompute_ok:
                    self.acts[hf] = (None, self._x_ok[key])
                    return
            if tl == self.down_tl:   # input kept: the references are not needed
                self._gate_up.pop((i, "gate"), None)
                self._gate_up.pop((i, "up"), None)
            self.acts[hf] = (x.flatten(2), self._x_ok[key])  # [B, T, heads, d_head] -> [B, T, in]
        return hook

    def _bwd(self, hf, i, tl):
        def hook(g, hook):
            x, x_ok = self.acts.pop(hf)
            if x is None:
                x = self._down_input(i).flatten(2)
                del self._gate_up[(i, "gate")], self._gate_up[(i, "up")]
            ok = accumulate(self.views.get(hf, self.state), hf, x, g.detach().flatten(2), self.token_mask,
                            self.sample_ok, x_ok=x_ok,
                            lengths=self.lengths, per_sample=self.per_sample, scratch=self.scratch, sign=self.sign)
            self.bad |= self.sample_ok & ~ok
        return hook

    def batch(self, token_mask: torch.Tensor, sample_ok: torch.Tensor):
        self.token_mask, self.sample_ok = token_mask, sample_ok
        self.lengths = right_padded_lengths(token_mask)
        self.bad = torch.zeros_like(sample_ok)
        self._x_ok = {}
        self._gate_up = {}
        fwd = [(f"{name}.hook_in", self._fwd(hf, i, tl)) for name, hf, i, tl in self.targets]
        if self.recompute_ok is not False:
            fwd += [(f"blocks.{i}.{tl}.hook_out", self._keep_out(i, which))
                    for i in self.act_fns for which, tl in self.gate_up_tl.items()]
        bwd = [(f"{name}.hook_out", self._bwd(hf, i, tl)) for name, hf, i, tl in self.targets]
        return self.bridge.hooks(fwd_hooks=fwd, bwd_hooks=bwd)


def _take_back(bridge, cap: HookCapture, input_ids, attn, lmask, bad: torch.Tensor, objective, batch_items) -> None:
    """Run the same batch again for the ``bad`` samples only, subtracting (``sign=-1``) what each
    module added for them: their gradients are the same values, so they turn non-finite at the
    same module and are taken back exactly where they were summed (to float rounding)."""
    with cap.batch(attn, bad):
        cap.sign = -1.0
        try:
            pos = scored_positions(lmask)
            logits = bridge(input_ids, attention_mask=attn.long(), return_type="logits", logits_to_keep=pos)
            losses = objective(logits, input_ids, lmask, pos, batch_items)
            del logits
            losses[bad].sum().backward()
        finally:
            cap.sign = 1.0


class CollectResult(dict):
    """``{"stats": GradStats, "truncated": int, "seconds": float, "tokens_per_s": float, "loss": float}``; ``loss``:
    the sum of the items' finite objective values (``attribution.summed_loss``'s quantity, of the items counted in
    this call)."""


def plan_batches(lengths: list[int], batch_size: int, batch_tokens: int = 0, start: int = 0) -> list[list[int]]:
    """Greedy batches over positions ``start..`` of ``lengths`` (token counts, in processing
    order): at most ``batch_size`` samples, and at most ``batch_tokens`` padded tokens
    (``samples × longest``; 0 = no limit). A sample longer than the budget runs alone.
    Returns lists of positions; the same ``start`` always gives the same batches."""
    out, cur, longest = [], [], 0
    for i in range(start, len(lengths)):
        n = max(longest, lengths[i])
        if cur and (len(cur) >= batch_size or (batch_tokens and (len(cur) + 1) * n > batch_tokens)):
            out.append(cur)
            cur, n = [], lengths[i]
        cur.append(i)
        longest = n
    if cur:
        out.append(cur)
    return out


def collect_stats(model, tokenizer, examples, model_path: str, *, batch_size: int = 8, seq_len: int = 512,
                  stats=STATS, state: GradStats | None = None, start: int = 0, progress: bool = True,
                  on_batch=None, batch_tokens: int = DEFAULT_BATCH_TOKENS, attention: str = "sdpa",
                  per_sample: bool | None = None, loss: str = "answer", recompute: str = "long",
                  objective: str = "nll") -> CollectResult:
    """Run ``examples`` through a TransformerLens bridge around ``model`` and accumulate
    per-sample gradient statistics (driver: hooks, batches and progress live here).

    Examples are processed longest first (stable), so batches hold similar lengths and little
    padding and the largest batch comes first; ``start`` counts examples in that order. A batch
    holds at most ``batch_size`` samples and, with ``batch_tokens``, at most that many padded
    tokens (memory grows with tokens in flight, throughput hardly does). Logits are computed
    only at the positions scored in the batch (``logits_to_keep``). ``attention``: ``"sdpa"``
    (default) runs HF's fused attention inside the bridge (``fused_attention``), ``"bridge"``
    TransformerLens's step-by-step attention; both give the same statistics.

    ``recompute`` (``LayerRecompute``): ``"long"`` reruns each layer in the backward pass instead of
    keeping its activations for a batch over ``batch_tokens`` (an item longer than the budget, alone
    in its batch), so no batch keeps more than the budget's activations; ``"all"`` for every batch,
    ``"none"`` never. The statistics are the same bit for bit.

    ``objective`` (``saliency.objectives``): what each item's gradient is of: ``nll`` (the loss on its
    scored tokens) or ``metric`` (minus a circuit task's metric at the first completion position).

    ``state`` continues an earlier accumulation (resume); ``on_batch(state, n_done)`` is called
    after every batch (checkpointing). Parameters are frozen during the run and restored after.
    """
    if attention not in ("sdpa", "bridge", "eager"):
        raise UsageError(f"attention must be 'sdpa', 'eager' or 'bridge', got '{attention}'")
    if recompute not in RECOMPUTE_MODES:
        raise UsageError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {recompute!r}")
    spec = arch_for(model.config.model_type)
    if attention == "bridge" and spec.fused_hooks:
        raise UsageError(f"--attention bridge runs {model.config.model_type}'s fused attention projection as split "
                         "copies that its hooks do not see; use --attention sdpa (the default) or eager")
    device = next(model.parameters()).device
    shapes = target_shapes(model)
    state = state if state is not None else GradStats.zeros(shapes, device, stats)
    if loss not in LOSS_SCOPES:
        raise UsageError(f"loss must be one of {LOSS_SCOPES}, got {loss!r}")
    obj = Objective(objective, tokenizer)
    # "all": every next-token prediction of the text, as the official TaCQ code; "text": all but the chat template's
    tok = tokenize_examples(examples, tokenizer, seq_len, loss)
    order = sorted(range(len(tok.ids)), key=lambda i: -len(tok.ids[i]))  # longest first
    batches = plan_batches([len(tok.ids[i]) for i in order], batch_size, batch_tokens, start)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0, tokens, loss_sum = time.perf_counter(), 0, 0.0
    bar = tqdm(total=len(examples) - start, desc="scoring", unit="sample", disable=not progress)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        stack.callback(lambda: [p.requires_grad_(f) for p, f in flags])
        bridge = stack.enter_context(bridged(model, tokenizer, model_path))
        if attention != "bridge":
            stack.enter_context(fused_attention(bridge, model, attention))
        cap = HookCapture(bridge, model.config.num_hidden_layers, state, spec, per_sample=per_sample,
                          geometry=Geometry.from_config(model.config))
        for p, _ in flags:
            p.requires_grad_(False)
        h_embed = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        stack.callback(h_embed.remove)
        rerun = stack.enter_context(LayerRecompute(model)) if recompute != "none" else None
        for positions in batches:
            idx = [order[p] for p in positions]
            ids, st = [tok.ids[i] for i in idx], [tok.scored_from[i] for i in idx]
            skip = [tok.unscored[i] for i in idx] if tok.unscored is not None else None
            input_ids, attn, lmask = (t.to(device) for t in collate(ids, st, pad, skip))
            if rerun is not None:
                rerun.on = recompute == "all" or bool(batch_tokens and input_ids.numel() > batch_tokens)
            with cap.batch(attn, torch.ones(len(ids), dtype=torch.bool, device=device)):
                pos = scored_positions(lmask)
                logits = bridge(input_ids, attention_mask=attn.long(), return_type="logits", logits_to_keep=pos)
                losses = obj(logits, input_ids, lmask, pos, [examples[i] for i in idx])
                del logits
                ok = torch.isfinite(losses)
                cap.sample_ok = ok
                loss_sum += float(losses[ok].detach().sum())
                if ok.any():
                    losses[ok].sum().backward()
            bad = cap.bad.clone()
            if bad.any():   # finite loss, gradient non-finite part-way: take back what the later layers added
                _take_back(bridge, cap, input_ids, attn, lmask, bad, obj, [examples[i] for i in idx])
            n_bad = int((~ok | bad).sum())
            state.n_samples += len(ids) - n_bad
            state.n_skipped += n_bad
            ntok = int(attn.sum())
            state.n_tokens += ntok
            tokens += ntok
            bar.update(len(ids))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.0f} tok/s")
            if on_batch is not None:
                on_batch(state, positions[-1] + 1)
    secs = time.perf_counter() - t0
    return CollectResult(stats=state, truncated=tok.truncated, seconds=secs, tokens_per_s=tokens / max(secs, 1e-9),
                         loss=loss_sum)
