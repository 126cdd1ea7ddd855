"""Position-wise layers: the feed-forward network, positional embeddings, row chunking.

The feed-forward layer (Reformer section 4, "Chunking") is independent across positions, so it
is computed over blocks of ``ff_chunk_size`` positions: no (L, d_ff) activation ever exists at
once. Axial positional embeddings (section 5, ImageNet/enwik8 setups) factor a table for
L = L1 * L2 (* L3 ...) positions into small per-axis tables (L_k, d_k) with sum(d_k) = D.

Shapes: B batch, L length, D d_model, F d_ff, N = B*L rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reformer import _native
from reformer._dropout import PositionDropout, drop_rows
from reformer.config import ReformerConfig


def row_chunks(n_rows: int, chunk: int) -> list[slice]:
    """Slices that cover ``range(n_rows)`` in blocks of at most ``chunk``."""
    return [slice(s, min(s + chunk, n_rows)) for s in range(0, n_rows, chunk)]


def dropout_keep(like: torch.Tensor, p: float) -> torch.Tensor | None:
    """A dropout multiplier (0 or 1/(1-p)) shaped like ``like``, or None when p == 0.

    Drawn explicitly, rather than by F.dropout, where one mask must be applied piecewise (to
    the head slices of an attention output) and redrawn identically in the backward.
    """
    if p <= 0:
        return None
    return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)


class FeedForward(nn.Module):
    """Linear(D -> F) -> activation -> dropout -> Linear(F -> D) -> dropout."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.w_in = nn.Linear(config.d_model, config.d_ff)
        self.w_out = nn.Linear(config.d_ff, config.d_model)
        self.relu = config.ff_activation == "relu"  # else gelu
        self.dropout = config.dropout

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The activation; relu overwrites ``pre`` (a fresh linear output: nothing else reads
        it, and autograd differentiates relu from its output)."""
        return pre.relu_() if self.relu else F.gelu(pre)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """activation(x W_in^T + b_in), (..., F). Without autograd (the reversible stack's
        forward and recomputation) a ReLU takes the bias in its own pass (csrc/ on CPU), not
        as addmm's copy of it into the output."""
        if not self.relu or torch.is_grad_enabled():
            return self.activate(self.w_in(x))
        pre = F.linear(x, self.w_in.weight)
        fused = _native.op("bias_relu_", pre, (torch.float32, torch.bfloat16))
        if fused is None:
            return pre.add_(self.w_in.bias).relu_()
        return fused(pre, self.w_in.bias)

    def forward(self, x: torch.Tensor, drops: tuple[PositionDropout, PositionDropout] = (),
                rows: slice | None = None) -> torch.Tensor:
        """(N, D) -> (N, D). ``drops``: the dropout masks of the activation and of the output
        (rate ``self.dropout``, keyed by position: reformer.reversible's halves draw them),
        applied to x's rows as the flat rows ``rows`` of their (B*L, .) grid; () for none."""
        h = self.hidden(x)  # (N, F)
        if drops:
            h = drop_rows(drops[0], h, rows)
        out = self.w_out(h)
        return drop_rows(drops[1], out, rows) if drops else out


class AxialPositionalEmbedding(nn.Module):
    """Axial positions: position p has coordinates (p // (L2*L3..), ..., p % L_last).

    Its embedding is the concatenation of one row per axis, ``concat_k W_k[coord_k]``, which
    costs sum(L_k * d_k) parameters instead of L * D.
    """

    def __init__(self, shape: tuple[int, ...], dims: tuple[int, ...], init_std: float) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(n, d) * init_std) for n, d in zip(shape, dims, strict=True))

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        """Embeddings of positions offset..offset+length-1, (L, D)."""
        if offset + length > math.prod(self.shape):
            raise ValueError(f"sequence length {offset + length} exceeds the "
                             f"{math.prod(self.shape)} positions of axial_pos_shape="
                             f"{self.shape}; use a larger axial_pos_shape (and max_seq_len) or "
                             "a shorter sequence")
        pos = torch.arange(offset, offset + length, device=self.weights[0].device)
        parts, stride = [], math.prod(self.shape)
        for n, w in zip(self.shape, self.weights, strict=True):
            stride //= n
            parts.append(F.embedding((pos // stride) % n, w))  # (L, d_k); its backward
            # sums rows 3x faster than indexing's (index_put_ with accumulate) on CPU
        return torch.cat(parts, dim=-1)  # (L, D)


class LearnedPositionalEmbedding(nn.Module):
    """One learned vector per absolute position."""

    def __init__(self, max_seq_len: int, d_model: int, init_std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_seq_len, d_model) * init_std)

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        return self.weight[offset:offset + length]  # (L, D)


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed positions (Vaswani et al. 2017): ``PE[p, 2i] = sin(p w_i)``,
    ``PE[p, 2i+1] = cos(p w_i)``, ``w_i = 10000^(-2i/D)``; no parameters.

    Any position's row is a fixed rotation of position 0's, frequency by frequency, so a
    linear map of PE[p] gives PE[p + c] or PE[c - p] for a constant c: attention can find a
    position at a fixed offset or reflection from its own exactly, which learned rows must
    each learn (the reversal benchmark, docs/encoder-decoder.md). Computed in float64 and
    cast, so rows are the same at any offset (sequence parallelism, decoding).
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model  # even (ReformerConfig checks)
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # device and dtype

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        """Embeddings of positions offset..offset+length-1, (L, D)."""
        device = self.anchor.device
        pos = torch.arange(offset, offset + length, device=device, dtype=torch.float64)
        freqs = 10000.0 ** (-torch.arange(0, self.d_model, 2, device=device,
                                          dtype=torch.float64) / self.d_model)
        angles = pos[:, None] * freqs  # (L, D/2)
        out = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (L, D)
        return out.to(self.anchor.dtype)


def positional_embedding(config: ReformerConfig) -> nn.Module | None:
    """The positional embedding module that ``config.pos_embedding`` names (None for "none")."""
    if config.pos_embedding == "axial":
        return AxialPositionalEmbedding(config.axial_pos_shape, config.axial_pos_dims,
                                        config.init_std)
    if config.pos_embedding == "learned":
        return LearnedPositionalEmbedding(config.max_seq_len, config.d_model, config.init_std)
    if config.pos_embedding == "sinusoidal":
        return SinusoidalPositionalEmbedding(config.d_model)
    return None
