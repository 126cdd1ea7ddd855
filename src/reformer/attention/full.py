"""Exact (full) shared-QK attention, with the LSH layer's conventions.

Used for short sequences, to evaluate an LSH-trained model with exact attention, and as the
reference that LSH attention converges to as its windows grow: queries and keys share a
projection, keys are unit-normalised, there is no 1/sqrt(E), a query's own position gets -1e5
and padding / later positions (causal) -1e9.

Shapes: B batch, H heads, L length, E d_head, Q query block.

Decision: the masks go to ``scaled_dot_product_attention`` as an additive bias built for one
block of Q queries at a time, so that no (L, L) bias exists for long inputs. Adding -1e5 / -1e9
instead of replacing the logit gives the same probabilities: |q . k_hat| <= |q| is tiny next
to these values, and a row whose only unmasked key is the query itself puts all its weight on
it either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reformer._dropout import AttentionDropout
from reformer.attention import _banded
from reformer.attention._chunked import mask_values, padded_mask, unit_keys
from reformer.attention.base import AttentionState, HeadSlicedAttention, LayerCache, key_offset
from reformer.config import ReformerConfig

_BIAS_ELEMENTS = 1 << 24  # largest (Q, L) bias block


def full_attention(qk: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                   attention_mask: torch.Tensor | None = None,
                   dropout: float | AttentionDropout = 0.0,
                   key_offset: float = 0.0) -> torch.Tensor:
    """Exact shared-QK attention.

    Args:
        qk, v: (B, H, L, E).
        causal: mask keys at later positions.
        attention_mask: (B, L) bool, True = real token.
        dropout: attention dropout (0 in eval): a probability, or the layer's keyed masks
            (reformer._dropout; drawn per (sequence and head, query, key), so they do not
            depend on the query blocks).
        key_offset: c in the keys ``q / sqrt(|q|^2 + c)`` (0: unit keys).

    Returns:
        (B, H, L, E).
    """
    B, H, L, E = qk.shape
    invalid_value, self_value = mask_values(qk.dtype)
    k = unit_keys(qk, key_offset)
    mask = padded_mask(attention_mask, B, L, L, qk.device)
    block = max(1, min(L, _BIAS_ELEMENTS // L))
    keys = torch.arange(L, device=qk.device)
    drop = AttentionDropout.of(dropout)
    outs = []
    for start in range(0, L, block):
        queries = keys[start:start + block, None]  # (Q, 1)
        bias = torch.zeros(queries.shape[0], L, dtype=qk.dtype, device=qk.device)  # (Q, L)
        bias = bias.masked_fill(queries == keys, self_value)
        if causal:
            bias = bias.masked_fill(keys > queries, invalid_value)
        if mask is not None:
            bias = bias.masked_fill(~mask[:, None, None, :], invalid_value)  # (B, 1, Q, L)
        q = qk[:, :, start:start + block]
        if drop is None:
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0))
            continue
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + bias, dim=-1)  # (B,H,Q,L)
        keep = drop.queries(queries.view(-1), L, probs.view(B * H, -1, L)).view(probs.shape)
        outs.append(torch.matmul(probs * keep, v))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


class FullSelfAttention(HeadSlicedAttention):
    """Multi-head exact attention with shared W_qk (interchangeable with LSHSelfAttention)."""

    def __init__(self, config: ReformerConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
        inner = config.n_heads * config.d_head
        self.w_qk = nn.Linear(config.d_model, inner, bias=False)
        self.w_v = nn.Linear(config.d_model, inner, bias=False)

    def projections(self) -> list[nn.Linear]:
        return [self.w_qk, self.w_v]

    def core(self, projected: list[torch.Tensor], heads: slice, state: AttentionState,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        qk, v = projected
        dropout = self.dropout_for(state, qk.shape[0], heads, qk.device)
        if _banded.flex_available(qk.device) and dropout is None:  # one call, no (L, L) bias
            B, H, L, _ = qk.shape
            mask = padded_mask(attention_mask, B, L, L, qk.device)
            out, _ = _banded.attend(
                qk, unit_keys(qk, key_offset(self.config)), v, torch.arange(L, device=qk.device),
                None if mask is None else mask[:, None].expand(B, H, L), chunk_length=L,
                offsets=None, circular=False, causal=self.config.causal, self_mask=True,
                scale=1.0)
            return out
        return full_attention(qk, v, causal=self.config.causal, attention_mask=attention_mask,
                              dropout=dropout, key_offset=key_offset(self.config))

    def cache_entries(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        heads = slice(0, self.n_heads)
        qk = self.project(self.w_qk, x, heads)
        return qk, unit_keys(qk, key_offset(self.config)), self.project(self.w_v, x, heads)

    def attend_cached(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        t = cache.length - 1
        logits = torch.matmul(q, cache.keys[:, :, :t + 1].transpose(-1, -2))  # (B, H, 1, t+1)
        if t > 0:  # the query itself only when nothing else is there
            logits[..., t] = mask_values(q.dtype)[1]
        return torch.matmul(torch.softmax(logits, dim=-1), cache.values[:, :, :t + 1])
