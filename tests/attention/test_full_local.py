"""Exact (full) and local attention cores against slow references, plus causality.

full_attention is shared-QK with the LSH conventions (unit keys, no 1/sqrt(E),
logits REPLACED by -1e9 for padding/causal and -1e5 for self). local_attention has
separate q, k, v, logits scaled by 1/sqrt(E), chunks of M by position, each attending
to itself, n_chunks_before earlier and n_chunks_after later chunks, not circular.
The references live in tests/attention/reference.py and loop over queries in float64.
"""

from __future__ import annotations

import pytest
import torch

from reformer.attention.full import full_attention
from reformer.attention.local import local_attention

from .reference import reference_full_attention, reference_local_attention
from .test_lsh import ATOL, F64, assert_close_on_real


def make_mask(batch, length):
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, -3:] = False
    mask[0, length // 2] = False
    mask[-1, 2] = False
    return mask


def randn(*shape, seed):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# Full attention


@pytest.mark.parametrize("length", [8, 13])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_full_matches_reference(causal, masked, length):
    qk, v = randn(2, 2, length, 8, seed=length), randn(2, 2, length, 8, seed=length + 1)
    mask = make_mask(2, length) if masked else None
    out = full_attention(qk, v, causal=causal, attention_mask=mask)
    assert_close_on_real(
        out, reference_full_attention(qk, v, causal=causal, attention_mask=mask), mask
    )


def test_full_first_causal_query_attends_to_itself_only():
    # The -1e5 self logit is the only one left that is not -1e9.
    qk, v = randn(1, 2, 6, 4, seed=0), randn(1, 2, 6, 4, seed=1)
    out = full_attention(qk, v, causal=True)
    assert (out[:, :, 0] - v[:, :, 0]).abs().max().item() <= ATOL


def test_full_causal_ignores_later_positions():
    qk, v = randn(2, 2, 12, 8, seed=2), randn(2, 2, 12, 8, seed=3)
    mask = make_mask(2, 12)
    t = 5
    qk2, v2 = qk.clone(), v.clone()
    qk2[:, :, t:] = randn(2, 2, 12 - t, 8, seed=4)
    v2[:, :, t:] = randn(2, 2, 12 - t, 8, seed=5)
    out = full_attention(qk, v, causal=True, attention_mask=mask)
    out2 = full_attention(qk2, v2, causal=True, attention_mask=mask)
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert not torch.allclose(out[:, :, t:], out2[:, :, t:])


# ----------------------------------------------------------------------------
# Local attention

M = 4


@pytest.mark.parametrize("n_after", [0, 1], ids=lambda a: f"after{a}")
@pytest.mark.parametrize("n_before", [1, 2], ids=lambda b: f"before{b}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize(
    ("length", "masked"),
    [(16, False), (22, True), (3, False)],
    ids=["L16", "L22_masked_ragged", "L3_shorter_than_chunk"],
)
def test_local_matches_reference(length, masked, causal, n_before, n_after):
    q, k, v = (randn(2, 2, length, 8, seed=length + s) for s in range(3))
    mask = make_mask(2, length) if masked else None
    kwargs = dict(
        chunk_length=M,
        n_chunks_before=n_before,
        n_chunks_after=n_after,
        causal=causal,
        attention_mask=mask,
    )
    out = local_attention(q, k, v, **kwargs)
    assert_close_on_real(out, reference_local_attention(q, k, v, **kwargs), mask)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_local_covering_everything_equals_scaled_dot_product_attention(causal):
    # 3 chunks, 2 before and 2 after: every query sees every key, so local = plain
    # attention.
    q, k, v = (randn(2, 2, 12, 8, seed=s) for s in (7, 8, 9))
    out = local_attention(
        q, k, v, chunk_length=M, n_chunks_before=2, n_chunks_after=2, causal=causal
    )
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert (out - exact).abs().max().item() <= ATOL


def test_local_is_not_circular():
    # The first chunk has no earlier chunk; with wrap-around it would see the last.
    q, k, v = (randn(1, 1, 12, 4, seed=s) for s in (10, 11, 12))
    v2 = v.clone()
    v2[:, :, 8:] += 1.0
    kwargs = dict(chunk_length=M, n_chunks_before=1, n_chunks_after=0, causal=False)
    out, out2 = local_attention(q, k, v, **kwargs), local_attention(q, k, v2, **kwargs)
    assert torch.equal(out[:, :, :4], out2[:, :, :4])


@pytest.mark.parametrize("n_after", [0, 1])
def test_local_causal_ignores_later_positions(n_after):
    q, k, v = (randn(2, 2, 14, 8, seed=s) for s in (13, 14, 15))
    mask = make_mask(2, 14)
    t = 6  # inside the second chunk
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x, s in ((q2, 16), (k2, 17), (v2, 18)):
        x[:, :, t:] = randn(2, 2, 14 - t, 8, seed=s)
    kwargs = dict(
        chunk_length=M,
        n_chunks_before=1,
        n_chunks_after=n_after,
        causal=True,
        attention_mask=mask,
    )
    out, out2 = (
        local_attention(q, k, v, **kwargs),
        local_attention(q2, k2, v2, **kwargs),
    )
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert not torch.allclose(out[:, :, t:], out2[:, :, t:])
