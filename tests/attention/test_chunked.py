"""The chunk-window kernel (blocked, hand-written backward) against plain autograd."""

import pytest
import torch

from reformer._dropout import AttentionDropout
from reformer.attention import _chunked
from reformer.attention._chunked import MASK_VALUE, SELF_VALUE, chunk_window_attention


def windows(x, offsets, circular, fill):
    """(G, n, M, ...) -> (G, n, W*M, ...): the chunks at ``offsets`` from each chunk."""
    n = x.shape[1]
    parts = []
    for d in offsets:
        idx = torch.arange(n) + d
        part = x[:, idx % n]
        if not circular:
            part = part.clone()
            part[:, (idx < 0) | (idx >= n)] = fill
        parts.append(part)
    return torch.cat(parts, dim=2)


def autograd_attention(q, k, v, pos, valid, offsets, circular, causal, self_mask, scale,
                       log_count, dropout):
    qpos = pos.unsqueeze(-1)
    kpos = windows(pos, offsets, circular, -1).unsqueeze(-2)
    logits = q @ windows(k, offsets, circular, 0).transpose(-1, -2) * scale
    if log_count is not None:
        logits = logits - log_count
    if self_mask:  # masks are added (DESIGN.md 1.2)
        logits = logits + (qpos == kpos) * SELF_VALUE
    invalid = (kpos > qpos) if causal else torch.zeros_like(qpos == kpos)
    invalid = invalid | (kpos < 0)
    if valid is not None:
        invalid = invalid | ~windows(valid, offsets, circular, False).unsqueeze(-2)
    logits = logits + invalid * MASK_VALUE
    lse = torch.logsumexp(logits, -1)
    probs = torch.softmax(logits, -1)  # exact also for all-masked rows at -1e9
    if dropout is not None:  # the keyed masks of every chunk at once
        G, n, M, K = probs.shape
        probs = probs * dropout.blocks(0, n, M, K, q)
    return probs @ windows(v, offsets, circular, 0), lse


@pytest.mark.parametrize("save_elements", [0, 1 << 25])  # recompute or keep probabilities
@pytest.mark.parametrize("block_elements", [1 << 19, 40])  # one block; many blocks
@pytest.mark.parametrize("circular,offsets", [(True, [-1, 0]), (True, [-2, 0, 1]),
                                              (False, [-1, 0]), (False, [-2, 0, 1])])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_kernel_matches_autograd(monkeypatch, save_elements, block_elements, circular, offsets,
                                 causal, dropout):
    monkeypatch.setattr(_chunked, "BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(_chunked, "SAVE_ELEMENTS", save_elements)
    g = torch.Generator().manual_seed(1)
    G, n, M, E = 2, 5, 3, 4
    K = M * len(offsets)
    pos = torch.stack([torch.randperm(n * M, generator=g) for _ in range(G)]).view(G, n, M)
    q, k, v = (torch.randn(G, n, M, E, dtype=torch.float64, generator=g, requires_grad=True)
               for _ in range(3))
    valid = torch.rand(G, n, M, generator=g) > 0.2
    log_count = torch.randint(1, 3, (G, n, M, K), generator=g).double().log()
    # Rows with no valid key at all (padding queries) are meaningless: weigh them 0.
    kpos = windows(pos, offsets, circular, -1).unsqueeze(-2)
    usable = (kpos <= pos.unsqueeze(-1)) | (not causal)
    usable = usable & (kpos >= 0)  # (G, n, M, K)
    usable = (usable & windows(valid, offsets, circular, False).unsqueeze(-2)).any(-1)
    w_out = torch.randn(G, n, M, E, dtype=torch.float64, generator=g) * usable.unsqueeze(-1)
    w_lse = torch.randn(G, n, M, dtype=torch.float64, generator=g) * usable

    def count_fn(qpos, kpos):  # look the block's pairs up by position
        table = torch.zeros(G, n * M, n * M, dtype=torch.float64)
        kp = windows(pos, offsets, circular, -1)
        table[torch.arange(G)[:, None, None, None], pos.unsqueeze(-1), kp.unsqueeze(-2)] = \
            log_count
        qpos, kpos = qpos.long(), kpos.long()  # the kernel passes float positions
        return table[torch.arange(G)[:, None, None, None], qpos.unsqueeze(-1),
                     kpos.clamp(min=0).unsqueeze(-2)]

    drop = AttentionDropout(dropout, seed=7) if dropout else None  # blocks see one mask
    results = []
    for kernel in (True, False):
        if kernel:
            out, lse = chunk_window_attention(
                q, k, v, pos, offsets=offsets, circular=circular, causal=causal, c_valid=valid,
                self_mask=True, scale=0.7, log_count_fn=count_fn, dropout=drop or 0.0)
        else:
            out, lse = autograd_attention(q, k, v, pos, valid, offsets, circular, causal, True,
                                          0.7, log_count, drop)
        loss = (out * w_out).sum() + (lse * w_lse).sum()
        grads = torch.autograd.grad(loss, [q, k, v])
        results.append((out[usable], lse[usable], *grads))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("save_elements", [0, 1 << 25])
@pytest.mark.parametrize("circular", [True, False])
def test_kernel_gradient_with_dropout_over_many_blocks(monkeypatch, save_elements, circular):
    """The backward rebuilds (or keeps) each block's dropout mask of the forward."""
    monkeypatch.setattr(_chunked, "BLOCK_ELEMENTS", 30)
    monkeypatch.setattr(_chunked, "SAVE_ELEMENTS", save_elements)
    g = torch.Generator().manual_seed(2)
    G, n, M, E = 1, 4, 2, 3
    pos = torch.randperm(n * M, generator=g).view(1, n, M)
    q, k, v = (torch.randn(G, n, M, E, dtype=torch.float64, generator=g, requires_grad=True)
               for _ in range(3))

    def f(q, k, v):
        torch.manual_seed(3)  # the same masks at every evaluation
        out, lse = chunk_window_attention(q, k, v, pos, offsets=[-1, 0], circular=circular,
                                          causal=True, self_mask=True, dropout=0.4)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)
