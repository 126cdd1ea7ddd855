"""The common shape of our self-attention modules: heads processed in slices.

Multi-head attention output is a sum over heads, ``out = sum_h attn_h(x) @ W_o[:, h]``, so a
layer can be computed (and, in the reversible backward, recomputed and differentiated) a few
heads at a time. Only one slice's (L x window) scores then live at once; this is how the
attention half of a reversible block is chunked (DESIGN.md 1.6).

Shapes: B batch, L length, D d_model, H heads, E d_head.

A module subclass names its input projections (``projections``: W_qk, W_v for shared-QK
attention; W_q, W_k, W_v otherwise) and provides ``core(projected, heads, state,
attention_mask)``, the attention of one slice of heads given their projected inputs; the base
class applies the projections and W_o. The reversible stack does the same pieces by hand so
that nothing (L, D)-sized is built per head. ``prepare`` computes per-call state shared by all
slices (LSH: the rotations and, once computed, the buckets, which the reversible backward then
replays).

Incremental decoding (DESIGN.md 1.7): ``new_cache`` / ``fill_cache`` / ``step`` keep the keys
and values of past positions in a :class:`LayerCache`, so that one new position costs work
proportional to the window it attends to. Subclasses provide ``cache_entries`` (what to store)
and ``attend_cached`` (the new position's attention); causal models only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from reformer._dropout import AttentionDropout, draw_seed
from reformer.attention._chunked import window_offsets
from reformer.config import ReformerConfig, check_positive_int


def key_offset(config: ReformerConfig) -> float:
    """c in the shared-QK keys ``q / sqrt(|q|^2 + c)``: Hugging Face's E * 1e-6 under
    ``hf_compat``, else 0 (unit keys, DESIGN.md 1.2)."""
    return config.d_head * 1e-6 if config.hf_compat else 0.0


def window(config: ReformerConfig, n_chunks: int, before: int, after: int) -> list[int]:
    """A window's chunk offsets over ``n_chunks`` chunks: each chunk once
    (``window_offsets``), or under ``hf_compat`` Hugging Face's look-around, which rolls the
    chunks by each offset and leaves them in place for an offset of n_chunks or more (so a
    window wider than the sequence holds the chunk itself several times)."""
    if config.hf_compat:
        return [o if -n_chunks < o < n_chunks else 0 for o in range(-before, after + 1)]
    return window_offsets(n_chunks, before, after)


def consecutive(offsets: list[int]) -> bool:
    """Whether ``offsets`` are distinct and consecutive, as the blockwise LSH kernel and the
    FlexAttention band need (``window`` gives others only under ``hf_compat``)."""
    return offsets == list(range(offsets[0], offsets[0] + len(offsets)))


@dataclass
class AttentionState:
    """Per-call state of one attention layer, shared by its head slices."""

    n_hashes: int = 1
    rotations: object = None  # LSH: (H, E, R, NB/2) tensor or list of per-factor tensors
    buckets: dict[int, torch.Tensor] = field(default_factory=dict)  # head-slice start -> ids
    dropout_seed: int | None = None  # attention dropout's mask key (reformer._dropout)


@dataclass
class LayerCache:
    """Past positions of one attention layer, for decoding one token at a time.

    Shapes: B batch, H heads, C capacity (positions), E d_head, R rounds.
    """

    keys: torch.Tensor  # (B, H, C, E): unit keys for shared-QK layers
    values: torch.Tensor  # (B, H, C, E)
    length: int = 0  # positions filled
    rotations: object = None  # LSH: fixed for the whole decode
    sorted_keys: torch.Tensor | None = None  # LSH: (B, H, R, length) bucket * C + position
    newest_rank: torch.Tensor | None = None  # LSH: (B, H, R) the newest position's place in it

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


class HeadSlicedAttention(nn.Module):
    """Base class: projections in and out, and the sum over head slices."""

    def __init__(self, config: ReformerConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.w_o = nn.Linear(config.n_heads * config.d_head, config.d_model, bias=False)

    def head_slices(self, multiple: int = 1, size: int | None = None) -> list[slice]:
        """Slices of ``size`` heads (default ``attn_head_chunk_size``), rounded up to a
        multiple of ``multiple`` (under sequence parallelism each of P processes attends with
        1/P of every slice)."""
        step = -(-(size or self.config.attn_head_chunk_size) // multiple) * multiple
        return [slice(h, min(h + step, self.n_heads)) for h in range(0, self.n_heads, step)]

    def prepare(self, x: torch.Tensor, n_hashes: int | None = None,
                length: int | None = None) -> AttentionState:
        """Per-call state; ``length``: the whole sequence's, when x is one process's slice of
        it (sequence parallelism), else x's own."""
        return AttentionState()

    def project(self, linear: nn.Linear, x: torch.Tensor, heads: slice) -> torch.Tensor:
        """(B, L, D) -> (B, h, L, E) for the heads in ``heads``."""
        E = self.d_head
        w = linear.weight[heads.start * E:heads.stop * E]  # (h*E, D)
        B, L, _ = x.shape
        return F.linear(x, w).view(B, L, -1, E).transpose(1, 2)  # (B, h, L, E)

    def merge(self, out: torch.Tensor, heads: slice) -> torch.Tensor:
        """(B, h, L, E) -> this slice's contribution (B, L, D) through W_o."""
        E = self.d_head
        B, h, L, _ = out.shape
        w = self.w_o.weight[:, heads.start * E:heads.stop * E]  # (D, h*E)
        return F.linear(out.transpose(1, 2).reshape(B, L, h * E), w)  # (B, L, D)

    def attention_dropout(self) -> float:
        return self.config.attention_dropout if self.training else 0.0

    def with_dropout_seed(self, state: AttentionState) -> AttentionState:
        """``state`` with this call's attention-dropout seed drawn (in training, p > 0): when
        the layer starts, so that every head slice, process and recomputation shares it."""
        if self.attention_dropout() > 0:
            state.dropout_seed = draw_seed()
        return state

    def dropout_for(self, state: AttentionState, batch: int, heads: slice,
                    device: torch.device) -> AttentionDropout | None:
        """The attention-dropout masks of ``heads`` in this call (None in eval or at p = 0),
        keyed by the state's seed (drawn now for a state that has none)."""
        p = self.attention_dropout()
        if p <= 0:
            return None
        if state.dropout_seed is None:
            state.dropout_seed = draw_seed()
        return AttentionDropout.heads(p, state.dropout_seed, batch, heads, self.n_heads, device)

    def projections(self) -> list[nn.Linear]:
        """The input projections, in the order ``core`` takes their outputs."""
        raise NotImplementedError

    def core(self, projected: list[torch.Tensor], heads: slice, state: AttentionState,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the heads in ``heads`` from their projected inputs, each (B, h, L, E),
        -> (B, h, L, E), before W_o."""
        raise NotImplementedError

    def heads_forward(self, x: torch.Tensor, heads: slice, state: AttentionState,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One slice of heads' contribution (B, L, D) to the attention of ``x`` (B, L, D)."""
        projected = [self.project(w, x, heads) for w in self.projections()]
        return self.merge(self.core(projected, heads, state, attention_mask), heads)

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
        self.check_input(x, attention_mask, n_hashes)
        state = self.with_dropout_seed(self.prepare(x, n_hashes)) if state is None else state
        if heads is not None:
            return self.heads_forward(x, heads, state, attention_mask)
        out = None
        for heads in self.head_slices():
            part = self.heads_forward(x, heads, state, attention_mask)
            out = part if out is None else out + part
        return out

    def check_input(self, x: torch.Tensor, attention_mask: torch.Tensor | None,
                    n_hashes: int | None) -> None:
        """A ValueError naming the mistake unless x is (B, L, D) with B, L >= 1, the mask
        (B, L) and n_hashes None or a positive integer."""
        D = self.config.d_model
        if x.dim() != 3 or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] != D:
            raise ValueError(f"x has shape {tuple(x.shape)}; it must be (batch, length, "
                             f"d_model={D}) with batch and length at least 1")
        if attention_mask is not None and attention_mask.shape != x.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but x "
                             f"has {tuple(x.shape)}; pass one (batch, length) mask")
        if n_hashes is not None:
            check_positive_int("n_hashes", n_hashes)

    # ------------------------------------------------------------------ incremental decoding
    def cache_entries(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, L, D) -> query, key to store, value, each (B, H, L, E)."""
        raise NotImplementedError

    def attend_cached(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Attention of the newest position (query (B, H, 1, E)) over the cache -> (B, H, 1, E)."""
        raise NotImplementedError

    def index_cache(self, q: torch.Tensor, cache: LayerCache, start: int) -> None:
        """Extra bookkeeping for positions start.. of the cache (LSH: their buckets)."""

    def new_cache(self, batch: int, capacity: int, device: torch.device,
                  dtype: torch.dtype) -> LayerCache:
        if not self.config.causal:
            raise ValueError("incremental decoding needs a causal model (causal=True): a "
                             "bidirectional layer's past outputs change with every new token")
        shape = (batch, self.n_heads, capacity, self.d_head)
        return LayerCache(keys=torch.zeros(shape, device=device, dtype=dtype),
                          values=torch.zeros(shape, device=device, dtype=dtype))

    def fill_cache(self, x: torch.Tensor, cache: LayerCache) -> None:
        """Store positions 0..L-1 from this layer's input x (B, L, D) (the prompt)."""
        L = x.shape[1]
        if L > cache.capacity:
            raise ValueError(f"the prompt has {L} tokens, more than the cache's capacity "
                             f"{cache.capacity}; allocate a larger cache")
        q, k, v = self.cache_entries(x)
        cache.keys[:, :, :L], cache.values[:, :, :L] = k, v
        cache.length = L
        self.index_cache(q, cache, 0)

    def step(self, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Add one position x (B, 1, D) to the cache; return its attention output (B, 1, D)."""
        t = cache.length
        if t >= cache.capacity:
            raise ValueError(f"the cache is full ({cache.capacity} positions); allocate a "
                             "larger cache or restart from the most recent tokens")
        q, k, v = self.cache_entries(x)
        cache.keys[:, :, t:t + 1], cache.values[:, :, t:t + 1] = k, v
        cache.length = t + 1
        self.index_cache(q, cache, t)
        return self.merge(self.attend_cached(q, cache), slice(0, self.n_heads))
