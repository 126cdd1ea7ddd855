"""LSH self-attention (Reformer section 2).

Queries and keys share one projection; keys are the unit-normalised queries,
``k_j = q_j / ||q_j||``, and the logit is ``q_i . k_j`` with no 1/sqrt(E). Every position is
hashed in R rounds (hashing.py); all R*L items are sorted by (round, bucket, position), the
sorted sequence is cut into chunks of M, and each chunk attends to itself and its neighbour
chunks (``n_chunks_before`` earlier, ``n_chunks_after`` later, wrapping circularly). Round r
gives an output o_r and log-sum-exp z_r per query; the rounds are combined as
``o = sum_r softmax_r(z) * o_r``, which is exactly softmax attention over all the keys a query
saw in all its rounds.

Shapes: B batch, H heads, G = B*H, L length (padded to Lp, a multiple of M), E d_head,
R rounds, NB buckets, M chunk length, n = R*Lp/M chunks, W window chunks, K = W*M window keys.
Prefixes: ``s_`` sorted order, ``c_`` chunked.

Decisions:
- Any L is accepted: positions are padded to a multiple of M and treated as masked.
- L <= M needs no separate exact-attention path (DESIGN.md 1.2): every round is then one
  chunk, and every window holds every position equally often, so the softmax over the window
  is exact attention (tested against full attention).
- ``dedup_rounds`` subtracts log N_ij, N_ij = how often key position j occurs among all key
  items of all R windows of query i. The result is then exact softmax attention over the
  *set* of positions the query saw (the paper's correction; it counts a key twice inside one
  round's window too, which happens when a round boundary falls inside a window).
- Masks are added to the logits (see _chunked.py): -1e9 for padding/causal, -1e5 for the
  query's own position in any round.
"""

from __future__ import annotations

import torch
from torch import nn

from reformer._dropout import AttentionDropout
from reformer.attention import _banded
from reformer.attention._chunked import (
    gather_rows,
    mask_values,
    pad_to_multiple,
    padded_mask,
    unit_keys,
    window_offsets,
)
from reformer.attention._sorted import sorted_window_attention
from reformer.attention.base import (
    AttentionState,
    HeadSlicedAttention,
    LayerCache,
    consecutive,
    key_offset,
    window,
)
from reformer.config import ReformerConfig, resolve_n_buckets
from reformer.hashing import (
    HASH_SLICE,
    Rotations,
    hash_vectors,
    hf_n_buckets,
    hf_rotations,
    n_buckets_of,
    sample_rotations,
    sort_by_bucket,
)
from reformer.plan import plan_for


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
    out = bucketed_attention(qk, v, buckets, chunk_length=chunk_length,
                             n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
                             causal=causal, dedup_rounds=dedup_rounds, attention_mask=mask)
    return out[:, :, :L]


def bucketed_attention(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, *,
                       chunk_length: int, n_chunks_before: int = 1,
                       n_chunks_after: int = 0, causal: bool = True,
                       dedup_rounds: bool = False, attention_mask: torch.Tensor | None = None,
                       dropout: float | AttentionDropout = 0.0,
                       offsets: list[int] | None = None,
                       key_offset: float = 0.0) -> torch.Tensor:
    """LSH attention given bucket ids (the part the reversible backward replays).

    Args:
        qk, v: (B, H, Lp, E) with Lp a multiple of ``chunk_length``.
        buckets: (B, H, R, Lp) ids from :func:`reformer.hashing.hash_vectors` (masked
            positions carry the largest id, NB, and so sort last).
        attention_mask: (B, Lp) bool or None.
        dropout: attention dropout (0 in eval): a probability, or the layer's keyed masks.
        offsets: the window's chunk offsets (default: the neighbours once each,
            ``window_offsets``).
        key_offset: c in the keys ``q / sqrt(|q|^2 + c)`` (0: unit keys).

    Returns:
        (B, H, Lp, E).
    """
    B, H, Lp, E = qk.shape
    R, M = buckets.shape[2], chunk_length
    assert Lp % M == 0, "callers pad to a multiple of chunk_length"
    G, n = B * H, R * Lp // M
    s_items, undo = sort_by_bucket(buckets)  # (B, H, R*Lp) each
    s_pos = (s_items % Lp).view(G, R * Lp)  # original position of each sorted item
    valid = None
    if attention_mask is not None:
        valid = attention_mask[:, None, :].expand(B, H, Lp).reshape(G, Lp)
    if offsets is None:
        offsets = window_offsets(n, n_chunks_before, n_chunks_after)
    log_count_fn = None
    if dedup_rounds and R > 1:
        chunk_of = (undo.view(G, R, Lp) // M).transpose(1, 2)  # (G, Lp, R) chunk of each item
        log_count_fn = _LogMultiplicity(chunk_of, offsets, n, qk.dtype)
    out, _ = sorted_window_attention(
        qk.reshape(G, Lp, E), v.reshape(G, Lp, E), s_pos, s_slot=undo.view(G, R * Lp),
        chunk_length=M, offsets=offsets, causal=causal, valid=valid,
        log_count_fn=log_count_fn, dropout=dropout, key_offset=key_offset)
    return out.view(B, H, Lp, E)


class _LogMultiplicity:
    """log N_ij for the (query item, key item) pairs of a block of windows.

    N_ij = sum over the query's rounds r and the key's rounds r' of [the chunk of key item
    (r', j) is in the window of the chunk of query item (r, i)].
    """

    def __init__(self, chunk_of: torch.Tensor, offsets: list[int], n: int,
                 dtype: torch.dtype) -> None:
        self.chunk_of, self.n, self.dtype = chunk_of, n, dtype  # (G, Lp, R)
        self.in_window = torch.zeros(n, dtype=torch.bool, device=chunk_of.device)
        self.in_window[torch.tensor(offsets, device=chunk_of.device) % n] = True

    def chunks_at(self, pos: torch.Tensor) -> torch.Tensor:
        """(G, nb, X) positions -> (G, nb, X, R) chunk of each of their items."""
        G, _, R = self.chunk_of.shape
        flat = pos.long().reshape(G, -1, 1).expand(-1, -1, R)
        return self.chunk_of.gather(1, flat).view(*pos.shape, R)

    def __call__(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """qpos (G, nb, M), kpos (G, nb, K) -> (G, nb, M, K) log-counts."""
        q_chunks, k_chunks = self.chunks_at(qpos), self.chunks_at(kpos)  # (.., M|K, R)
        count = torch.zeros(qpos.shape + kpos.shape[-1:], dtype=self.dtype, device=qpos.device)
        for r in range(q_chunks.shape[-1]):
            diff = k_chunks.unsqueeze(2) - q_chunks[..., r, None, None]  # (G, nb, M, K, R)
            count += self.in_window[diff % self.n].sum(dim=-1)
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

    def sample_rotations(self, length: int, n_hashes: int | None, device: torch.device,
                         dtype: torch.dtype = torch.float32) -> Rotations:
        """Rotations for a length-``length`` call: seeded per layer, or from the global RNG
        (under ``hf_compat`` Hugging Face's draw: the same seed for every layer, in the
        inputs' dtype, and its bucket count)."""
        cfg = self.config
        Lp, R = self.padded_length(length), n_hashes or cfg.n_hashes
        if cfg.hf_compat:
            nb = cfg.n_buckets or hf_n_buckets(Lp, cfg.chunk_length, cfg.max_seq_len)
            return hf_rotations(self.n_heads, self.d_head, R, nb, seed=cfg.hash_seed,
                                device=device, dtype=dtype)
        nb = resolve_n_buckets(cfg.n_buckets, Lp, cfg.chunk_length)
        seed = None if cfg.hash_seed is None else cfg.hash_seed * 1_000_003 + self.layer_index
        return sample_rotations(self.n_heads, self.d_head, R, nb, seed=seed, device=device)

    def prepare(self, x: torch.Tensor, n_hashes: int | None = None,
                length: int | None = None, rotations: Rotations | None = None
                ) -> AttentionState:
        """This call's state: its rotations (given, e.g. a decoding cache's, or drawn for a
        sequence of ``length``, default x's: the number of buckets follows it)."""
        if rotations is None:
            rotations = self.sample_rotations(length or x.shape[1], n_hashes, x.device,
                                              x.dtype)
        n_hashes = (rotations[0] if isinstance(rotations, list) else rotations).shape[2]
        return AttentionState(n_hashes=n_hashes, rotations=rotations)

    def projections(self) -> list[nn.Linear]:
        return [self.w_qk, self.w_v]

    def record_buckets(self, qk: torch.Tensor, heads: slice, state: AttentionState,
                       mask: torch.Tensor | None, pad: int = 0) -> torch.Tensor:
        """The bucket ids (B, h, R, L + pad) of ``heads`` in this call: hashed from qk
        (B, h, L, E) on the first pass and recorded in ``state``, where the reversible
        backward finds them. ``pad`` more positions take the masked bucket (sequence
        parallelism's last process pads its slice so, without copying qk)."""
        buckets = state.buckets.get(heads.start)
        if buckets is None:
            rots = state.rotations
            sliced = [r[heads] for r in rots] if isinstance(rots, list) else rots[heads]
            nb = n_buckets_of(rots)
            ids = hash_vectors(qk, sliced, mask, block=plan_for(qk.device).rows(HASH_SLICE))
            if pad:
                ids = torch.cat([ids, ids.new_full((*ids.shape[:3], pad), nb)], dim=3)
            # each layer keeps its ids until its backward: the smallest type that holds them
            # (ids are <= NB) is 4x less than int64
            small = nb <= torch.iinfo(torch.int16).max
            buckets = state.buckets[heads.start] = ids.to(torch.int16 if small else torch.int32)
        return buckets

    def core(self, projected: list[torch.Tensor], heads: slice, state: AttentionState,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        B, _, L, _ = projected[0].shape
        Lp = self.padded_length(L)
        qk, v = (pad_to_multiple(t, cfg.chunk_length, 2) for t in projected)
        mask = padded_mask(attention_mask, B, L, Lp, qk.device)
        plan = plan_for(qk.device)
        buckets = self.record_buckets(qk, heads, state, mask)
        dropout = self.dropout_for(state, B, heads, qk.device)
        n = buckets.shape[2] * Lp // cfg.chunk_length
        offsets = window(cfg, n, cfg.n_chunks_before, cfg.n_chunks_after)
        banded = not cfg.dedup_rounds and dropout is None
        if not consecutive(offsets) and not banded:
            raise ValueError(
                f"{n} sorted chunks are fewer than the window's {len(offsets)}: Hugging Face's "
                "look-around then repeats chunks (hf_compat), which attention dropout and "
                "dedup_rounds do not support; use longer sequences, or attention_dropout=0 "
                "and dedup_rounds=False")
        if not consecutive(offsets) or (plan.banded and banded):
            out = _banded.lsh_banded(  # any offsets (repeated chunks: tensor operators)
                qk, v, buckets.long(), chunk_length=cfg.chunk_length, offsets=offsets,
                causal=cfg.causal, attention_mask=mask, key_offset=key_offset(cfg))
        else:
            out = bucketed_attention(qk, v, buckets, chunk_length=cfg.chunk_length,
                                     causal=cfg.causal, dedup_rounds=cfg.dedup_rounds,
                                     attention_mask=mask, dropout=dropout, offsets=offsets,
                                     key_offset=key_offset(cfg))
        return out if Lp == L else out[:, :, :L]  # a full slice would copy in the backward

    # ------------------------------------------------------------------ incremental decoding
    def new_cache(self, batch: int, capacity: int, device: torch.device,
                  dtype: torch.dtype) -> LayerCache:
        """A cache whose rotations (and bucket count, from ``capacity``) stay fixed."""
        if self.config.dedup_rounds:
            raise ValueError("incremental decoding does not support dedup_rounds=True; decode "
                             "without the cache or use a model with dedup_rounds=False")
        cache = super().new_cache(batch, capacity, device, dtype)
        cache.rotations = self.sample_rotations(capacity, None, device, dtype)
        return cache

    def cache_entries(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        heads = slice(0, self.n_heads)
        qk = self.project(self.w_qk, x, heads)
        return qk, unit_keys(qk, key_offset(self.config)), self.project(self.w_v, x, heads)

    def index_cache(self, q: torch.Tensor, cache: LayerCache, start: int) -> None:
        """Insert positions start.. into each round's (bucket, position) order."""
        L, C = q.shape[2], cache.capacity
        pos = torch.arange(start, start + L, device=q.device)
        keys = hash_vectors(q, cache.rotations) * C + pos  # (B, H, R, L)
        if start == 0:
            cache.sorted_keys = keys.sort(dim=-1).values
            cache.newest_rank = (cache.sorted_keys % C == L - 1).int().argmax(dim=-1)
            return
        old = cache.sorted_keys  # (B, H, R, t); the new position is the largest: one insert
        rank = (old < keys).sum(dim=-1, keepdim=True)  # (B, H, R, 1)
        slots = torch.arange(old.shape[-1], device=q.device)
        new = old.new_empty(old.shape[:-1] + (old.shape[-1] + 1,))
        new.scatter_(-1, slots + (slots >= rank), old)
        cache.sorted_keys = new.scatter_(-1, rank, keys)
        cache.newest_rank = rank.squeeze(-1)

    def attend_cached(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """The newest position's LSH attention, exactly as a full forward over the prefix.

        Its sorted slot in round r is r*Lp + (its rank in that round's (bucket, position)
        order); the window is the chunks at the usual offsets from the slot's chunk, wrapping
        over the n = R*Lp/M chunks; slots past a round's real items are padding.
        """
        cfg, C = self.config, cache.capacity
        B, H, _, E = q.shape
        T = cache.length  # real items per round
        M = cfg.chunk_length
        Lp = self.padded_length(T)
        S = cache.sorted_keys  # (B, H, R, T)
        R = S.shape[2]
        n = R * Lp // M
        chunk = (torch.arange(R, device=q.device) * Lp + cache.newest_rank) // M  # (B, H, R)
        offsets = torch.tensor(window(cfg, n, cfg.n_chunks_before, 0), device=q.device)
        win = (chunk.unsqueeze(-1) + offsets) % n  # (B, H, R, W)
        slots = (win.unsqueeze(-1) * M + torch.arange(M, device=q.device)).flatten(-2)
        rounds, j = slots // Lp, slots % Lp  # (B, H, R, K)
        real = j < T
        items = S.reshape(B, H, R * T).gather(-1, (rounds * T + j.clamp(max=T - 1)).flatten(-2))
        pos = (items % C).view(B, H, -1)  # (B, H, R*K) key positions
        flat = pos.view(B * H, -1)
        keys = gather_rows(cache.keys.view(B * H, C, E), flat).view(B, H, -1, E)
        values = gather_rows(cache.values.view(B * H, C, E), flat).view(B, H, -1, E)
        logits = torch.matmul(keys, q.transpose(-1, -2)).view(B, H, R, -1)  # (B, H, R, K)
        invalid_value, self_value = mask_values(q.dtype)
        logits = logits.masked_fill(pos.view_as(logits) == T - 1, self_value)
        logits = logits.masked_fill(~real, invalid_value)
        probs = torch.softmax(logits, dim=-1)
        o = torch.matmul(probs.unsqueeze(-2), values.view(B, H, R, -1, E))  # (B, H, R, 1, E)
        lse = logits.amax(dim=-1) - probs.amax(dim=-1).log()  # as in the chunk kernel
        w = torch.softmax(lse, dim=-1)  # rounds' weights (B, H, R)
        return (o.squeeze(-2) * w.unsqueeze(-1)).sum(dim=2, keepdim=True)  # (B, H, 1, E)
