"""LSH attention core (reformer.attention.lsh.lsh_attention) vs a slow reference.

The reference (tests/attention/reference.py) loops over queries in float64 and follows
the agreed semantics literally: sort items by (round, bucket, position), chunk, look
around circularly with the window taken as a SET of chunks, masks that REPLACE logits
(-1e9 padding/causal, -1e5 self), optional log-count dedup, and rounds combined by
softmax of their log-sum-exps. Besides the equivalence we check the consequences the
design promises: dedup = exact attention over the union of windows, one window covering
everything = full attention, causality in v, and finite-difference gradients.

Sizes are tiny (B <= 2, H <= 2, L <= 24, E <= 8, M = 4) so the file runs in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from reformer.attention.full import full_attention
from reformer.attention.lsh import lsh_attention
from reformer.hashing import hash_vectors

from .reference import (
    MASKED,
    SELF,
    reference_buckets,
    reference_full_attention,
    reference_lsh_attention,
    reference_windows,
)

F64 = torch.float64
ATOL = 1e-10
M = 4  # chunk_length everywhere


def make_inputs(seed, *, batch=2, heads=2, length=22, dim=8, rounds=2, factors=(4, 2), masked=True):
    """Random float64 qk, v, rotations (tensor for one factor, else list), mask."""
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(batch, heads, length, dim, generator=g, dtype=F64)
    v = torch.randn(batch, heads, length, dim, generator=g, dtype=F64)
    rots = [torch.randn(heads, dim, rounds, f // 2, generator=g, dtype=F64) for f in factors]
    rotations = rots[0] if len(rots) == 1 else rots
    mask = None
    if masked:
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[-1, -3:] = False  # padding at the end
        mask[0, length // 2] = False  # holes in the middle
        mask[-1, 3] = False
    return qk, v, rotations, mask


def assert_close_on_real(out, ref, mask, atol=ATOL):
    """Max abs error over real (mask True) query positions only."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == F64
    keep = torch.ones(ref.shape[0], ref.shape[2], dtype=torch.bool) if mask is None else mask
    keep = keep[:, None, :, None].expand_as(ref)
    err = (out - ref).abs()[keep].max().item()
    assert err <= atol, f"max abs error {err:.3e} > {atol:.0e}"


# ----------------------------------------------------------------------------
# Equivalence with the reference

CASES = {
    # NB = 8 as a single rotation, L a multiple of M, no mask.
    "plain": dict(length=16, factors=(8,), masked=False),
    # Factorised NB = 4 * 2, L = 22 not a multiple of M, padding at the end and holes.
    "factorised_masked_ragged": dict(length=22, factors=(4, 2), masked=True),
}


@pytest.mark.parametrize("dedup", [False, True], ids=["nodedup", "dedup"])
@pytest.mark.parametrize("n_after", [0, 1], ids=lambda a: f"after{a}")
@pytest.mark.parametrize("n_before", [1, 2], ids=lambda b: f"before{b}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("rounds", [1, 2, 3], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("case", list(CASES))
def test_lsh_matches_reference(case, rounds, causal, n_before, n_after, dedup):
    qk, v, rotations, mask = make_inputs(
        rounds * 100 + n_before * 10 + n_after, rounds=rounds, **CASES[case]
    )
    kwargs = dict(
        chunk_length=M,
        n_chunks_before=n_before,
        n_chunks_after=n_after,
        causal=causal,
        dedup_rounds=dedup,
        attention_mask=mask,
    )
    out = lsh_attention(qk, v, rotations, **kwargs)
    ref = reference_lsh_attention(qk, v, rotations, **kwargs)
    assert_close_on_real(out, ref, mask)


@pytest.mark.parametrize("rounds", [1, 3])
def test_lsh_window_larger_than_chunk_count_counts_each_chunk_once(rounds):
    # L = 6 -> Lp = 8; with R = 1 there are n = 2 chunks, and a window of
    # 2 + 1 + 1 = 4 > n chunks is the set of all chunks, each once (R = 3: n = 6).
    qk, v, rotations, mask = make_inputs(7, length=6, rounds=rounds, factors=(4,))
    kwargs = dict(
        chunk_length=M,
        n_chunks_before=2,
        n_chunks_after=1,
        causal=False,
        attention_mask=mask,
    )
    out = lsh_attention(qk, v, rotations, **kwargs)
    assert_close_on_real(out, reference_lsh_attention(qk, v, rotations, **kwargs), mask)


def test_single_factor_list_equals_tensor():
    qk, v, rotations, mask = make_inputs(3, factors=(8,))
    kwargs = dict(chunk_length=M, attention_mask=mask)
    out_tensor = lsh_attention(qk, v, rotations, **kwargs)
    out_list = lsh_attention(qk, v, [rotations], **kwargs)
    assert torch.equal(out_tensor, out_list)


def test_ragged_length_equals_explicit_padding():
    # Internal padding must behave exactly like attention_mask=False positions.
    qk, v, rotations, _ = make_inputs(11, length=22, masked=False)
    pad = torch.randn(2, 2, 2, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[:, 22:] = False
    kwargs = dict(chunk_length=M, n_chunks_before=1, n_chunks_after=1, causal=False)
    out = lsh_attention(qk, v, rotations, **kwargs)
    padded = lsh_attention(
        torch.cat([qk, pad], 2),
        torch.cat([v, pad], 2),
        rotations,
        attention_mask=mask,
        **kwargs,
    )
    assert out.shape == (2, 2, 22, 8)
    assert (out - padded[:, :, :22]).abs().max().item() <= ATOL


# ----------------------------------------------------------------------------
# Buckets


@pytest.mark.parametrize("factors", [(8,), (4, 2), (2, 2, 4)], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_hash_vectors_matches_reference(factors, masked):
    qk, _, rotations, mask = make_inputs(5, length=22, rounds=3, factors=factors, masked=masked)
    buckets = hash_vectors(qk, rotations, attention_mask=mask)
    ref = reference_buckets(qk, rotations, mask)
    assert buckets.dtype == torch.long
    assert buckets.shape == (2, 2, 3, 22)
    assert torch.equal(buckets, ref)
    if masked:  # the pad bucket NB = 8 or 16 is used exactly at the masked positions
        nb = math.prod(factors)
        assert torch.equal(buckets == nb, ~mask[:, None, None, :].expand_as(buckets))


def test_hash_vectors_float32_input_matches_reference():
    qk, _, rotations, _ = make_inputs(6, masked=False)
    qk32, rot32 = qk.float(), [r.float() for r in rotations]
    ref = reference_buckets(qk32.double(), [r.double() for r in rot32])
    assert torch.equal(hash_vectors(qk32, rot32), ref)


# ----------------------------------------------------------------------------
# Dedup = exact attention over the union of windows; no dedup = over the multiset


def _windowed_softmax(qk, v, rotations, mask, *, causal, n_before, n_after, as_set):
    """Exact softmax attention of each query over the union (as_set) or the
    concatenation (multiset) of the key positions of all its rounds' windows."""
    batch, heads, length, dim = qk.shape
    padded = -(-length // M) * M
    nb = math.prod(
        2 * r.shape[-1] for r in (rotations if isinstance(rotations, list) else [rotations])
    )
    buckets = reference_buckets(qk, rotations, mask).tolist()
    real = torch.ones(batch, padded, dtype=torch.bool)
    real[:, length:] = False
    if mask is not None:
        real[:, :length] &= mask
    keys = torch.nn.functional.pad(
        torch.nn.functional.normalize(qk, dim=-1), (0, 0, 0, padded - length)
    )
    vals = torch.nn.functional.pad(v, (0, 0, 0, padded - length))
    out = torch.zeros_like(qk)
    for b in range(batch):
        for h in range(heads):
            rows = [row + [nb] * (padded - length) for row in buckets[b][h]]
            windows = reference_windows(rows, M, n_before, n_after)
            for i in range(length):
                seen = [j for w in windows for j in w[i]]
                js = torch.tensor(sorted(set(seen)) if as_set else seen)
                logits = keys[b, h, js] @ qk[b, h, i]
                logits = torch.where(js == i, torch.full_like(logits, SELF), logits)
                bad = ~real[b, js] | ((js > i) & causal)
                logits = torch.where(bad, torch.full_like(logits, MASKED), logits)
                out[b, h, i] = torch.softmax(logits, 0) @ vals[b, h, js]
    return out


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup_vs_union", "nodedup_vs_multiset"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("rounds", [2, 3])
def test_rounds_combine_to_softmax_over_windows(rounds, causal, dedup):
    qk, v, rotations, mask = make_inputs(21 + rounds, rounds=rounds)
    n_before, n_after = 1, (0 if causal else 1)
    out = lsh_attention(
        qk,
        v,
        rotations,
        chunk_length=M,
        n_chunks_before=n_before,
        n_chunks_after=n_after,
        causal=causal,
        dedup_rounds=dedup,
        attention_mask=mask,
    )
    exact = _windowed_softmax(
        qk,
        v,
        rotations,
        mask,
        causal=causal,
        n_before=n_before,
        n_after=n_after,
        as_set=dedup,
    )
    assert_close_on_real(out, exact, mask)


def test_dedup_changes_the_result_when_rounds_overlap():
    # Guard against the two flags being silently equivalent for the inputs used above.
    qk, v, rotations, mask = make_inputs(23, rounds=3)
    a = lsh_attention(qk, v, rotations, chunk_length=M, dedup_rounds=False, attention_mask=mask)
    b = lsh_attention(qk, v, rotations, chunk_length=M, dedup_rounds=True, attention_mask=mask)
    keep = mask[:, None, :, None].expand_as(a)
    assert (a - b).abs()[keep].max().item() > 1e-3


# ----------------------------------------------------------------------------
# One window covering the whole sequence = full attention


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize(
    ("rounds", "length", "n_before", "n_after"),
    [(1, 8, 1, 0), (1, 8, 2, 1), (1, 7, 1, 0), (2, 4, 1, 0), (2, 4, 1, 1)],
    ids=["R1_L8", "R1_L8_window_wraps_twice", "R1_L7_padded", "R2_L4", "R2_L4_after1"],
)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_lsh_with_one_window_equals_full_attention(
    rounds, length, n_before, n_after, causal, masked
):
    qk, v, rotations, mask = make_inputs(
        31 + length, length=length, rounds=rounds, factors=(4,), masked=False
    )
    if masked:
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[0, 1] = False
        mask[1, -1] = False
    out = lsh_attention(
        qk,
        v,
        rotations,
        chunk_length=M,
        n_chunks_before=n_before,
        n_chunks_after=n_after,
        causal=causal,
        attention_mask=mask,
    )
    ref = reference_full_attention(qk, v, causal=causal, attention_mask=mask)
    assert_close_on_real(out, ref, mask)
    fast = full_attention(qk, v, causal=causal, attention_mask=mask)
    assert_close_on_real(fast, ref, mask)


# ----------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("dedup", [False, True], ids=["nodedup", "dedup"])
def test_causal_lsh_ignores_later_values(dedup):
    qk, v, rotations, mask = make_inputs(41, rounds=3)
    t = 11
    v2 = v.clone()
    v2[:, :, t:] += torch.randn(
        v[:, :, t:].shape, dtype=F64, generator=torch.Generator().manual_seed(1)
    )
    kwargs = dict(
        chunk_length=M,
        n_chunks_before=2,
        n_chunks_after=1,
        dedup_rounds=dedup,
        attention_mask=mask,
    )
    out = lsh_attention(qk, v, rotations, causal=True, **kwargs)
    out2 = lsh_attention(qk, v2, rotations, causal=True, **kwargs)
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert not torch.allclose(out[:, :, t:], out2[:, :, t:])
    # The same change does reach earlier positions without the causal mask.
    bidir = lsh_attention(qk, v, rotations, causal=False, **kwargs)
    bidir2 = lsh_attention(qk, v2, rotations, causal=False, **kwargs)
    assert not torch.allclose(bidir[:, :, :t], bidir2[:, :, :t])


# ----------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("dedup", [False, True], ids=["nodedup", "dedup"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_lsh_gradcheck(causal, dedup):
    qk, v, rotations, _ = make_inputs(
        51, batch=1, heads=1, length=8, dim=4, rounds=2, factors=(4,), masked=False
    )
    qk.requires_grad_(True)
    v.requires_grad_(True)

    def f(qk, v):
        return lsh_attention(
            qk,
            v,
            rotations,
            chunk_length=M,
            n_chunks_before=1,
            n_chunks_after=0 if causal else 1,
            causal=causal,
            dedup_rounds=dedup,
        )

    assert torch.autograd.gradcheck(f, (qk, v), eps=1e-6, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------
# User errors


def test_lsh_attention_rejects_bad_arguments():
    qk, v, rotations, _ = make_inputs(61, length=8, factors=(4,), masked=False)
    with pytest.raises(ValueError, match="shape"):
        lsh_attention(qk, v[..., :4], rotations, chunk_length=M)
    with pytest.raises(ValueError, match="chunk_length"):
        lsh_attention(qk, v, rotations, chunk_length=0)
    with pytest.raises(ValueError, match="attention_mask"):
        lsh_attention(
            qk,
            v,
            rotations,
            chunk_length=M,
            attention_mask=torch.ones(2, 7, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="rotations"):
        lsh_attention(qk, v, rotations[:, :4], chunk_length=M)  # E = 4 != 8
    with pytest.raises(ValueError, match="rotations"):
        lsh_attention(qk, v, [rotations, rotations[:, :, :1]], chunk_length=M)  # R differs


def test_repeated_chunks_refuse_what_only_the_blocks_support():
    # hf_compat, one sorted chunk and a window of two: Hugging Face's look-around repeats the
    # chunk, which the tensor-operator path computes but attention dropout cannot ride on
    from reformer.attention.lsh import LSHSelfAttention
    from reformer.config import ReformerConfig

    config = ReformerConfig(d_model=16, n_heads=2, vocab_size=8, chunk_length=8, n_hashes=1,
                            n_buckets=2, max_seq_len=8, hf_compat=True, attention_dropout=0.1)
    layer = LSHSelfAttention(config).double()
    x = torch.randn(1, 8, 16, dtype=F64)
    layer.eval()
    assert layer(x).shape == (1, 8, 16)  # no dropout in evaluation: computed
    layer.train()
    with pytest.raises(ValueError, match="fewer than the window's 2"):
        layer(x)
