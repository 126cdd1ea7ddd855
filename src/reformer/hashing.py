"""Angular locality-sensitive hashing (Reformer section 2, "LSH attention").

A vector x is hashed by a random rotation Rot ~ N(0, 1) of shape (E, NB/2):
``bucket = argmax([x @ Rot, -x @ Rot])``, so that vectors at a small angle share a bucket with
high probability. Each head and each hash round has its own independent rotation.

A factorised NB = f1 * f2 * ... hashes with one rotation of f_k/2 columns per factor and
combines ``bucket = b1 + f1 * b2 + f1 * f2 * b3 + ...``. Hashing then costs sum(f_k)/2 instead
of NB/2 dot products per vector, which matters when NB is in the thousands (a million tokens).

Shapes: B batch, H heads, L length, E d_head, R hash rounds, NB buckets.

Decisions:
- Masked (padding) positions go to an extra last bucket NB, so they sort behind every real
  token of their round and never split a real bucket.
- Projections are computed in float32 (or float64 for float64 inputs) and over slices of
  positions: bucket ids are not differentiable, and the (B, H, R, L, NB/2) projection would be
  the largest tensor of a million-token forward if it were built at once.
- Seeded rotations are drawn round-major, so the first R' rounds of an R-round draw equal an
  R'-round draw with the same seed: raising ``n_hashes`` at evaluation adds rounds and keeps
  the ones a model was trained with.
"""

from __future__ import annotations

import contextlib
import math

import torch

from reformer import _native

Rotations = torch.Tensor | list[torch.Tensor]

HASH_SLICE = 1 << 14  # positions hashed at once
_SORT_DTYPES = (torch.int16, torch.int32)  # bucket ids the native counting sort takes


def bucket_factors(rotations: Rotations) -> list[int]:
    """The factors f_k of NB implied by rotations of shape (H, E, R, f_k/2)."""
    rots = rotations if isinstance(rotations, (list, tuple)) else [rotations]
    return [2 * r.shape[-1] for r in rots]


def n_buckets_of(rotations: Rotations) -> int:
    """NB = prod(f_k)."""
    return math.prod(bucket_factors(rotations))


def sample_rotations(n_heads: int, d_head: int, n_hashes: int,
                     n_buckets: int | tuple[int, ...] | list[int], *, seed: int | None = None,
                     device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> Rotations:
    """Random rotations for hashing.

    Args:
        n_heads, d_head, n_hashes: H, E, R.
        n_buckets: NB (even), or its even factors for a factorised hash.
        seed: draws from a private generator when given (deterministic), else from the global
            RNG of ``device``.

    Returns:
        (H, E, R, NB/2) tensor, or a list with one (H, E, R, f_k/2) tensor per factor.
    """
    factors = list(n_buckets) if isinstance(n_buckets, (tuple, list)) else [n_buckets]
    for f in factors:
        if not isinstance(f, int) or f < 2 or f % 2:
            raise ValueError(f"n_buckets={n_buckets!r} must be even integers >= 2; pass e.g. "
                             "n_buckets=64 or n_buckets=(16, 32)")
    if n_hashes < 1:
        raise ValueError(f"n_hashes={n_hashes} must be >= 1; pass e.g. n_hashes=2")
    rots = []
    for k, f in enumerate(factors):
        shape = (n_hashes, n_heads, d_head, f // 2)  # round-major, see module docstring
        if seed is None:
            r = torch.randn(shape, device=device, dtype=dtype)
        else:
            gen = torch.Generator().manual_seed(seed * 7919 + k)
            r = torch.randn(shape, generator=gen, dtype=dtype).to(device)
        rots.append(r.permute(1, 2, 0, 3))  # (H, E, R, f/2)
    return rots if isinstance(n_buckets, (tuple, list)) else rots[0]


def hf_rotations(n_heads: int, d_head: int, n_hashes: int,
                 n_buckets: int | tuple[int, ...] | list[int], *, seed: int | None,
                 device: torch.device | str | None, dtype: torch.dtype) -> Rotations:
    """Hugging Face's rotations (``hf_compat``): one (H, E, R, sum(f)/2) draw from a generator
    seeded with ``seed`` (the same for every layer; the device's global RNG when None), in the
    inputs' dtype, cut into one (H, E, R, f/2) piece per factor."""
    factors = list(n_buckets) if isinstance(n_buckets, (tuple, list)) else [n_buckets]
    shape = (n_heads, d_head, n_hashes, sum(f // 2 for f in factors))
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    rot = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    pieces = list(rot.split([f // 2 for f in factors], dim=-1))
    return pieces if isinstance(n_buckets, (tuple, list)) else pieces[0]


def hf_n_buckets(length: int, chunk_length: int, max_seq_len: int) -> int | list[int]:
    """Hugging Face's bucket count when none is configured (``hf_compat``): the power of two
    at or below 2 * length / chunk_length, split into two powers of two above
    2 * max(sqrt(max_seq_len / chunk_length), chunk_length)."""
    power = (2 * (length // chunk_length)).bit_length() - 1
    limit = 2 * max(int((max_seq_len // chunk_length) ** 0.5), chunk_length)
    if 2**power > limit:
        return [2 ** (power // 2), 2 ** (power - power // 2)]
    return 2**power


def _check_rotations(rots: list[torch.Tensor], n_heads: int, d_head: int) -> None:
    n_hashes = rots[0].shape[2]
    for r in rots:
        if r.dim() != 4 or r.shape[:3] != (n_heads, d_head, n_hashes):
            raise ValueError(
                f"rotations of shape {tuple(r.shape)} do not match qk with H={n_heads}, "
                f"E={d_head}: every rotation must be (H, E, R, NB/2) with the same R; "
                "build them with reformer.hashing.sample_rotations")


@torch.no_grad()
def hash_vectors(qk: torch.Tensor, rotations: Rotations,
                 attention_mask: torch.Tensor | None = None,
                 block: int = HASH_SLICE) -> torch.Tensor:
    """Bucket ids of every position in every round.

    Args:
        qk: (B, H, L, E) shared query/key vectors.
        rotations: (H, E, R, NB/2) or a list of per-factor rotations.
        attention_mask: (B, L) bool, True = real token; False positions get bucket NB.
        block: positions hashed at once.

    Returns:
        (B, H, R, L) int64 bucket ids in [0, NB].
    """
    rots = list(rotations) if isinstance(rotations, (list, tuple)) else [rotations]
    B, H, L, E = qk.shape
    _check_rotations(rots, H, E)
    R = rots[0].shape[2]
    work = torch.float64 if qk.dtype == torch.float64 else torch.float32
    buckets = torch.zeros(B, H, R, L, dtype=torch.long, device=qk.device)
    # in ``work`` under autocast too (it would project in bf16): bf16 training hashes as
    # float32 does, and the C++ argmax (float32) applies. (No autocast on e.g. meta tensors.)
    device = qk.device.type
    no_autocast = (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
                   else contextlib.nullcontext())
    with no_autocast:
        for start in range(0, L, block):
            x = qk[:, :, start:start + block].to(work)  # (B, H, l, E)
            scale = 1
            for rot in rots:
                rot_hren = rot.to(work).permute(0, 2, 1, 3)  # (H, R, E, f/2)
                proj = torch.matmul(x.unsqueeze(2), rot_hren)  # (B, H, R, l, f/2)
                b = _signed_argmax(proj)
                buckets[:, :, :, start:start + block] += b * scale
                scale *= 2 * proj.shape[-1]
    if attention_mask is not None:
        pad = ~attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        buckets = buckets.masked_fill(pad, n_buckets_of(rots))
    return buckets


def _signed_argmax(proj: torch.Tensor) -> torch.Tensor:
    """argmax over [proj, -proj] along the last dim; the first half wins ties, as
    torch.argmax would."""
    native = _native.op("signed_argmax", proj)
    if native is not None and proj.is_contiguous():
        return native(proj)  # one pass (csrc/)
    hi_val, hi_idx = proj.max(dim=-1)
    lo_val, lo_idx = proj.min(dim=-1)
    return torch.where(hi_val >= -lo_val, hi_idx, lo_idx + proj.shape[-1])


def sort_by_bucket(buckets: torch.Tensor, inverse: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The permutation that sorts all R*L items by (round, bucket, position), and its inverse.

    Args:
        buckets: (B, H, R, L) ids in [0, NB] (NB = the padding bucket).
        inverse: also compute ``undo`` (the C++ counting sort makes it in the same pass
            anyway; PyTorch's path skips the scatter when False).

    Returns:
        ``s_items`` (B, H, R*L): item index r*L + i at each sorted slot, and ``undo``
        (B, H, R*L): the sorted slot of each item, so that ``s_x.gather(-1, undo)`` unsorts
        (or None).
    """
    B, H, R, L = buckets.shape
    native = _native.op("bucket_sort", buckets, _SORT_DTYPES)
    if native is not None and buckets.is_contiguous():
        return native(buckets)  # a counting sort and its inverse in one pass (csrc/)
    # Round by round (R independent rows, which the sort spreads over threads: at R*L = 2**18
    # this is 2.2x faster than one sort of round-offset keys). A stable sort keeps positions
    # ascending inside a bucket: the third sort key for free.
    within = buckets.sort(dim=-1, stable=True).indices  # (B, H, R, L) positions
    rounds = torch.arange(R, device=buckets.device).view(1, 1, R, 1) * L
    s_items = (within + rounds).reshape(B, H, R * L)
    return s_items, inverse_permutation(s_items) if inverse else None


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[..., perm[..., j]] = j`` for permutations along the last dim."""
    inv = torch.empty_like(perm)
    return inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device)
                        .expand_as(perm))
