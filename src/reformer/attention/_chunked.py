"""Shared pieces of chunked attention: masks, padding, look-around and the chunk kernel.

Both LSH attention (chunks of the bucket-sorted sequence) and local attention (chunks of the
sequence in position order) reduce to the same computation: each chunk of M queries attends to
a window of K keys gathered from itself and its neighbours, with masks that depend only on the
original positions of the query and key. This module holds that computation once.

Shapes: ``...`` any leading dims (B, H), n chunks, M queries per chunk, K keys per window,
E head size.

Decisions:
- Masks REPLACE the logit (``masked_fill``) rather than add to it, so that a masked pair has an
  exact zero gradient. Invalid keys (padding, or later positions under causality) get
  ``MASK_VALUE``; a query's own position gets ``SELF_VALUE`` (shared-QK attention only), so that
  it attends to itself only when nothing else is valid. Both values stay finite in bf16 and are
  reduced for fp16, whose largest value is 65504.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MASK_VALUE = -1e9
SELF_VALUE = -1e5


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """(invalid, self) logit values representable in ``dtype``."""
    if dtype == torch.float16:
        return -3e4, -1e4
    return MASK_VALUE, SELF_VALUE


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` up to a multiple of ``multiple``."""
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


def padded_mask(attention_mask: torch.Tensor | None, batch: int, length: int,
                padded_length: int, device: torch.device) -> torch.Tensor | None:
    """The (B, Lp) key-validity mask after padding L to Lp (None when nothing is masked)."""
    if attention_mask is None and padded_length == length:
        return None
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                         f"(B, L) = {(batch, length)}; pass one bool per token (True = real)")
    return F.pad(attention_mask.bool(), (0, padded_length - length), value=False)


def window_offsets(n_chunks: int, n_before: int, n_after: int) -> list[int]:
    """Chunk offsets of a window, each neighbour once even when the window wraps onto itself."""
    offsets = list(range(-n_before, n_after + 1))
    return offsets if len(offsets) <= n_chunks else list(range(n_chunks))


def look_around(x: torch.Tensor, offsets: list[int], dim: int, circular: bool = True,
                fill: float | int = 0) -> torch.Tensor:
    """Concatenate, for each chunk, the chunks at ``offsets`` from it.

    Args:
        x: chunked tensor, chunk index along ``dim`` and items along ``dim + 1``.
        offsets: chunk offsets, e.g. [-1, 0].
        circular: wrap around the ends; otherwise chunks beyond them are filled with ``fill``.

    Returns:
        Tensor with ``len(offsets)`` times more items along ``dim + 1``.
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    parts = []
    for d in offsets:
        if circular or d == 0:
            parts.append(x.roll(-d, dims=dim) if d else x)
            continue
        pad_shape = list(x.shape)
        pad_shape[dim] = min(abs(d), n)
        filler = x.new_full(pad_shape, fill)
        if abs(d) >= n:  # the whole neighbour lies beyond the ends
            parts.append(filler)
            continue
        shifted = x.narrow(dim, max(d, 0), n - abs(d))
        parts.append(torch.cat([filler, shifted] if d < 0 else [shifted, filler], dim=dim))
    return torch.cat(parts, dim=dim + 1)


def attend_chunks(c_q: torch.Tensor, c_k: torch.Tensor, c_v: torch.Tensor,
                  c_qpos: torch.Tensor, c_kpos: torch.Tensor, *, causal: bool,
                  key_valid: torch.Tensor | None = None, self_mask: bool = False,
                  scale: float | None = None, log_count: torch.Tensor | None = None,
                  dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each chunk's queries over its key window.

    Args:
        c_q: (..., n, M, E) queries; c_k, c_v: (..., n, K, E) keys and values of each window.
        c_qpos: (..., n, M) and c_kpos: (..., n, K) original positions, for the masks.
        causal: mask keys at later positions than the query.
        key_valid: (..., n, K) bool, False = padding key (masked).
        self_mask: give a query's own position ``SELF_VALUE`` (shared-QK attention).
        scale: logit scale, default 1 (the LSH convention).
        log_count: (..., n, M, K) log multiplicities subtracted from the logits (de-duplication).
        dropout: attention dropout on the probabilities (the caller passes 0 in eval).

    Returns:
        out (..., n, M, E) and the log-sum-exp of the logits (..., n, M).
    """
    qpos, kpos = c_qpos.unsqueeze(-1), c_kpos.unsqueeze(-2)  # (..., n, M, 1), (..., n, 1, K)
    is_self = qpos == kpos if self_mask else None  # (..., n, M, K)
    invalid = kpos > qpos if causal else None
    if key_valid is not None:
        pad = ~key_valid.unsqueeze(-2)
        invalid = pad if invalid is None else invalid | pad
    return _ChunkAttention.apply(c_q, c_k, c_v, is_self, invalid, log_count,
                                 1.0 if scale is None else scale, dropout)


class _ChunkAttention(torch.autograd.Function):
    """softmax(mask(q k^T * scale - log_count)) v and its log-sum-exp, with a hand backward.

    The forward uses the fused softmax kernel and recovers the log-sum-exp from it as
    ``max_j logit - log(max_j p)`` (exact), avoiding a second exp pass; exp of the -1e9 masked
    logits is many times slower than the fused softmax on CPU. The backward is the usual
    ``dS = P * (dP - rowsum(P * dP) + dlse)``, with no gradient through replaced (masked)
    logits. It saves the probabilities, one (n, M, K) tensor, where autograd would keep three.
    """

    @staticmethod
    def forward(ctx, q, k, v, is_self, invalid, log_count, scale, dropout):
        invalid_value, self_value = mask_values(q.dtype)
        logits = torch.matmul(q, k.transpose(-1, -2))  # (..., n, M, K)
        if scale != 1:
            logits.mul_(scale)
        if log_count is not None:
            logits.sub_(log_count)
        if is_self is not None:
            logits.masked_fill_(is_self, self_value)
        if invalid is not None:
            logits.masked_fill_(invalid, invalid_value)
        probs = torch.softmax(logits, dim=-1)
        lse = logits.amax(dim=-1).sub_(probs.amax(dim=-1).log_())  # (..., n, M)
        del logits
        keep = None
        if dropout > 0:  # the same draw as dropout_keep(probs, dropout)
            keep = torch.empty_like(probs).bernoulli_(1 - dropout).div_(1 - dropout)
        out = torch.matmul(probs if keep is None else probs * keep, v)  # (..., n, M, E)
        ctx.save_for_backward(q, k, v, probs, keep, is_self)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, probs, keep, is_self = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros(probs.shape[:-1] + v.shape[-1:], dtype=v.dtype,
                                   device=v.device)
        kept = probs if keep is None else probs * keep
        grad_v = torch.matmul(kept.transpose(-1, -2), grad_out)  # (..., n, K, E)
        del kept
        grad_p = torch.matmul(grad_out, v.transpose(-1, -2))  # (..., n, M, K)
        if keep is not None:  # through the dropout multiplier
            grad_p.mul_(keep)
        row = (grad_p * probs).sum(dim=-1, keepdim=True)  # rowsum(P * dP)
        if grad_lse is not None:
            row = row - grad_lse.unsqueeze(-1)
        grad_s = grad_p.sub_(row).mul_(probs)  # dS = P * (dP - rowsum(P dP) + dlse)
        if is_self is not None:
            grad_s.masked_fill_(is_self, 0.0)  # the self logit was replaced by a constant
        if ctx.scale != 1:
            grad_s.mul_(ctx.scale)
        grad_q = torch.matmul(grad_s, k)  # (..., n, M, E)
        grad_k = torch.matmul(grad_s.transpose(-1, -2), q)  # (..., n, K, E)
        return grad_q, grad_k, grad_v, None, None, None, None, None


def default_scale(d_head: int) -> float:
    """1/sqrt(E), the scale of attention with separate queries and keys."""
    return 1.0 / math.sqrt(d_head)
