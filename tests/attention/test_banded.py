"""The cuda plan's attention cores (attention/_banded.py) against the blockwise kernels.

Both ways of computing the banded call are held to the reference in float64: the tensor-
operator version (what the cuda plan runs on the CPU) and FlexAttention's eager reference,
reached on the CPU through a test-only switch (FlexAttention refuses gradients on CPU
tensors; its compiled Triton kernels are tested by tests/test_cuda.py on a GPU). Outputs are
compared on real positions: a padded query's output is meaningless either way.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

from reformer.attention import _banded
from reformer.attention._chunked import window_offsets
from reformer.attention.full import full_attention
from reformer.attention.local import local_attention
from reformer.attention.lsh import bucketed_attention
from reformer.config import ReformerConfig
from reformer.hashing import hash_vectors, sample_rotations

F64 = torch.float64
TOL = 1e-9


@pytest.fixture(params=["tensor ops", "flex"])
def backend(request, monkeypatch):
    """Run the banded call with tensor operators, or through FlexAttention's eager path."""
    if request.param == "flex":
        monkeypatch.setattr(_banded, "FLEX_ON_CPU", True)
        monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    return request.param


def inputs(seed: int, B: int, H: int, L: int, E: int, masked: bool):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(B, H, L, E, dtype=F64, generator=g).requires_grad_(True)
    v = torch.randn(B, H, L, E, dtype=F64, generator=g).requires_grad_(True)
    mask = None
    if masked:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[-1, L - L // 3:] = False  # the last sequence ends early
    return qk, v, mask


def assert_same(fast: torch.Tensor, ref: torch.Tensor, inputs: list[torch.Tensor],
                real: torch.Tensor) -> None:
    """Outputs on real positions, and the gradients of a random weighting of them."""
    keep = real[:, None, :, None].to(F64)
    assert (fast - ref).mul(keep).abs().max() <= TOL
    w = torch.randn(ref.shape, dtype=F64, generator=torch.Generator().manual_seed(9)) * keep
    want = torch.autograd.grad((ref * w).sum(), inputs, retain_graph=True)
    got = torch.autograd.grad((fast * w).sum(), inputs)
    for g, r in zip(got, want, strict=True):
        assert (g - r).abs().max() <= TOL * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rounds, factors, before", [(1, 8, 1), (3, 8, 1), (2, [4, 2], 2),
                                                     (4, 2, 1)])
def test_lsh_banded_matches_blockwise(backend, causal, masked, rounds, factors, before):
    B, H, L, E, M = 2, 2, 96, 8, 8
    qk, v, mask = inputs(rounds + before, B, H, L, E, masked)
    rot = sample_rotations(H, E, rounds, factors, seed=3)
    buckets = hash_vectors(qk.detach(), rot, mask)
    after = 0 if causal else 1
    ref = bucketed_attention(qk, v, buckets, chunk_length=M, n_chunks_before=before,
                             n_chunks_after=after, causal=causal, attention_mask=mask)
    fast = _banded.lsh_banded(qk, v, buckets, chunk_length=M,
                              offsets=window_offsets(rounds * L // M, before, after),
                              causal=causal, attention_mask=mask)
    real = torch.ones(B, L, dtype=torch.bool) if mask is None else mask
    assert_same(fast, ref, [qk, v], real)


def test_lsh_banded_window_wider_than_the_sequence(backend):
    # 2 chunks in all, a window of 3: each chunk is taken once, as the blockwise kernel does
    qk, v, _ = inputs(5, 1, 2, 8, 4, False)
    buckets = hash_vectors(qk.detach(), sample_rotations(2, 4, 1, 4, seed=0))
    ref = bucketed_attention(qk, v, buckets, chunk_length=4, n_chunks_before=1,
                             n_chunks_after=1, causal=False)
    fast = _banded.lsh_banded(qk, v, buckets, chunk_length=4, offsets=window_offsets(2, 1, 1),
                              causal=False, attention_mask=None)
    assert_same(fast, ref, [qk, v], torch.ones(1, 8, dtype=torch.bool))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_local_banded_matches_blockwise(backend, causal, masked):
    from reformer.attention.local import _local_banded

    B, H, L, E = 2, 2, 90, 8  # 90 = 11 chunks of 8 and 2 positions: padded
    q, v, mask = inputs(1, B, H, L, E, masked)
    k = torch.randn(B, H, L, E, dtype=F64).requires_grad_(True)
    cfg = ReformerConfig(d_model=16, n_heads=2, local_chunk_length=8, causal=causal,
                         n_chunks_after=0 if causal else 1, vocab_size=8, max_seq_len=L)
    ref = local_attention(q, k, v, chunk_length=8, n_chunks_before=1,
                          n_chunks_after=cfg.n_chunks_after, causal=causal, attention_mask=mask)
    real = torch.ones(B, L, dtype=torch.bool) if mask is None else mask
    assert_same(_local_banded(q, k, v, cfg, mask), ref, [q, k, v], real)


@pytest.mark.parametrize("causal", [True, False])
def test_full_attention_through_flex(monkeypatch, causal):
    monkeypatch.setattr(_banded, "FLEX_ON_CPU", True)
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    from reformer.attention.full import FullSelfAttention

    qk, v, mask = inputs(2, 2, 2, 40, 8, True)
    cfg = ReformerConfig(d_model=16, n_heads=2, causal=causal, vocab_size=8, max_seq_len=40,
                         attn_layers=("full",), n_chunks_after=0 if causal else 1)
    fast = FullSelfAttention(cfg).core([qk, v], slice(0, 2), None, mask)
    ref = full_attention(qk, v, causal=causal, attention_mask=mask)
    assert_same(fast, ref, [qk, v], mask)


@pytest.mark.parametrize("circular", [True, False])
def test_band_block_mask_is_the_band_both_ways(circular):
    n, block, offsets = 6, 4, [-2, -1, 0, 1]
    mask = _banded.band_block_mask(n, tuple(offsets), circular, block, torch.device("cpu"))
    want = torch.zeros(n, n, dtype=torch.int32)
    for i in range(n):
        for o in offsets:
            if circular or 0 <= i + o < n:
                want[i, (i + o) % n] = 1
    assert torch.equal(mask.to_dense()[0, 0], want)  # key blocks of each query block
    q_dense = torch.zeros(n, n, dtype=torch.int32)  # the transposed arrays, read by hand
    for j in range(n):
        for slot in range(int(mask.full_q_num_blocks[0, 0, j])):
            q_dense[int(mask.full_q_indices[0, 0, j, slot]), j] = 1
    assert torch.equal(q_dense, want)
    assert int(mask.kv_num_blocks.sum()) == 0  # every block "full": no mask function there
    # element by element, the mask function is the same band (FlexAttention's eager path)
    pos = torch.arange(n * block)
    dense = mask.mask_mod(0, 0, pos[:, None], pos[None, :])
    assert torch.equal(dense, want.repeat_interleave(block, 0).repeat_interleave(block, 1)
                       .bool())


def test_band_block_mask_for_the_kernels_is_n_by_w():
    # what a GPU gets: (n, W) arrays, the padded ones' first W columns
    wide = _banded.band_block_mask(1000, (-1, 0), True, 64, torch.device("cpu"))
    compact = _banded.band_block_mask(1000, (-1, 0), True, 64, torch.device("cpu"), compact=True)
    for name in ("full_kv_indices", "full_q_indices"):
        assert getattr(compact, name).shape[-2:] == (1000, 2)
        assert torch.equal(getattr(compact, name), getattr(wide, name)[..., :2])
    assert torch.equal(compact.full_kv_num_blocks, wide.full_kv_num_blocks)
