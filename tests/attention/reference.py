"""Slow, obviously-correct reference implementations of the attention cores.

Everything here is written as plain Python loops over batch, head and query,
on Python floats (float64), straight from the agreed semantics (SPEC / DESIGN
section 1.2-1.4). Nothing is vectorised and nothing is shared with
``src/reformer``: the only torch calls convert tensors to nested lists and back.

Shape letters: B batch, H heads, L sequence length, Lp L padded to a multiple
of M, E head dim, R hash rounds, NB buckets, M chunk length.

Conventions that every reference follows:
- Masks REPLACE the logit (they are not added): ``MASKED`` (-1e9) for a key
  that is padding / attention_mask False / in the causal future, else
  ``SELF`` (-1e5) for the key at the query's own position (shared-QK only).
- Shared-QK keys are unit-normalised queries, no 1/sqrt(E) scaling.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

MASKED = -1e9
SELF = -1e5
NORM_EPS = 1e-12


def _dot(x: list[float], y: list[float]) -> float:
    return sum(a * b for a, b in zip(x, y, strict=True))


def _unit(x: list[float]) -> list[float]:
    norm = max(math.sqrt(sum(a * a for a in x)), NORM_EPS)  # like F.normalize
    return [a / norm for a in x]


def _softmax_attend(logits: list[float], values: list[list[float]]) -> tuple[list[float], float]:
    """Return (sum_t softmax_t(logits) * values_t, logsumexp(logits))."""
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    out = [0.0] * len(values[0])
    for w, val in zip(weights, values, strict=True):
        for e, a in enumerate(val):
            out[e] += w / total * a
    return out, top + math.log(total)


def _as_rotation_list(rotations) -> list[torch.Tensor]:
    return list(rotations) if isinstance(rotations, (list, tuple)) else [rotations]


def _mask_rows(attention_mask, batch: int, length: int) -> list[list[bool]]:
    if attention_mask is None:
        return [[True] * length for _ in range(batch)]
    return [[bool(m) for m in row] for row in attention_mask.tolist()]


def _argmax_first(values: list[float]) -> int:
    best = 0
    for k, x in enumerate(values):
        if x > values[best]:  # strict: the first index wins ties
            best = k
    return best


def reference_buckets(qk: torch.Tensor, rotations, attention_mask=None) -> torch.Tensor:
    """Bucket ids (B, H, R, L), long; masked positions get the extra bucket NB.

    Args:
        qk: (B, H, L, E).
        rotations: (H, E, R, NB/2), or a list of (H, E, R, f_k/2), one per factor.
        attention_mask: (B, L) bool, True = real token, or None.
    """
    batch, heads, length, _ = qk.shape
    rots = [r.tolist() for r in _as_rotation_list(rotations)]  # [h][e][r][col]
    factors = [2 * r.shape[-1] for r in _as_rotation_list(rotations)]
    n_buckets = math.prod(factors)
    n_rounds = _as_rotation_list(rotations)[0].shape[2]
    x_all = qk.tolist()
    mask = _mask_rows(attention_mask, batch, length)
    out = [[[[0] * length for _ in range(n_rounds)] for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            for r in range(n_rounds):
                for i in range(length):
                    if not mask[b][i]:
                        out[b][h][r][i] = n_buckets
                        continue
                    x = x_all[b][h][i]
                    bucket, stride = 0, 1
                    for rot, f in zip(rots, factors, strict=True):
                        cols = len(rot[h][0][r])
                        proj = [
                            sum(x[e] * rot[h][e][r][c] for e in range(len(x))) for c in range(cols)
                        ]
                        bucket += stride * _argmax_first(proj + [-p for p in proj])
                        stride *= f
                    out[b][h][r][i] = bucket
    return torch.tensor(out, dtype=torch.long)


def reference_windows(
    buckets: list[list[int]],
    chunk_length: int,
    n_chunks_before: int,
    n_chunks_after: int,
) -> list[list[list[int]]]:
    """Key positions (with multiplicity) seen by each query item of one (b, h).

    Args:
        buckets: [r][i] bucket ids over the PADDED length Lp (a multiple of M).
    Returns:
        windows[r][i]: the list of key positions j of all items in the window
        chunks of query item (r, i).
    """
    n_rounds, padded = len(buckets), len(buckets[0])
    items = sorted((r, buckets[r][i], i) for r in range(n_rounds) for i in range(padded))
    n_chunks = len(items) // chunk_length
    chunks = [items[c * chunk_length : (c + 1) * chunk_length] for c in range(n_chunks)]
    windows = [[[] for _ in range(padded)] for _ in range(n_rounds)]
    for s, (r, _, i) in enumerate(items):
        c = s // chunk_length
        window = sorted({(c + d) % n_chunks for d in range(-n_chunks_before, n_chunks_after + 1)})
        windows[r][i] = [j for w in window for (_, _, j) in chunks[w]]
    return windows


def _shared_qk_logit(qk_i, khat_j, i: int, j: int, key_is_real: bool, causal: bool) -> float:
    if not key_is_real or (causal and j > i):
        return MASKED
    if j == i:
        return SELF
    return _dot(qk_i, khat_j)


def reference_lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    rotations,
    *,
    chunk_length: int,
    n_chunks_before: int = 1,
    n_chunks_after: int = 0,
    causal: bool = True,
    dedup_rounds: bool = False,
    attention_mask=None,
) -> torch.Tensor:
    """LSH attention (B, H, L, E), float64, computed query by query."""
    batch, heads, length, dim = qk.shape
    padded = -(-length // chunk_length) * chunk_length
    n_buckets = math.prod(2 * r.shape[-1] for r in _as_rotation_list(rotations))
    buckets = reference_buckets(qk, rotations, attention_mask).tolist()
    mask = _mask_rows(attention_mask, batch, length)
    qk_all, v_all = qk.tolist(), v.tolist()
    out = [[[None] * length for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        real = mask[b] + [False] * (padded - length)
        for h in range(heads):
            x = qk_all[b][h] + [[0.0] * dim] * (padded - length)
            vals = v_all[b][h] + [[0.0] * dim] * (padded - length)
            khat = [_unit(row) for row in x]
            rows = [row + [n_buckets] * (padded - length) for row in buckets[b][h]]
            windows = reference_windows(rows, chunk_length, n_chunks_before, n_chunks_after)
            for i in range(length):
                counts = Counter(j for w in windows for j in w[i])
                outs, lses = [], []
                for w in windows:
                    keys = w[i]
                    logits = [
                        _shared_qk_logit(x[i], khat[j], i, j, real[j], causal)
                        - (math.log(counts[j]) if dedup_rounds else 0.0)
                        for j in keys
                    ]
                    o_r, z_r = _softmax_attend(logits, [vals[j] for j in keys])
                    outs.append(o_r)
                    lses.append(z_r)
                out[b][h][i], _ = _softmax_attend(lses, outs)  # sum_r softmax_r(z) o_r
    return torch.tensor(out, dtype=torch.float64)


def reference_full_attention(
    qk: torch.Tensor, v: torch.Tensor, causal: bool = True, attention_mask=None
):
    """Exact shared-QK attention (B, H, L, E) with the LSH masking conventions."""
    batch, heads, length, _ = qk.shape
    mask = _mask_rows(attention_mask, batch, length)
    qk_all, v_all = qk.tolist(), v.tolist()
    out = [[[None] * length for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            khat = [_unit(row) for row in qk_all[b][h]]
            for i in range(length):
                logits = [
                    _shared_qk_logit(qk_all[b][h][i], khat[j], i, j, mask[b][j], causal)
                    for j in range(length)
                ]
                out[b][h][i], _ = _softmax_attend(logits, v_all[b][h])
    return torch.tensor(out, dtype=torch.float64)


def reference_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_length: int,
    n_chunks_before: int = 1,
    n_chunks_after: int = 0,
    causal: bool = True,
    attention_mask=None,
) -> torch.Tensor:
    """Local (chunked, non-circular) attention (B, H, L, E) with separate q, k, v.

    Query i lies in chunk i // M and sees the positions of chunks
    i//M - n_chunks_before .. i//M + n_chunks_after that exist; logits are
    q_i . k_j / sqrt(E); padding, mask-False and (causal) future keys are -1e9.
    No self mask: queries and keys are different projections.
    """
    batch, heads, length, dim = q.shape
    n_chunks = -(-length // chunk_length)
    mask = _mask_rows(attention_mask, batch, length)
    q_all, k_all, v_all = q.tolist(), k.tolist(), v.tolist()
    out = [[[None] * length for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                c = i // chunk_length
                seen = [
                    w
                    for w in range(c - n_chunks_before, c + n_chunks_after + 1)
                    if 0 <= w < n_chunks
                ]
                keys = [j for w in seen for j in range(w * chunk_length, (w + 1) * chunk_length)]
                logits, values = [], []
                for j in keys:
                    if j >= length or not mask[b][j] or (causal and j > i):
                        logits.append(MASKED)
                        values.append([0.0] * dim)
                    else:
                        logits.append(_dot(q_all[b][h][i], k_all[b][h][j]) / math.sqrt(dim))
                        values.append(v_all[b][h][j])
                out[b][h][i], _ = _softmax_attend(logits, values)
    return torch.tensor(out, dtype=torch.float64)
