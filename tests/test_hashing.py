"""Angular LSH helpers (reformer.hashing): rotations, buckets, sort permutations.

Checks determinism under a seed, shapes and bucket ranges (including the factorised
hash and the padding bucket NB), the argmax tie rule, and that the sort permutation
orders items by (round, bucket, position) and is undone by its inverse. Values are
compared with plain Python where that is the clearest statement of the rule.
"""

from __future__ import annotations

import pytest
import torch

from reformer.hashing import hash_vectors, sample_rotations, sort_by_bucket

F64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# sample_rotations


def test_sample_rotations_shape_and_dtype():
    rot = sample_rotations(3, 8, 2, 6, seed=0)
    assert isinstance(rot, torch.Tensor)
    assert rot.shape == (3, 8, 2, 3)  # (H, E, R, NB/2)
    assert rot.dtype == torch.float32
    assert sample_rotations(3, 8, 2, 6, seed=0, dtype=F64).dtype == F64


@pytest.mark.parametrize("factors", [(4, 2), [2, 8, 4]], ids=str)
def test_sample_rotations_factorised_shapes(factors):
    rots = sample_rotations(2, 4, 3, factors, seed=1)
    assert isinstance(rots, list)
    assert [tuple(r.shape) for r in rots] == [(2, 4, 3, f // 2) for f in factors]


@pytest.mark.parametrize("n_buckets", [8, (4, 2)], ids=str)
def test_sample_rotations_seed_determinism(n_buckets):
    def draw(seed):
        rot = sample_rotations(2, 4, 3, n_buckets, seed=seed)
        return torch.cat([r.flatten() for r in (rot if isinstance(rot, list) else [rot])])

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
    unseeded = [sample_rotations(2, 4, 3, n_buckets) for _ in range(2)]
    if isinstance(n_buckets, tuple):
        unseeded = [torch.cat([r.flatten() for r in rots]) for rots in unseeded]
    assert not torch.equal(*unseeded)


def test_factor_rotations_are_independent():
    a, b = sample_rotations(2, 4, 3, (4, 4), seed=0)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("n_buckets", [8, (4, 2)], ids=str)
def test_more_rounds_extend_fewer_rounds(n_buckets):
    # Seeded draws are round-major: raising n_hashes keeps the first rounds
    # (hashing.py docstring; not promised by the spec, but relied on for evaluation).
    few = sample_rotations(2, 4, 2, n_buckets, seed=3)
    many = sample_rotations(2, 4, 5, n_buckets, seed=3)
    few, many = (x if isinstance(x, list) else [x] for x in (few, many))
    for f, m in zip(few, many, strict=True):
        assert torch.equal(m[:, :, :2], f)


@pytest.mark.parametrize(
    ("n_hashes", "n_buckets"),
    [(2, 7), (2, 0), (2, (4, 3)), (2, (4, 2.0)), (0, 8)],
    ids=["odd", "zero", "odd_factor", "float_factor", "no_rounds"],
)
def test_sample_rotations_rejects_bad_arguments(n_hashes, n_buckets):
    with pytest.raises(ValueError, match="n_buckets|n_hashes"):
        sample_rotations(2, 4, n_hashes, n_buckets)


# ----------------------------------------------------------------------------
# hash_vectors


def test_factorised_buckets_combine_the_factor_buckets():
    qk = randn(2, 2, 40, 6, seed=1)
    r1, r2, r3 = (randn(2, 6, 3, f // 2, seed=10 + f) for f in (4, 2, 6))
    combined = hash_vectors(qk, [r1, r2, r3])
    b1, b2, b3 = (hash_vectors(qk, r) for r in (r1, r2, r3))
    assert torch.equal(combined, b1 + 4 * b2 + 4 * 2 * b3)  # b1 + f1*b2 + f1*f2*b3


@pytest.mark.parametrize("n_buckets", [8, (4, 2), (2, 2, 2)], ids=str)
def test_bucket_range_and_padding_bucket(n_buckets):
    qk = randn(1, 2, 4000, 4, seed=2)
    rotations = sample_rotations(2, 4, 2, n_buckets, seed=0, dtype=F64)
    mask = torch.ones(1, 4000, dtype=torch.bool)
    mask[0, ::7] = False
    buckets = hash_vectors(qk, rotations, attention_mask=mask)
    assert buckets.shape == (1, 2, 2, 4000) and buckets.dtype == torch.long
    real = buckets[mask[:, None, None, :].expand_as(buckets)]
    assert real.min().item() == 0 and real.max().item() == 7
    assert torch.equal(
        torch.unique(buckets[0, 0, 0, mask[0]]), torch.arange(8)
    )  # every bucket used
    assert (buckets[..., ~mask[0]] == 8).all()  # the pad bucket NB


def test_buckets_are_angular():
    qk = randn(2, 2, 30, 8, seed=3)
    rotations = sample_rotations(2, 8, 3, (4, 2), seed=4, dtype=F64)
    assert torch.equal(hash_vectors(qk, rotations), hash_vectors(qk * 3.5, rotations))
    # -x moves the argmax over [p, -p] by f/2 within every factor.
    b, nb = hash_vectors(qk, rotations), hash_vectors(-qk, rotations)
    assert torch.equal((b % 4 + 2) % 4 + 4 * ((b // 4 + 1) % 2), nb)


def test_ties_go_to_the_first_index():
    # A zero vector projects to 0 everywhere: argmax picks index 0 in every factor.
    qk = torch.zeros(1, 1, 3, 4, dtype=F64)
    rotations = sample_rotations(1, 4, 2, (4, 6), seed=0, dtype=F64)
    assert (hash_vectors(qk, rotations) == 0).all()


def test_hash_vectors_rejects_mismatched_rotations():
    qk = randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="rotations"):
        hash_vectors(qk, randn(2, 5, 2, 3))  # E = 5 != 4
    with pytest.raises(ValueError, match="rotations"):
        hash_vectors(qk, randn(3, 4, 2, 3))  # H = 3 != 2
    with pytest.raises(ValueError, match="rotations"):
        hash_vectors(qk, [randn(2, 4, 2, 2), randn(2, 4, 3, 1)])  # R differs between factors


# ----------------------------------------------------------------------------
# sort_by_bucket


def test_sort_by_bucket_orders_by_round_bucket_position_and_inverts():
    batch, heads, rounds, length, nb = 2, 3, 3, 10, 4
    g = torch.Generator().manual_seed(0)
    buckets = torch.randint(0, nb + 1, (batch, heads, rounds, length), generator=g)  # nb = pad
    s_items, undo = sort_by_bucket(buckets)
    assert s_items.shape == undo.shape == (batch, heads, rounds * length)
    for b in range(batch):
        for h in range(heads):
            expect = sorted(
                range(rounds * length),
                key=lambda t, b=b, h=h: (
                    t // length,
                    buckets[b, h, t // length, t % length].item(),
                    t % length,
                ),
            )
            assert s_items[b, h].tolist() == expect
    items = torch.arange(rounds * length).expand(batch, heads, -1)
    assert torch.equal(s_items.gather(-1, undo), items)  # unsort(sort(x)) = x
    assert torch.equal(undo.gather(-1, s_items), items)


def test_autocast_does_not_change_the_buckets():
    """Hashing projects in float32 under bf16 autocast too (autocast would run the matmul in
    bf16, moving vectors near a boundary into other buckets)."""
    g = torch.Generator().manual_seed(0)
    qk = torch.randn(1, 2, 4096, 16, generator=g)
    rotations = sample_rotations(2, 16, 4, 32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = hash_vectors(qk, rotations)
    assert under.equal(hash_vectors(qk, rotations))


def test_meta_tensors_hash_to_meta_buckets():
    """Shape inference on the meta device (no data) runs the hash too; autocast has no meta
    backend, so the hash must not ask for it there."""
    qk = torch.empty(1, 2, 64, 16, device="meta")
    rotations = sample_rotations(2, 16, 4, 8, seed=1, device="meta")
    buckets = hash_vectors(qk, rotations)
    assert buckets.device.type == "meta" and buckets.shape == (1, 2, 4, 64)
