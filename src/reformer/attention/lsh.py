"""LSH self-attention (Reformer section 2).

Queries and keys share one projection; keys are the unit-normalised queries,
``k_j = q_j / ||q_j||``, and the logit is ``q_i . k_j`` with no 1/sqrt(E). Every position is
hashed in R rounds (hashing.py); all R*L items are sorted by (round, bucket, position), the
sorted sequence is cut into chunks of M, and each chunk attends to itself and its neighbour
chunks (``n_chunks_before`` earlier, ``n_chunks_after`` later, wrapping circularly). Round r
gives an output o_r and log-sum-exp z_r per query; the rounds are combined as
``o = sum_r softmax_r(z) * o_r``, which is exactly softmax attention over all the keys a query
saw in all its rounds.

Shapes: B batch, H heads, L length (padded to Lp, a multiple of M), E d_head, R rounds,
NB buckets, M chunk length, n = R*Lp/M chunks, W window chunks, K = W*M window keys.
Prefixes: ``s_`` sorted order, ``c_`` chunked.

Decisions:
- Any L is accepted: positions are padded to a multiple of M and treated as masked.
- ``dedup_rounds`` subtracts log N_ij, N_ij = how often key position j occurs among all key
  items of all R windows of query i. The result is then exact softmax attention over the
  *set* of positions the query saw (the paper's correction; it counts a key twice inside one
  round's window too, which happens when a round boundary falls inside a window).
- Masks replace logits (see _chunked.py): -1e9 for padding/causal, -1e5 for the query's own
  position in any round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reformer.attention._chunked import (
    attend_chunks,
    look_around,
    pad_to_multiple,
    padded_mask,
    window_offsets,
)
from reformer.attention.base import AttentionState, HeadSlicedAttention
from reformer.config import ReformerConfig, resolve_n_buckets
from reformer.hashing import Rotations, hash_vectors, n_buckets_of, sample_rotations, sort_by_bucket


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, rotations: Rotations, *,
                  chunk_length: int, n_chunks_before: int = 1, n_chunks_after: int = 0,
                  causal: bool = True, dedup_rounds: bool = False,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LSH attention with shared queries and keys.

    Args:
        qk: (B, H, L, E) shared query/key vectors.
        v: (B, H, L, E) values.
        rotations: (H, E, R, NB/2), or a list of (H, E, R, f_k/2) for NB = prod(f_k).
        chunk_length: M, items per chunk of the sorted sequence.
        n_chunks_before, n_chunks_after: neighbour chunks each chunk attends to.
        causal: mask keys at later positions.
        dedup_rounds: count each key position once per query across rounds.
        attention_mask: (B, L) bool, True = real token.

    Returns:
        (B, H, L, E) attention output.
    """
    B, H, L, E = qk.shape
    if v.shape != qk.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but qk has {tuple(qk.shape)}; both "
                         "must be (B, H, L, E)")
    if chunk_length < 1:
        raise ValueError(f"chunk_length={chunk_length} must be >= 1; pass e.g. 64")
    mask = padded_mask(attention_mask, B, L, L + (-L % chunk_length), qk.device)
    qk, v = pad_to_multiple(qk, chunk_length, 2), pad_to_multiple(v, chunk_length, 2)
    buckets = hash_vectors(qk, rotations, mask)
    out = bucketed_attention(qk, v, buckets, n_buckets_of(rotations), chunk_length=chunk_length,
                             n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
                             causal=causal, dedup_rounds=dedup_rounds, attention_mask=mask)
    return out[:, :, :L]


def bucketed_attention(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor,
                       n_buckets: int, *, chunk_length: int, n_chunks_before: int = 1,
                       n_chunks_after: int = 0, causal: bool = True,
                       dedup_rounds: bool = False, attention_mask: torch.Tensor | None = None,
                       dropout: float = 0.0) -> torch.Tensor:
    """LSH attention given bucket ids (the part the reversible backward replays).

    Args:
        qk, v: (B, H, Lp, E) with Lp a multiple of ``chunk_length``.
        buckets: (B, H, R, Lp) ids from :func:`reformer.hashing.hash_vectors`.
        n_buckets: NB (masked positions carry id NB).
        attention_mask: (B, Lp) bool or None.
        dropout: attention dropout probability (0 in eval).

    Returns:
        (B, H, Lp, E).
    """
    B, H, Lp, E = qk.shape
    R, M = buckets.shape[2], chunk_length
    assert Lp % M == 0, "callers pad to a multiple of chunk_length"
    n = R * Lp // M
    s_items, undo = sort_by_bucket(buckets, n_buckets)  # (B, H, R*Lp) each
    s_pos = s_items % Lp  # (B, H, R*Lp) original position of each sorted item
    idx = s_pos.unsqueeze(-1).expand(-1, -1, -1, E)
    s_qk = qk.gather(2, idx)  # (B, H, R*Lp, E)
    s_v = v.gather(2, idx)
    s_k = F.normalize(s_qk, dim=-1)
    offsets = window_offsets(n, n_chunks_before, n_chunks_after)
    c_q = s_qk.view(B, H, n, M, E)
    c_k = look_around(s_k.view(B, H, n, M, E), offsets, dim=2)  # (B, H, n, K, E)
    c_v = look_around(s_v.view(B, H, n, M, E), offsets, dim=2)
    c_qpos = s_pos.view(B, H, n, M)
    c_kpos = look_around(c_qpos, offsets, dim=2)  # (B, H, n, K)
    key_valid = None
    if attention_mask is not None:
        key_valid = attention_mask[:, None, :].expand(B, H, Lp).gather(
            2, c_kpos.reshape(B, H, -1)).view_as(c_kpos)
    log_count = None
    if dedup_rounds and R > 1:
        chunk_of = (undo // M).view(B, H, R, Lp)  # chunk of each item
        log_count = _log_multiplicity(chunk_of, c_qpos, c_kpos, offsets, n, qk.dtype)
    c_out, lse = attend_chunks(c_q, c_k, c_v, c_qpos, c_kpos, causal=causal,
                               key_valid=key_valid, self_mask=True, log_count=log_count,
                               dropout=dropout)  # (B, H, n, M, E), (B, H, n, M)
    # Unsort: item r*Lp + i sits at sorted slot undo[..., r*Lp + i].
    o = c_out.reshape(B, H, R * Lp, E).gather(2, undo.unsqueeze(-1).expand(-1, -1, -1, E))
    z = lse.reshape(B, H, R * Lp).gather(2, undo)
    if R == 1:
        return o.view(B, H, Lp, E)
    o, z = o.view(B, H, R, Lp, E), z.view(B, H, R, Lp)
    w = torch.softmax(z, dim=2).unsqueeze(-1)  # (B, H, R, Lp, 1): o = sum_r softmax_r(z) o_r
    return (o * w).sum(dim=2)


def _log_multiplicity(chunk_of: torch.Tensor, c_qpos: torch.Tensor, c_kpos: torch.Tensor,
                      offsets: list[int], n: int, dtype: torch.dtype) -> torch.Tensor:
    """log N_ij for every (query item, key item) pair of every window.

    N_ij = sum over the query's rounds r and the key's rounds r' of [the chunk of key item
    (r', j) is in the window of the chunk of query item (r, i)].

    Args:
        chunk_of: (B, H, R, Lp) chunk index of each item.
        c_qpos: (B, H, n, M); c_kpos: (B, H, n, K) positions.

    Returns:
        (B, H, n, M, K) log-counts in ``dtype``.
    """
    B, H, R, Lp = chunk_of.shape
    in_window = torch.zeros(n, dtype=torch.bool, device=chunk_of.device)
    in_window[torch.tensor(offsets, device=chunk_of.device) % n] = True
    by_pos = chunk_of.transpose(2, 3)  # (B, H, Lp, R)

    def chunks_at(pos: torch.Tensor) -> torch.Tensor:  # (B, H, n, X) -> (B, H, n, X, R)
        flat = pos.reshape(B, H, -1, 1).expand(-1, -1, -1, R)
        return by_pos.gather(2, flat).view(*pos.shape, R)

    q_chunks = chunks_at(c_qpos)  # (B, H, n, M, R)
    k_chunks = chunks_at(c_kpos)  # (B, H, n, K, R)
    count = torch.zeros(c_qpos.shape + c_kpos.shape[-1:], dtype=dtype, device=chunk_of.device)
    for r in range(R):
        diff = k_chunks.unsqueeze(3) - q_chunks[..., r, None, None]  # (B, H, n, M, K, R)
        count += in_window[diff % n].sum(dim=-1)
    return count.log()


class LSHSelfAttention(HeadSlicedAttention):
    """Multi-head LSH self-attention (shared W_qk, W_v, W_o; no biases)."""

    def __init__(self, config: ReformerConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index)
        inner = config.n_heads * config.d_head
        self.w_qk = nn.Linear(config.d_model, inner, bias=False)
        self.w_v = nn.Linear(config.d_model, inner, bias=False)

    def padded_length(self, length: int) -> int:
        return length + (-length % self.config.chunk_length)

    def prepare(self, x: torch.Tensor, n_hashes: int | None = None) -> AttentionState:
        """Draw this call's rotations: seeded per layer, or fresh from the global RNG."""
        cfg = self.config
        n_hashes = n_hashes or cfg.n_hashes
        nb = resolve_n_buckets(cfg.n_buckets, self.padded_length(x.shape[1]), cfg.chunk_length)
        seed = None if cfg.hash_seed is None else cfg.hash_seed * 1_000_003 + self.layer_index
        rotations = sample_rotations(self.n_heads, self.d_head, n_hashes, nb, seed=seed,
                                     device=x.device)
        return AttentionState(n_hashes=n_hashes, rotations=rotations)

    def heads_forward(self, x: torch.Tensor, heads: slice, state: AttentionState,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        B, L, _ = x.shape
        Lp = self.padded_length(L)
        qk = pad_to_multiple(self.project(self.w_qk, x, heads), cfg.chunk_length, 2)
        v = pad_to_multiple(self.project(self.w_v, x, heads), cfg.chunk_length, 2)
        mask = padded_mask(attention_mask, B, L, Lp, x.device)
        rots = state.rotations
        buckets = state.buckets.get(heads.start)
        if buckets is None:  # first pass; the reversible backward finds them recorded
            sliced = [r[heads] for r in rots] if isinstance(rots, list) else rots[heads]
            buckets = hash_vectors(qk, sliced, mask)
            state.buckets[heads.start] = buckets
        out = bucketed_attention(qk, v, buckets, n_buckets_of(rots),
                                 chunk_length=cfg.chunk_length,
                                 n_chunks_before=cfg.n_chunks_before,
                                 n_chunks_after=cfg.n_chunks_after, causal=cfg.causal,
                                 dedup_rounds=cfg.dedup_rounds, attention_mask=mask,
                                 dropout=self.attention_dropout())
        return self.merge(out[:, :, :L], heads)
