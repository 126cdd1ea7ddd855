"""Analytic FLOP count of one training step of our ReformerLM (all-LSH layers).

The count is the useful arithmetic of the model, not what a kernel happens to execute: masked
scores inside the attention window are counted (every query scores its whole window), padding
and Python overhead are not. A multiply-add is 2 FLOPs.

Shapes: L length, D d_model, H heads, E d_head, F d_ff, V vocab, R hash rounds, M chunk length,
C = 1 + n_chunks_before (+ n_chunks_after) chunks in a query's window, NB_i bucket factors.

Forward FLOPs per token and layer:
    projections   2 * D * (H*E) * 3         shared query/key, value, output
    hashing       R * H * 2 * E * sum(NB_i / 2)   rotations, one per bucket factor
    attention     R * H * 2 * (2 * C*M * E)  logits q.k and the weighted sum of values
    feed-forward  2 * 2 * D * F
Output layer per token: 2 * (2D) * V (the head reads concat(y1, y2)).

Train step = 3 x forward (forward, and backward at twice the forward) + the reversible
recompute of every layer's forward in the backward + the recompute of the chunked output
layer (the loss is checkpointed per block). So step = 4 x forward. AdamW and layer norms are
O(parameters + L*D) and left out (< 1%).
"""

from __future__ import annotations

import math


def n_bucket_factors(seq_len: int, chunk_length: int) -> tuple[int, ...]:
    """Our automatic bucket count for length L (mirrors reformer.config.resolve_n_buckets)."""
    nb = max(2, 2 * (seq_len // chunk_length))
    if nb <= 512:
        return (nb,)
    for f1 in range(math.isqrt(nb), 1, -1):
        if nb % f1 == 0 and f1 % 2 == 0 and (nb // f1) % 2 == 0:
            return (f1, nb // f1)
    return (nb,)


def layer_forward_flops(seq_len: int, *, d_model: int = 256, n_heads: int = 4,
                        d_head: int = 64, d_ff: int = 1024, n_hashes: int = 4,
                        chunk_length: int = 64, window_chunks: int = 2) -> float:
    """Forward FLOPs of one LSH attention + feed-forward layer over ``seq_len`` tokens."""
    he = n_heads * d_head
    projections = 2 * d_model * he * 3
    buckets = n_bucket_factors(seq_len, chunk_length)
    hashing = n_hashes * n_heads * 2 * d_head * sum(nb // 2 for nb in buckets)
    attention = n_hashes * n_heads * 2 * (2 * window_chunks * chunk_length * d_head)
    feed_forward = 2 * 2 * d_model * d_ff
    return float(seq_len) * (projections + hashing + attention + feed_forward)


def train_step_flops(seq_len: int, *, n_layers: int = 6, vocab_size: int = 256,
                     d_model: int = 256, **layer_kwargs: int) -> float:
    """FLOPs of forward + backward (+ recompute) of our ReformerLM over ``seq_len`` tokens."""
    layers = n_layers * layer_forward_flops(seq_len, d_model=d_model, **layer_kwargs)
    head = float(seq_len) * 2 * (2 * d_model) * vocab_size
    forward = layers + head
    return 3 * forward + layers + head
