"""Sampling from a ReformerLM, one token at a time, with per-layer caches (DESIGN.md 1.7).

The prompt runs through one full forward pass that fills every layer's cache (keys, values
and, for LSH layers, each round's (bucket, position) order under rotations fixed for the whole
decode); each new token then costs one step per layer over the window it attends to.

Exactness: a cached step of any layer equals that layer's full forward over the whole prefix
at the new position (tests/test_generation.py). For stacks of local and full layers, and for a
single LSH layer, the logits equal a full forward's. With LSH below other layers they are
close but not equal: in a full forward the chunk a past position falls into, and so its
output, can change when later tokens join its bucket, while the cache keeps the states it
computed when that position was new.

When the cache is full (``context`` positions), decoding restarts from the most recent half.
``use_cache=False`` recomputes a full forward over the last ``context`` tokens per token.

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
           context: int | None = None, generator: torch.Generator | None = None,
           use_cache: bool = True) -> Iterator[int]:
    """Yield ``max_new_tokens`` sampled token ids after ``prompt`` (L,).

    Args:
        context: how many most recent tokens the model sees (default: max_seq_len).
        use_cache: decode incrementally (default); False recomputes every step.
    """
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty; give at least one token")
    was_training = model.training
    model.eval()
    context = min(context or model.config.max_seq_len, model.config.max_seq_len)
    if context < 2:
        raise ValueError(f"context={context} must be at least 2 tokens")
    device = next(model.parameters()).device
    tokens = prompt.tolist()
    caches = None
    use_cache = use_cache and model.supports_cache()
    for _ in range(max_new_tokens):
        if not use_cache:
            window = torch.tensor(tokens[-context:], device=device)[None]  # (1, l)
            logits = model(window).logits[0, -1]
        elif caches is None or caches[0].length == caches[0].capacity:  # (re)start
            keep = context - 1 if caches is None else context // 2
            caches = model.new_cache(1, context)
            window = torch.tensor(tokens[-keep:], device=device)[None]  # (1, l)
            logits = model.prefill(window, caches)[0]
        else:
            logits = model.step(torch.tensor([tokens[-1]], device=device), caches)[0]
        token = int(torch.multinomial(filter_logits(logits, temperature, top_k, top_p).cpu(), 1,
                                      generator=generator))
        tokens.append(token)
        yield token
    model.train(was_training)
