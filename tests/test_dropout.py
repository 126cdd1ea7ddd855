"""Dropout masks keyed by what they drop (reformer._dropout): their statistics, and that a
mask does not depend on how the work is cut (rows, slices of positions, chunks, head
slices), which is what lets the reversible backward and sequence parallelism rebuild it."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, needs_compiler, random_ids
from reformer import ReformerConfig, ReformerLM, _native
from reformer._dropout import AttentionDropout, PositionDropout


def test_masks_keep_one_minus_p_scaled_up():
    x = torch.zeros(2, 1000, 64, dtype=torch.float64)
    keep = PositionDropout(0.3, seed=5, length=1000).like(x)
    assert set(keep.unique().tolist()) == {0.0, 1 / 0.7}
    dropped = (keep == 0).double().mean().item()
    assert abs(dropped - 0.3) < 0.01  # 128,000 draws: the standard error is 0.0013
    # neighbouring positions and features are not alike (a weak hash would correlate them)
    kept = (keep > 0).double().flatten(0, 1)  # (2000, 64)
    for a, b in ((kept[:-1], kept[1:]), (kept[:, :-1], kept[:, 1:])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 0.03


def test_seeds_and_sequences_give_other_masks():
    x = torch.zeros(2, 50, 16)
    keep = PositionDropout(0.5, seed=1, length=50).like(x)
    assert torch.equal(keep, PositionDropout(0.5, seed=1, length=50).like(x))
    assert not torch.equal(keep, PositionDropout(0.5, seed=2, length=50).like(x))
    assert not torch.equal(keep[0], keep[1])


def test_a_slice_of_positions_gets_the_whole_sequences_mask():
    whole = PositionDropout(0.4, seed=3, length=30).like(torch.zeros(3, 30, 8))
    part = PositionDropout(0.4, seed=3, length=10, start=7).like(torch.zeros(3, 10, 8))
    assert torch.equal(part, whole[:, 7:17])
    rows = PositionDropout(0.4, seed=3, length=30).rows(slice(25, 70), torch.zeros(1, 8))
    assert torch.equal(rows, whole.reshape(-1, 8)[25:70])


def test_attention_masks_do_not_depend_on_blocks_or_head_slices():
    like = torch.zeros(2 * 4, 1)
    drop = AttentionDropout.heads(0.3, 9, batch=2, heads=slice(0, 4), n_heads=4,
                                  device=like.device)
    whole = drop.blocks(0, 6, 3, 9, like)  # (G=8, nb=6, M=3, K=9)
    assert torch.equal(drop.blocks(2, 5, 3, 9, like), whole[:, 2:5])
    part = AttentionDropout.heads(0.3, 9, batch=2, heads=slice(2, 4), n_heads=4,
                                  device=like.device)
    rows = torch.tensor([2, 3, 6, 7])  # sequence b, head h: row 4b + h
    assert torch.equal(part.blocks(0, 6, 3, 9, torch.zeros(4, 1)), whole[rows])
    dense = drop.queries(torch.arange(5), 5, like)
    assert torch.equal(drop.queries(torch.arange(2, 4), 5, like), dense[:, 2:4])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_native_masks_are_the_pytorch_ops_bits(monkeypatch, dtype):
    drop = PositionDropout(0.37, seed=12345, length=300, start=1 << 20)
    x = torch.zeros(3, 300, 40, dtype=dtype)
    masks = []
    for setting in ("on", "off"):
        monkeypatch.setenv(_native.ENV, setting)
        assert _native.available() == (setting == "on")
        masks.append(drop.like(x))
    native, plain = masks
    assert native.dtype == plain.dtype == dtype
    assert torch.equal(native, plain)


def test_attention_dropout_keys_its_rows():
    with pytest.raises(ValueError, match="attention dropout keys 8 rows; the kernel has G=3"):
        AttentionDropout(0.1, 0, torch.arange(8)).blocks(0, 1, 2, 2, torch.zeros(3, 1))


@pytest.mark.parametrize("reversible", [True, False])
def test_a_models_masks_do_not_depend_on_its_chunking(reversible):
    """The same weights and seed give the same training-mode outputs and gradients whatever
    the feed-forward chunks and head slices (with masks drawn in order of the work, they
    differ)."""
    results = []
    for ff_chunk, heads in ((5, 1), (4096, 4)):
        torch.manual_seed(0)
        config = ReformerConfig(**{**TINY, "n_heads": 4, "d_model": 16}, dropout=0.3,
                                attention_dropout=0.3, ff_chunk_size=ff_chunk,
                                attn_head_chunk_size=heads, reversible=reversible)
        model = ReformerLM(config).double().train()
        tokens = random_ids(2, 20, seed=3)
        torch.manual_seed(1)
        out = model(tokens, labels=tokens)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits_a, grads_a), (logits_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=1e-12)
    for name, g in grads_a.items():
        torch.testing.assert_close(g, grads_b[name], rtol=0, atol=1e-10, msg=name)
