"""Sampling from a ReformerLM.

This first version recomputes the forward pass over the last ``context`` tokens for every new
token (no cache): simple and exact. The per-layer cache of DESIGN.md 1.7 replaces it later.

Shapes: L prompt length, V vocab size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from reformer.model import ReformerLM


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Temperature, top-k and nucleus (top-p) filtering of (V,) logits -> probabilities."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0; pass e.g. 0.8")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set with mass >= p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum()
    return probs


@torch.no_grad()
def sample(model: ReformerLM, prompt: torch.Tensor, max_new_tokens: int, *,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           context: int | None = None, generator: torch.Generator | None = None
           ) -> Iterator[int]:
    """Yield ``max_new_tokens`` sampled token ids after ``prompt`` (L,).

    Args:
        context: how many most recent tokens the model sees (default: max_seq_len).
    """
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty; give at least one token")
    was_training = model.training
    model.eval()
    context = min(context or model.config.max_seq_len, model.config.max_seq_len)
    device = next(model.parameters()).device
    tokens = prompt.tolist()
    for _ in range(max_new_tokens):
        window = torch.tensor(tokens[-context:], device=device)[None]  # (1, l)
        probs = filter_logits(model(window).logits[0, -1], temperature, top_k, top_p)
        token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        tokens.append(token)
        yield token
    model.train(was_training)
