"""The common shape of our self-attention modules: heads processed in slices.

Multi-head attention output is a sum over heads, ``out = sum_h attn_h(x) @ W_o[:, h]``, so a
layer can be computed (and, in the reversible backward, recomputed and differentiated) a few
heads at a time. Only one slice's (L x window) scores then live at once; this is how the
attention half of a reversible block is chunked (DESIGN.md 1.6).

Shapes: B batch, L length, D d_model, H heads, E d_head.

A module subclass provides ``heads_forward(x, heads, state, attention_mask)`` for one slice of
heads; ``prepare`` computes per-call state shared by all slices (LSH: the rotations and, once
computed, the buckets, which the reversible backward then replays).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from reformer.config import ReformerConfig


@dataclass
class AttentionState:
    """Per-call state of one attention layer, shared by its head slices."""

    n_hashes: int = 1
    rotations: object = None  # LSH: (H, E, R, NB/2) tensor or list of per-factor tensors
    buckets: dict[int, torch.Tensor] = field(default_factory=dict)  # head-slice start -> ids


class HeadSlicedAttention(nn.Module):
    """Base class: projections in and out, and the sum over head slices."""

    def __init__(self, config: ReformerConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.w_o = nn.Linear(config.n_heads * config.d_head, config.d_model, bias=False)

    def head_slices(self) -> list[slice]:
        step = self.config.attn_head_chunk_size
        return [slice(h, min(h + step, self.n_heads)) for h in range(0, self.n_heads, step)]

    def prepare(self, x: torch.Tensor, n_hashes: int | None = None) -> AttentionState:
        return AttentionState()

    def project(self, linear: nn.Linear, x: torch.Tensor, heads: slice) -> torch.Tensor:
        """(B, L, D) -> (B, h, L, E) for the heads in ``heads``."""
        E = self.d_head
        w = linear.weight[heads.start * E:heads.stop * E]  # (h*E, D)
        B, L, _ = x.shape
        return torch.matmul(x, w.t()).view(B, L, -1, E).transpose(1, 2)  # (B, h, L, E)

    def merge(self, out: torch.Tensor, heads: slice) -> torch.Tensor:
        """(B, h, L, E) -> this slice's contribution (B, L, D) through W_o."""
        E = self.d_head
        B, h, L, _ = out.shape
        w = self.w_o.weight[:, heads.start * E:heads.stop * E]  # (D, h*E)
        return torch.matmul(out.transpose(1, 2).reshape(B, L, h * E), w.t())  # (B, L, D)

    def attention_dropout(self) -> float:
        return self.config.attention_dropout if self.training else 0.0

    def heads_forward(self, x: torch.Tensor, heads: slice, state: AttentionState,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                n_hashes: int | None = None, *, state: AttentionState | None = None,
                heads: slice | None = None) -> torch.Tensor:
        """Self-attention of ``x`` (B, L, D) -> (B, L, D).

        Args:
            attention_mask: (B, L) bool, True = real token.
            n_hashes: LSH rounds for this call.
            state: reuse a prepared state (recorded rotations and buckets).
            heads: compute only this slice of heads' contribution.
        """
        state = self.prepare(x, n_hashes) if state is None else state
        if heads is not None:
            return self.heads_forward(x, heads, state, attention_mask)
        out = None
        for heads in self.head_slices():
            part = self.heads_forward(x, heads, state, attention_mask)
            out = part if out is None else out + part
        return out
