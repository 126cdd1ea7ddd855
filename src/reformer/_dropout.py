"""Dropout masks keyed by what they drop, not by the order they are drawn in.

A mask element is kept when a hash of (a seed, the element's coordinates) is at least
p * 2^32. The coordinates are global: (sequence, position in the whole sequence, feature) for
the hidden dropouts, (sequence and head, sorted chunk, slot, window key) for attention
dropout. So a mask does not depend on how the work is cut: blocks of rows, head slices, or
the slices of positions that sequence parallelism gives each process (reformer.parallel)
all see the same mask, and a recomputation (the reversible backward, a kernel's backward)
rebuilds it from the seed alone, with no RNG state to replay.

Each call site draws one seed from the CPU RNG when its layer runs (:func:`draw_seed`), so
``torch.manual_seed``, checkpoints of the RNG state and sequence parallelism's shared RNG
stream govern the masks as they govern the rest, and a CUDA step needs no host sync for them.

The hash: 32-bit integer mixing (two multiply-xorshift rounds, constant 0x45d9f3b) in int64
arithmetic that never overflows. A row key mixes the seed with the row's coordinates once
per row; each element mixes its row key with its column's key. On the CPU one C++ pass
(``csrc/dropout.cpp``) makes a mask, bit for bit the PyTorch ops' (which take about a dozen
passes over int64 temporaries; they remain for other devices).

Shapes: B batch, L positions held here, W features, G sequence-head rows, nb chunks, M
chunk slots, K window keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from reformer import _native

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2^27: x * _MUL < 2^59 for x < 2^32


def draw_seed() -> int:
    """A mask seed in [0, 2^31) from the CPU RNG."""
    return int(torch.randint(0, 1 << 31, (1,)))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit mixing of int64 values in [0, 2^32) (values stay in that range)."""
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


def _keep(row_keys: torch.Tensor, n_cols: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """(..., R) row keys -> (..., R, n_cols) multipliers: 1/(1-p) where kept, else 0."""
    threshold, scale = int(p * (1 << 32)), 1.0 / (1.0 - p)
    like = row_keys.new_empty(0, dtype=dtype)
    fused = _native.op("keyed_keep", like, (torch.float32, torch.float64, torch.bfloat16))
    if fused is not None:  # one pass (csrc/dropout.cpp), the same bits
        out = fused(row_keys.reshape(-1).contiguous(), n_cols, threshold, scale, like)
        return out.view(*row_keys.shape, n_cols)
    cols = _mix(torch.arange(n_cols, device=row_keys.device, dtype=torch.int64) + 0x9E3779B9)
    h = _mix(row_keys.unsqueeze(-1) ^ cols)
    kept = h >= threshold
    return kept.to(dtype).mul_(scale)


@dataclass(frozen=True)
class PositionDropout:
    """One call site's masks over (sequence, position, feature): the hidden dropouts.

    ``length`` positions per sequence are held here, the first at global position ``start``
    (nonzero for a sequence-parallel process's slice).
    """

    p: float
    seed: int
    length: int
    start: int = 0

    def rows(self, rows: slice, like: torch.Tensor) -> torch.Tensor:
        """The multipliers (n, W) of rows ``rows`` of the flattened (B*L, W) grid, W, dtype
        and device ``like``'s."""
        r = torch.arange(rows.start, rows.stop, device=like.device, dtype=torch.int64)
        batch, position = r // self.length, r % self.length + self.start
        key = _mix(_mix(batch ^ self.seed) ^ (position & _M32))
        return _keep(key, like.shape[-1], self.p, like.dtype)

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """The multipliers shaped like x, (B, L, W)."""
        return self.rows(slice(0, x[..., 0].numel()), x).view(x.shape)


def drop_rows(drop: PositionDropout | None, x_rows: torch.Tensor, rows: slice) -> torch.Tensor:
    """Dropout of ``x_rows`` (n, W), flat rows ``rows`` of the (B*L, W) grid (x itself for
    None)."""
    return x_rows if drop is None else x_rows * drop.rows(rows, x_rows)


def position_dropout(p: float, length: int, start: int = 0) -> PositionDropout | None:
    """A fresh site's masks (a seed drawn now), or None when p is 0."""
    return PositionDropout(p, draw_seed(), length, start) if p > 0 else None


@dataclass(frozen=True)
class AttentionDropout:
    """One attention call's masks over (row, sorted chunk, slot, window key).

    ``groups`` (G,) keys the kernel's G rows: b * n_heads + the global head index, so a head
    gets the same masks in whichever head slice, or process, attends with it; None: 0..G-1.
    """

    p: float
    seed: int
    groups: torch.Tensor | None = None
    chunk_offset: int = 0  # the sorted order's chunk that a caller's chunk 0 is

    @staticmethod
    def of(dropout: float | AttentionDropout | None) -> AttentionDropout | None:
        """A probability (keyed by a seed drawn now), an AttentionDropout, or None/0."""
        if isinstance(dropout, AttentionDropout):
            return dropout if dropout.p > 0 else None
        return AttentionDropout(float(dropout), draw_seed()) if dropout else None

    @staticmethod
    def heads(p: float, seed: int | None, batch: int, heads: slice, n_heads: int,
              device: torch.device) -> AttentionDropout | None:
        """The masks of ``heads`` of a layer with ``n_heads`` for a batch of ``batch``."""
        if p <= 0 or seed is None:
            return None
        b = torch.arange(batch, device=device, dtype=torch.int64).unsqueeze(1) * n_heads
        h = torch.arange(heads.start, heads.stop, device=device, dtype=torch.int64)
        return AttentionDropout(p, seed, (b + h).reshape(-1))

    def _group_keys(self, G: int, device: torch.device) -> torch.Tensor:
        groups = (torch.arange(G, device=device, dtype=torch.int64) if self.groups is None
                  else self.groups.to(device))
        if groups.shape[0] != G:
            raise ValueError(f"attention dropout keys {groups.shape[0]} rows; the kernel has "
                             f"G={G}")
        return _mix(groups ^ self.seed)  # (G,)

    def shifted(self, chunks: int) -> AttentionDropout:
        """These masks for a caller that numbers the sorted order's chunk ``chunks`` as 0
        (a process attending a span of it: reformer.parallel.rounds)."""
        return replace(self, chunk_offset=self.chunk_offset + chunks)

    def blocks(self, start: int, stop: int, M: int, K: int, like: torch.Tensor) -> torch.Tensor:
        """The multipliers (G, nb, M, K) of chunks start..stop-1 (M slots each, K window keys),
        G = like.shape[0]."""
        G, start, stop = like.shape[0], start + self.chunk_offset, stop + self.chunk_offset
        slots = torch.arange(start * M, stop * M, device=like.device, dtype=torch.int64)
        key = _mix(self._group_keys(G, like.device).unsqueeze(1) ^ slots)  # (G, nb*M)
        return _keep(key, K, self.p, like.dtype).view(G, stop - start, M, K)

    def queries(self, queries: torch.Tensor, n_keys: int, like: torch.Tensor) -> torch.Tensor:
        """The multipliers (G, Q, n_keys) of query positions ``queries`` (Q,) over every key
        (dense attention), G = like.shape[0]."""
        G = like.shape[0]
        key = _mix(self._group_keys(G, like.device).unsqueeze(1) ^ queries.to(torch.int64))
        return _keep(key, n_keys, self.p, like.dtype)
