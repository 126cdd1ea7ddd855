"""Position-wise layers: feed-forward, positional embeddings, row chunking, dropout masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reformer import ReformerConfig
from reformer._dropout import PositionDropout
from reformer.layers import (
    AxialPositionalEmbedding,
    FeedForward,
    LearnedPositionalEmbedding,
    SinusoidalPositionalEmbedding,
    dropout_keep,
    positional_embedding,
    row_chunks,
)


@pytest.mark.parametrize("n_rows, chunk", [(10, 3), (9, 3), (2, 5), (1, 1), (7, 7)])
def test_row_chunks_cover_every_row_once_in_order(n_rows, chunk):
    slices = row_chunks(n_rows, chunk)
    rows = [i for s in slices for i in range(n_rows)[s]]
    assert rows == list(range(n_rows))
    assert all(0 < s.stop - s.start <= chunk for s in slices)
    assert len(slices) == math.ceil(n_rows / chunk)


def test_dropout_keep():
    like = torch.zeros(200, 50, dtype=torch.float64)
    assert dropout_keep(like, 0.0) is None
    torch.manual_seed(0)
    keep = dropout_keep(like, 0.25)
    assert keep.shape == like.shape and keep.dtype == like.dtype
    values = set(keep.unique().tolist())
    assert values == {0.0, 1 / 0.75}
    assert abs(keep.mean().item() - 1.0) < 0.05  # an unbiased multiplier
    torch.manual_seed(0)
    assert torch.equal(dropout_keep(like, 0.25), keep)  # drawn from the global RNG


@pytest.mark.parametrize("activation, fn", [("relu", F.relu), ("gelu", F.gelu)])
def test_feed_forward_is_linear_activation_linear(activation, fn):
    config = ReformerConfig(d_model=8, n_heads=2, d_ff=12, ff_activation=activation,
                            dropout=0.5, max_seq_len=16)
    torch.manual_seed(0)
    ff = FeedForward(config).double().eval()  # eval: dropout off
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = fn(x @ ff.w_in.weight.t() + ff.w_in.bias) @ ff.w_out.weight.t() + ff.w_out.bias
    torch.testing.assert_close(ff(x), expected, rtol=0, atol=1e-12)


def test_feed_forward_applies_the_callers_dropout():
    config = ReformerConfig(d_model=8, n_heads=2, d_ff=12, dropout=0.5, max_seq_len=16)
    torch.manual_seed(0)
    ff = FeedForward(config).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    drops = (PositionDropout(0.5, seed=1, length=4), PositionDropout(0.5, seed=2, length=4))
    rows = slice(3, 8)  # rows 3..7 of a (2 * 4, .) grid: the last of sequence 0, all of 1
    mask_h, mask_o = drops[0].rows(rows, x.new_empty(5, 12)), drops[1].rows(rows, x)
    hidden = (x @ ff.w_in.weight.t() + ff.w_in.bias).relu() * mask_h
    expected = (hidden @ ff.w_out.weight.t() + ff.w_out.bias) * mask_o
    got = ff(x, drops, rows)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(got, ff(x))  # without them: no dropout


def test_axial_embedding_shape_and_concatenated_rows():
    shape, dims = (3, 4, 5), (2, 3, 3)
    emb = AxialPositionalEmbedding(shape, dims, init_std=1.0).double()
    assert [tuple(w.shape) for w in emb.weights] == [(3, 2), (4, 3), (5, 3)]
    table = emb(60)
    assert table.shape == (60, 8)
    w1, w2, w3 = emb.weights
    for p in range(60):
        # p = 20 * i + 5 * j + k: coordinates in the (3, 4, 5) grid, first axis slowest.
        i, j, k = p // 20, (p // 5) % 4, p % 5
        expected = torch.cat([w1[i], w2[j], w3[k]])
        assert torch.equal(table[p], expected), p
    # A shorter sequence gets the prefix of the table.
    assert torch.equal(emb(17), table[:17])
    # The table costs sum(L_k * d_k) parameters, not L * D.
    assert sum(w.numel() for w in emb.parameters()) == 3 * 2 + 4 * 3 + 5 * 3


def test_axial_embedding_positions_are_distinct():
    emb = AxialPositionalEmbedding((4, 6), (3, 5), init_std=1.0)
    table = emb(24)
    assert torch.unique(table, dim=0).shape[0] == 24


def test_axial_embedding_gradients_reach_every_row():
    emb = AxialPositionalEmbedding((4, 6), (3, 5), init_std=1.0)
    emb(24).sum().backward()
    # Each row of axis 0 is used by 6 positions, each row of axis 1 by 4.
    assert torch.equal(emb.weights[0].grad, torch.full((4, 3), 6.0))
    assert torch.equal(emb.weights[1].grad, torch.full((6, 5), 4.0))


def test_axial_embedding_rejects_lengths_beyond_the_grid():
    emb = AxialPositionalEmbedding((4, 6), (3, 5), init_std=1.0)
    with pytest.raises(ValueError, match=r"sequence length 25 exceeds the 24 positions") as info:
        emb(25)
    assert "axial_pos_shape=(4, 6)" in str(info.value)


def test_learned_embedding():
    emb = LearnedPositionalEmbedding(max_seq_len=10, d_model=4, init_std=1.0)
    assert emb(7).shape == (7, 4)
    assert torch.equal(emb(7), emb.weight[:7])


def test_sinusoidal_embedding_is_the_formula_at_any_offset():
    emb = SinusoidalPositionalEmbedding(d_model=6).double()
    table = emb(50)
    p, i = 37, 2  # the third frequency: columns 4 (sine) and 5 (cosine)
    w = 10000.0 ** (-2 * i / 6)
    assert table[p, 2 * i].item() == pytest.approx(math.sin(p * w), abs=1e-15)
    assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p * w), abs=1e-15)
    assert torch.equal(emb(20, offset=30), table[30:])  # a slice or a decoding step: same rows
    assert not list(emb.parameters()) and not emb.state_dict()  # nothing to learn or save
    assert emb.float()(3).dtype == torch.float32


def test_sinusoidal_rows_reflect_linearly():
    # why reversal learns with them: PE[c - p] = A PE[p] for one fixed matrix A
    emb = SinusoidalPositionalEmbedding(d_model=8).double()
    table = emb(64)
    c = 63
    A = torch.linalg.lstsq(table, table.flip(0)).solution  # rows p -> rows c - p
    assert torch.allclose(table @ A, table.flip(0), atol=1e-9)
    assert torch.allclose(emb(1, offset=10) @ A, emb(1, offset=c - 10), atol=1e-9)


def test_positional_embedding_follows_the_config():
    base = dict(d_model=8, n_heads=2, max_seq_len=20)
    axial = positional_embedding(ReformerConfig(**base, axial_pos_shape=(4, 5)))
    assert isinstance(axial, AxialPositionalEmbedding) and axial.shape == (4, 5)
    assert axial(20).shape == (20, 8)
    learned = positional_embedding(ReformerConfig(**base, pos_embedding="learned"))
    assert isinstance(learned, LearnedPositionalEmbedding)
    assert learned.weight.shape == (20, 8)
    assert positional_embedding(ReformerConfig(**base, pos_embedding="none")) is None
    fixed = positional_embedding(ReformerConfig(**base, pos_embedding="sinusoidal"))
    assert isinstance(fixed, SinusoidalPositionalEmbedding) and fixed(20).shape == (20, 8)
    with pytest.raises(ValueError, match=r"d_model=7 must be even for sinusoidal"):
        ReformerConfig(d_model=7, n_heads=1, d_head=4, pos_embedding="sinusoidal")


def test_init_std_scales_the_tables():
    torch.manual_seed(0)
    small = AxialPositionalEmbedding((50, 50), (4, 4), init_std=0.01)
    assert 0.005 < small.weights[0].std().item() < 0.02
