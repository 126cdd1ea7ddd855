"""Local (chunked, position-ordered) self-attention.

The sequence is cut into chunks of ``local_chunk_length`` positions; each chunk attends to
itself, ``n_chunks_before`` earlier chunks and ``n_chunks_after`` later ones (or the
``local_n_chunks_*`` settings). Unlike LSH attention the window does not wrap around: chunks
beyond the ends of the sequence are masked; under ``hf_compat`` it does, as Hugging Face's
look-around does (the first chunk sees the last; a window wider than the sequence repeats
chunks), which changes bidirectional models only (causality masks the wrapped keys).
Queries, keys and values have separate projections and logits are scaled by 1/sqrt(E), as in
a standard Transformer; there is no self mask.

Shapes: B batch, H heads, G = B*H, L length (padded to Lp), E d_head, M chunk length,
n = Lp/M chunks, K = (before + 1 + after) * M window keys. Prefix ``c_``: chunked.
"""

from __future__ import annotations

import torch
from torch import nn

from reformer._dropout import AttentionDropout
from reformer.attention import _banded
from reformer.attention._chunked import (
    chunk_window_attention,
    default_scale,
    pad_to_multiple,
    padded_mask,
)
from reformer.attention.base import (
    AttentionState,
    HeadSlicedAttention,
    LayerCache,
    consecutive,
    window,
)
from reformer.config import ReformerConfig
from reformer.plan import plan_for


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_length: int,
                    n_chunks_before: int = 1, n_chunks_after: int = 0, causal: bool = True,
                    attention_mask: torch.Tensor | None = None,
                    dropout: float | AttentionDropout = 0.0, circular: bool = False,
                    offsets: list[int] | None = None) -> torch.Tensor:
    """Chunked local attention.

    Args:
        q, k, v: (B, H, L, E).
        chunk_length: M positions per chunk.
        n_chunks_before, n_chunks_after: neighbour chunks in the window (no wrap-around).
        causal: mask keys at later positions.
        attention_mask: (B, L) bool, True = real token.
        dropout: attention dropout (0 in eval): a probability, or the layer's keyed masks.
        circular: windows wrap around the ends (Hugging Face's).
        offsets: the window's chunk offsets (default -n_chunks_before..n_chunks_after).

    Returns:
        (B, H, L, E).
    """
    B, H, L, E = q.shape
    M = chunk_length
    Lp = L + (-L % M)
    G, n = B * H, Lp // M
    mask = padded_mask(attention_mask, B, L, Lp, q.device)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # (B, H, L, E) -> (G, n, M, E)
        return pad_to_multiple(x, M, 2).reshape(G, n, M, E)

    c_pos = torch.arange(Lp, device=q.device).view(1, n, M)  # the same for every sequence
    c_valid = None if mask is None else mask[:, None].expand(B, H, Lp).reshape(G, n, M)
    out, _ = chunk_window_attention(
        chunked(q), chunked(k), chunked(v), c_pos,
        offsets=offsets or list(range(-n_chunks_before, n_chunks_after + 1)), circular=circular,
        causal=causal, c_valid=c_valid, scale=default_scale(E), dropout=dropout)
    out = out.view(B, H, Lp, E)
    return out if Lp == L else out[:, :, :L]  # a full slice would copy in the backward


def _local_banded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ReformerConfig,
                  attention_mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`local_attention` on the cuda plan: one banded call (attention/_banded.py)."""
    B, H, L, E = q.shape
    M = cfg.local_chunk_length
    Lp = L + (-L % M)
    mask = padded_mask(attention_mask, B, L, Lp, q.device)
    valid = None if mask is None else mask[:, None].expand(B, H, Lp)
    q, k, v = (pad_to_multiple(t, M, 2) for t in (q, k, v))
    before, after = cfg.local_neighbours()
    out, _ = _banded.attend(q, k, v, torch.arange(Lp, device=q.device), valid, chunk_length=M,
                            offsets=list(range(-before, after + 1)), circular=cfg.hf_compat,
                            causal=cfg.causal, self_mask=False, scale=default_scale(E))
    return out if Lp == L else out[:, :, :L]


class LocalSelfAttention(HeadSlicedAttention):
    """Multi-head local attention with separate W_q, W_k, W_v."""

    def __init__(self, config: ReformerConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
        inner = config.n_heads * config.d_head
        self.w_q = nn.Linear(config.d_model, inner, bias=False)
        self.w_k = nn.Linear(config.d_model, inner, bias=False)
        self.w_v = nn.Linear(config.d_model, inner, bias=False)

    def projections(self) -> list[nn.Linear]:
        return [self.w_q, self.w_k, self.w_v]

    def core(self, projected: list[torch.Tensor], heads: slice, state: AttentionState,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        dropout = self.dropout_for(state, projected[0].shape[0], heads, projected[0].device)
        n = -(-projected[0].shape[2] // cfg.local_chunk_length)
        before, after = cfg.local_neighbours()
        offsets = window(cfg, n, before, after) if cfg.hf_compat else None
        # repeated chunks (hf_compat, a window wider than the sequence) stay blockwise
        if (plan_for(projected[0].device).banded and dropout is None
                and (offsets is None or consecutive(offsets))):
            return _local_banded(*projected, cfg, attention_mask)
        return local_attention(*projected, chunk_length=cfg.local_chunk_length,
                               n_chunks_before=before, n_chunks_after=after,
                               causal=cfg.causal, attention_mask=attention_mask,
                               dropout=dropout, circular=cfg.hf_compat, offsets=offsets)

    def cache_entries(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        heads = slice(0, self.n_heads)
        return (self.project(self.w_q, x, heads), self.project(self.w_k, x, heads),
                self.project(self.w_v, x, heads))

    def attend_cached(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        t, M = cache.length - 1, self.config.local_chunk_length
        start = max(0, (t // M - self.config.local_neighbours()[0]) * M)  # the window's first key
        keys, values = cache.keys[:, :, start:t + 1], cache.values[:, :, start:t + 1]
        logits = torch.matmul(q, keys.transpose(-1, -2)) * default_scale(self.d_head)
        return torch.matmul(torch.softmax(logits, dim=-1), values)  # (B, H, 1, E)
