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

Batches (:func:`sample_batch`): several prompts, several samples of each, decoded together.
Sequence k (sample j of prompt i, k = i * n_per_prompt + j) draws its tokens from its own
``torch.Generator`` seeded with ``seed + k``, so it draws what it would draw alone::

    torch.manual_seed(seed)  # LSH rotations of a model without hash_seed
    sample(model, prompts[i], n, generator=torch.Generator().manual_seed(seed + k))

The caches keep one length for the whole batch (``LayerCache.length``), so the sequences are
grouped by the length they decode at, ``min(L, context - 1)`` with the cache (the prefill
keeps at most context - 1 tokens; from there all of a group grow, and restart, together) or
``min(L, context)`` without it; each group is one batch, with one ``step`` per token for all
its sequences, and runs with the global RNG seeded with ``seed`` (forked: the caller's is left
as it was), which is where a model without ``hash_seed`` draws its rotations, at each cache
(re)start or, without the cache, at each forward. The logits of a batch equal those of each
sequence alone up to rounding (batched products add in another order, ~1e-16 in float64,
~1e-7 in float32); the sampling itself is done row by row as :func:`sample` does it, so the
tokens are the same unless a draw falls within that rounding of a boundary between two tokens.

A cached step of one sequence is microseconds of work per op, and runs on one intra-op
thread (``_threads.one_thread_if_small``): with two, a busy machine made every op wait for the
descheduled second thread (8.1 against 378 tokens/s), for 5% gained on an idle one.

Shapes: B sequences decoded together, L prompt length, V vocab size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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
    steps = _decode(model, [prompt.tolist()], max_new_tokens, (temperature, top_k, top_p),
                    context, [generator], use_cache and model.supports_cache())
    return (tokens[0] for tokens in steps)


def sample_batch(model: ReformerLM, prompts: Sequence[torch.Tensor], max_new_tokens: int, *,
                 n_per_prompt: int = 1, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, context: int | None = None, seed: int = 0,
                 use_cache: bool = True) -> list[list[int]]:
    """``n_per_prompt`` samples of ``max_new_tokens`` tokens after each of ``prompts``, decoded
    in batches (one per decoding length; see the module docstring).

    Args:
        prompts: token ids, one (L,) tensor per prompt; the lengths may differ.
        n_per_prompt: samples of each prompt, >= 1.
        context, use_cache: as in :func:`sample`.
        seed: sequence k draws from ``torch.Generator().manual_seed(seed + k)``; the global
            RNG (LSH rotations without ``hash_seed``) is seeded with ``seed`` for each batch.

    Returns:
        len(prompts) * n_per_prompt lists of token ids; sample j of prompt i at
        i * n_per_prompt + j. Each equals ``list(sample(...))`` called as the module docstring
        shows.
    """
    rows = _check_batch(prompts, n_per_prompt, seed)
    context = check_sampling(model.config, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, context=context)
    use_cache = use_cache and model.supports_cache()
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in rows]
    for group in _length_groups(rows, context, use_cache):
        with _global_rng_seeded(seed, device):
            generators = [torch.Generator().manual_seed(seed + k) for k in group]
            steps = _decode(model, [list(rows[k]) for k in group], max_new_tokens,
                            (temperature, top_k, top_p), context, generators, use_cache)
            for tokens in steps:
                for k, token in zip(group, tokens, strict=True):
                    out[k].append(token)
    return out


def _check_batch(prompts: Sequence[torch.Tensor], n_per_prompt: int,
                 seed: int) -> list[list[int]]:
    """The batch's sequences as id lists, prompt-major; a ValueError naming a bad argument."""
    if not is_int(n_per_prompt) or n_per_prompt < 1:
        raise ValueError(f"n_per_prompt={n_per_prompt!r} must be an integer >= 1 (samples of "
                         "each prompt); pass e.g. 4")
    if not is_int(seed):
        raise ValueError(f"seed={seed!r} must be an integer; pass e.g. 0")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt, a (L,) tensor of token ids")
    rows = []
    for i, prompt in enumerate(prompts):
        prompt = torch.as_tensor(prompt)
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError(f"prompts[{i}] has shape {tuple(prompt.shape)}; each prompt must "
                             "be a (L,) tensor of token ids with L >= 1")
        rows += [prompt.tolist()] * n_per_prompt
    return rows


def _length_groups(rows: list[list[int]], context: int, use_cache: bool) -> list[list[int]]:
    """Indices of ``rows`` grouped by the length they decode at (see the module docstring)."""
    longest = context - 1 if use_cache else context
    groups: dict[int, list[int]] = {}
    for k, row in enumerate(rows):
        groups.setdefault(min(len(row), longest), []).append(k)
    return list(groups.values())


@contextmanager
def _global_rng_seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the global RNG seeded with ``seed``; restore it afterwards."""
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def _decode(model: ReformerLM, rows: list[list[int]], max_new_tokens: int,
            filters: tuple[float, int | None, float | None], context: int,
            generators: list[torch.Generator | None], use_cache: bool) -> Iterator[list[int]]:
    """Yield one sampled token per row, ``max_new_tokens`` times, appending each to its row.

    The rows decode as one batch, so they must all decode at one length (``_length_groups``):
    the same ``min(len(row), context - 1)`` with the cache, ``min(len(row), context)`` without.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    step_flops = 2 * len(rows) * sum(p.numel() for p in model.parameters())  # attention aside
    caches = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(_last(rows, context, device)).logits[:, -1]
        elif caches is None or caches[0].length == caches[0].capacity:  # (re)start
            keep = context - 1 if caches is None else context // 2
            caches = model.new_cache(len(rows), context)
            logits = model.prefill(_last(rows, keep, device), caches)
        else:
            last = torch.tensor([row[-1] for row in rows], device=device)  # (B,)
            with one_thread_if_small(step_flops):
                logits = model.step(last, caches)
        tokens = _draw(logits, filters, generators)
        for row, token in zip(rows, tokens, strict=True):
            row.append(token)
        yield tokens
    model.train(was_training)


def _last(rows: list[list[int]], n: int, device: torch.device) -> torch.Tensor:
    """The last ``n`` tokens of each row (all as long) -> (B, l)."""
    return torch.tensor([row[-n:] for row in rows], device=device)


def _draw(logits: torch.Tensor, filters: tuple[float, int | None, float | None],
          generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of (B, V) logits, each from its own generator. Row by row, as one
    sequence alone is sampled: a batched filter can round its sums differently."""
    probs = torch.stack([filter_logits(row, *filters) for row in logits]).cpu()  # (B, V)
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, generators,
                                                                         strict=True)]
