"""Evaluation metrics (pure where possible). Held-out perplexity for now; task metrics, KL to the
reference, top-1 agreement and flips belong here too."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def mean_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8,
             device: str | torch.device | None = None) -> float:
    """Mean next-token negative log-likelihood (nats) over all predicted tokens of ``windows``
    (``[k, L]`` token ids); ``exp`` of it is the perplexity."""
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, windows.shape[0], batch_size):
        ids = windows[b:b + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return total / max(count, 1)


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, device=None) -> float:
    return math.exp(mean_nll(model, windows, batch_size, device))
