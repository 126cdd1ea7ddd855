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

A cached step of one sequence is microseconds of work per op, and runs on one intra-op
thread (``_threads.one_thread_if_small``): with two, a busy machine made every op wait for the
descheduled second thread (8.1 against 378 tokens/s), for 5% gained on an idle one.

Shapes: L prompt length, V vocab size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from reformer._threads import one_thread_if_small
from reformer.config import ReformerConfig, is_int, is_real
from reformer.model import ReformerLM


def check_filters(temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> None:
    """A ValueError naming the value unless temperature, top_k and top_p are usable."""
    if not is_real(temperature) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0; pass e.g. "
                         "0.8 (lower is more conservative)")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer (how many of the most "
                         "likely tokens to keep); pass e.g. 40, or None to keep all")
    if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must lie in (0, 1] (the probability mass to keep); "
                         "pass e.g. 0.9, or None to keep all")


def check_sampling(config: ReformerConfig, max_new_tokens: int, *, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None,
                   context: int | None = None) -> int:
    """Validate :func:`sample`'s arguments for a model with ``config``; returns the context.

    Callers that print before sampling (the command line) call it first, so that a mistake
    is reported before anything else.
    """
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0; pass "
                         "e.g. 500")
    check_filters(temperature, top_k, top_p)
    if context is None:
        context = config.max_seq_len
    if not is_int(context) or not 2 <= context <= config.max_seq_len:
        raise ValueError(f"context={context!r} must lie in [2, {config.max_seq_len}] (at least "
                         "2 tokens, at most the model's max_seq_len); pass e.g. "
                         f"{config.max_seq_len}, or None for max_seq_len")
    return context


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Temperature, top-k and nucleus (top-p) filtering of (V,) logits -> probabilities."""
    check_filters(temperature, top_k, top_p)
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


def sample(model: ReformerLM, prompt: torch.Tensor, max_new_tokens: int, *,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           context: int | None = None, generator: torch.Generator | None = None,
           use_cache: bool = True) -> Iterator[int]:
    """Yield ``max_new_tokens`` sampled token ids after ``prompt`` (L,).

    The arguments are checked when it is called (see :func:`check_sampling`), not when the
    first token is drawn.

    Args:
        context: how many most recent tokens the model sees, 2..max_seq_len (default:
            max_seq_len).
        use_cache: decode incrementally (default); False recomputes every step.
    """
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty; give at least one token")
    context = check_sampling(model.config, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, context=context)
    return _sample(model, prompt.tolist(), max_new_tokens, temperature, top_k, top_p, context,
                   generator, use_cache and model.supports_cache())


@torch.no_grad()
def _sample(model: ReformerLM, tokens: list[int], max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, context: int,
            generator: torch.Generator | None, use_cache: bool) -> Iterator[int]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    step_flops = 2 * sum(p.numel() for p in model.parameters())  # per token, attention aside
    caches = None
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
            with one_thread_if_small(step_flops):
                logits = model.step(torch.tensor([tokens[-1]], device=device), caches)[0]
        token = int(torch.multinomial(filter_logits(logits, temperature, top_k, top_p).cpu(), 1,
                                      generator=generator))
        tokens.append(token)
        yield token
    model.train(was_training)
