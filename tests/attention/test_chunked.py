"""The chunk attention kernel's hand-written backward against plain autograd."""

import pytest
import torch

from reformer.attention._chunked import MASK_VALUE, SELF_VALUE, attend_chunks, look_around


def autograd_attend(q, k, v, qpos, kpos, causal, key_valid, self_mask, scale, log_count, p):
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if log_count is not None:
        logits = logits - log_count
    qp, kp = qpos.unsqueeze(-1), kpos.unsqueeze(-2)
    if self_mask:
        logits = logits.masked_fill(qp == kp, SELF_VALUE)
    invalid = (kp > qp) if causal else torch.zeros_like(qp == kp)
    if key_valid is not None:
        invalid = invalid | ~key_valid.unsqueeze(-2)
    logits = logits.masked_fill(invalid, MASK_VALUE)
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    if p > 0:
        probs = probs * torch.empty_like(probs).bernoulli_(1 - p).div_(1 - p)
    return probs @ v, lse


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("self_mask", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_count", [True, False])
def test_kernel_matches_autograd(causal, self_mask, dropout, with_count):
    g = torch.Generator().manual_seed(1)
    n, M, E = 3, 4, 5
    qpos = torch.randperm(n * M, generator=g).view(n, M)
    kpos = look_around(qpos, [-1, 0], dim=0)  # (n, 2M)
    q = torch.randn(2, n, M, E, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, n, 2 * M, E, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, n, 2 * M, E, dtype=torch.float64, generator=g, requires_grad=True)
    key_valid = torch.rand(2, n, 2 * M, generator=g) > 0.2
    log_count = (torch.randint(1, 3, (2, n, M, 2 * M), generator=g).double().log()
                 if with_count else None)
    w_out = torch.randn(2, n, M, E, dtype=torch.float64, generator=g)
    w_lse = torch.randn(2, n, M, dtype=torch.float64, generator=g)
    results = []
    for fn in (attend_chunks, None):
        torch.manual_seed(7)
        if fn is None:
            out, lse = autograd_attend(q, k, v, qpos, kpos, causal, key_valid, self_mask, 0.7,
                                       log_count, dropout)
        else:
            out, lse = fn(q, k, v, qpos, kpos, causal=causal, key_valid=key_valid,
                          self_mask=self_mask, scale=0.7, log_count=log_count, dropout=dropout)
        loss = (out * w_out).sum() + (lse * w_lse).sum()
        grads = torch.autograd.grad(loss, [q, k, v])
        results.append((out, lse, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()
