"""Float32 LSH attention against float64 at every position, self-only queries included.

A query whose windows hold no valid key but itself (causal position 0 always; others when
their windows hold only later or padded keys) has z_r = |q| - 1e5 in every round. Near 1e5
float32's spacing is 0.0078, so combining rounds through a rounded log-sum-exp,
exp(z_r - logsumexp_r z), gave weights that summed to 1 +- 4e-3 and an output of
v (1 +- 4e-3). The rounds are now combined so that the weights sum to one in the working
precision (issue 20); these tests hold every path to float64: the fused C++ kernel (no
padding), the blockwise path with the native helper ops (padding), and PyTorch ops alone.

Buckets are hashed once, in float64, and passed to both precisions: a float32 hash may
break a near tie differently, which would compare two different functions.
"""

from __future__ import annotations

import pytest
import torch

from reformer import _native
from reformer.attention._chunked import padded_mask
from reformer.attention.lsh import bucketed_attention
from reformer.hashing import hash_vectors

B, H, L, E, M = 2, 2, 1024, 16, 64
TOL = 1e-5


def _inputs(rounds: int, padded: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
    rotations = torch.randn(H, E, rounds, L // M, generator=g, dtype=torch.float64)  # NB 2L/M
    mask = None
    if padded:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[0, -100:] = False  # padding at the end
        mask[1, torch.randperm(L, generator=g)[:300]] = False  # and holes
    buckets = hash_vectors(qk, rotations, padded_mask(mask, B, L, L, qk.device))
    grad = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
    if padded:  # a padded query's output is never used (nor defined: it sees only padding)
        grad = grad * mask[:, None, :, None]
    return qk, v, buckets, mask, grad


def _attend(qk, v, buckets, mask, grad, causal, dtype):
    qk, v = (t.detach().to(dtype).requires_grad_() for t in (qk, v))
    out = bucketed_attention(qk, v, buckets, chunk_length=M, causal=causal,
                             attention_mask=mask)
    out.backward(grad.to(dtype))
    return out.detach().double(), qk.grad.double(), v.grad.double()


def _row_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| per position (over E), relative to that position's |want|."""
    return (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)


@pytest.mark.parametrize("native", ["on", "off"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("rounds", [1, 2, 4, 8], ids=lambda r: f"R{r}")
def test_float32_matches_float64_at_every_position(monkeypatch, rounds, causal, padded,
                                                   native):
    monkeypatch.setenv(_native.ENV, native)
    qk, v, buckets, mask, grad = _inputs(rounds, padded, seed=rounds * 4 + 2 * causal + padded)
    want = _attend(qk, v, buckets, mask, grad, causal, torch.float64)
    got = _attend(qk, v, buckets, mask, grad, causal, torch.float32)
    real = torch.ones(B, L, dtype=torch.bool) if mask is None else mask
    real = real[:, None].expand(B, H, L)
    out_err = _row_errors(got[0], want[0])[real]
    assert out_err.max() <= TOL, f"output: worst position {out_err.max():.2e} relative"
    if causal:  # position 0 (where it is real) sees only itself: its output is its value
        assert _row_errors(got[0][:, :, 0], v[:, :, 0])[real[:, :, 0]].max() <= TOL
    # gradients: each position's error against the largest gradient row of the tensor (a
    # row's own norm can be tiny where its contributions cancel)
    for name, g32, g64 in (("qk", got[1], want[1]), ("v", got[2], want[2])):
        err = (g32 - g64).norm(dim=-1).max() / g64.norm(dim=-1).max()
        assert err <= TOL, f"grad {name}: {err:.2e} relative"
