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

from dataclasses import dataclass, field

import torch

# TransformerLens bridge component -> HF module, for the Llama-like families
TL_TO_HF = {
    "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.in": "mlp.up_proj", "mlp.out": "mlp.down_proj",
}
STATS = ("sum_abs", "sum", "sum_sq", "act_sq")


@dataclass
class GradStats:
    """Accumulated statistics: ``sum_abs``, ``sum``, ``sum_sq`` map HF weight names to
    ``[out, in]`` float32; ``act_sq`` to ``[in]`` (Σ_t x_t², so ``sqrt`` is ‖X_j‖)."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    n_samples: int = 0
    n_tokens: int = 0
    n_skipped: int = 0   # samples with a non-finite loss or gradient, never summed

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
    return torch.einsum("bto,bti->boi", g, x.float())


def accumulate(state: GradStats, name: str, x: torch.Tensor, g: torch.Tensor, token_mask: torch.Tensor,
               sample_ok: torch.Tensor) -> torch.Tensor:
    """Add one module's batch to ``state`` in place; returns the per-sample finite flags ``[B]``.

    ``sample_ok`` (``[B]`` bool) excludes samples already known to be bad; samples whose
    gradient is not finite are excluded too (the caller counts them).
    """
    # finite inputs give a finite G (checked on the small [B, T, ·] tensors, not on [B, out, in])
    ok = sample_ok & torch.isfinite(g).flatten(1).all(1) & torch.isfinite(x).flatten(1).all(1)
    if not bool(ok.all()):
        x, g, token_mask = x[ok], g[ok], token_mask[ok]
    G = per_sample_grads(x, g, token_mask)
    t = state.tensors
    if "sum_abs" in t:
        t["sum_abs"][name] += (G.abs() if ("sum" in t or "sum_sq" in t) else G.abs_()).sum(0)
    if "sum" in t:
        t["sum"][name] += G.sum(0)
    if "sum_sq" in t:
        t["sum_sq"][name] += (G * G).sum(0)
    if "act_sq" in t:
        xm = x.float() * token_mask[..., None]
        t["act_sq"][name] += (xm * xm).sum((0, 1))
    return ok


def sample_losses(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token NLL over each sample's scored positions: ``[B]``. ``loss_mask[b, t]``
    marks that position ``t`` predicting token ``t+1`` is scored. With ``positions`` (``[K]``),
    ``logits`` holds only those positions (``[B, K, V]``), as computed with ``logits_to_keep``."""
    if positions is None:
        positions = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
        logits = logits[:, :-1]
    targets = input_ids[:, positions + 1]
    lp = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    m = loss_mask[:, positions].to(lp.dtype)
    return (lp * m).sum(1) / m.sum(1).clamp(min=1)


def scored_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions scored in any sample of the batch: ``[K]`` (logits are computed only there)."""
    return loss_mask[:, :-1].any(0).nonzero().flatten()


def boot_bridge(model, tokenizer, name_or_path: str):
    """Wrap a loaded HF model in a TransformerLens ``TransformerBridge`` (no weight processing)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(name_or_path, hf_model=model, tokenizer=tokenizer)


def hf_param_name(bridge_name: str) -> str:
    """Bridge parameter name -> HF parameter name (drop ``._original_component`` segments)."""
    return bridge_name.replace("._original_component", "")


class HookCapture:
    """Registers the forward/backward hooks on a bridge for the targeted modules of every layer
    and feeds ``accumulate``. Use as a context manager around forward + backward of a batch."""

    def __init__(self, bridge, n_layers: int, state: GradStats, layers_prefix: str = "model.layers"):
        self.bridge, self.state = bridge, state
        self.targets = [(f"blocks.{i}.{tl}", f"{layers_prefix}.{i}.{hf}.weight")
                        for i in range(n_layers) for tl, hf in TL_TO_HF.items()]
        self.acts: dict[str, torch.Tensor] = {}
        self.token_mask = self.sample_ok = None
        self.bad = None

    def _fwd(self, hf):
        def hook(x, hook):
            self.acts[hf] = x.detach().flatten(2)  # [B, T, heads, d_head] views -> [B, T, in]
        return hook

    def _bwd(self, hf):
        def hook(g, hook):
            ok = accumulate(self.state, hf, self.acts.pop(hf), g.detach().flatten(2), self.token_mask, self.sample_ok)
            self.bad |= ~ok
        return hook

    def batch(self, token_mask: torch.Tensor, sample_ok: torch.Tensor):
        self.token_mask, self.sample_ok = token_mask, sample_ok
        self.bad = torch.zeros_like(sample_ok)
        fwd = [(f"{tl}.hook_in", self._fwd(hf)) for tl, hf in self.targets]
        bwd = [(f"{tl}.hook_out", self._bwd(hf)) for tl, hf in self.targets]
        return self.bridge.hooks(fwd_hooks=fwd, bwd_hooks=bwd)


class CollectResult(dict):
    """``{"stats": GradStats, "truncated": int, "seconds": float, "tokens_per_s": float}``."""


def collect_stats(model, tokenizer, examples, model_path: str, batch_size: int = 8, seq_len: int = 512,
                  stats=STATS, state: GradStats | None = None, start: int = 0, progress: bool = True,
                  on_batch=None) -> CollectResult:
    """Run ``examples`` through a TransformerLens bridge around ``model`` and accumulate
    per-sample gradient statistics (driver: hooks, batches and progress live here).

    Examples are processed in order of token length (stable), so batches hold similar lengths
    and little padding; ``start`` counts examples in that order. Logits are computed only at
    the positions scored in the batch (``logits_to_keep``).

    ``state`` continues an earlier accumulation (resume); ``on_batch(state, n_done)`` is called
    after every batch (checkpointing). Parameters are frozen during the run and restored after.
    """
    import time

    from tqdm.auto import tqdm

    from .quantize import target_shapes
    from .tasks import collate, tokenize_examples

    device = next(model.parameters()).device
    shapes = target_shapes(model)
    state = state if state is not None else GradStats.zeros(shapes, device, stats)
    tok = tokenize_examples(examples, tokenizer, seq_len)
    order = sorted(range(len(tok.ids)), key=lambda i: len(tok.ids[i]))  # length buckets: little padding
    bridge = boot_bridge(model, tokenizer, model_path)
    cap = HookCapture(bridge, model.config.num_hidden_layers, state)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    h_embed = embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(total=len(examples) - start, desc="scoring", unit="sample", disable=not progress)
    try:
        for b in range(start, len(examples), batch_size):
            idx = order[b:b + batch_size]
            ids, st = [tok.ids[i] for i in idx], [tok.scored_from[i] for i in idx]
            batch = collate(ids, st, pad)
            input_ids, attn, lmask = (t.to(device) for t in batch)
            with cap.batch(attn, torch.ones(len(ids), dtype=torch.bool, device=device)):
                pos = scored_positions(lmask)
                logits = bridge(input_ids, attention_mask=attn.long(), return_type="logits", logits_to_keep=pos)
                losses = sample_losses(logits, input_ids, lmask, pos)
                ok = torch.isfinite(losses)
                cap.sample_ok = ok
                if ok.any():
                    losses[ok].sum().backward()
            n_bad = int((~ok | cap.bad).sum())
            state.n_samples += len(ids) - n_bad
            state.n_skipped += n_bad
            ntok = int(attn.sum())
            state.n_tokens += ntok
            tokens += ntok
            bar.update(len(ids))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.0f} tok/s")
            if on_batch is not None:
                on_batch(state, b + len(ids))
    finally:
        bar.close()
        h_embed.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    secs = time.perf_counter() - t0
    return CollectResult(stats=state, truncated=tok.truncated, seconds=secs, tokens_per_s=tokens / max(secs, 1e-9))
