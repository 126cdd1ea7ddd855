"""The sorted-order LSH kernel (attention/_sorted.py) against plain autograd.

The reference builds the sorted sequence explicitly, scores every chunk against its window
with dense additive masks, unsorts each round and combines the rounds with a softmax over
their log-sum-exps; autograd differentiates it. The kernel must agree on the output, the
log-sum-exp and the gradients of the shared queries/keys and of the values, whether it keeps
its blocks for the backward or recomputes them, in one block or many.
"""

from __future__ import annotations

import pytest
import torch

from reformer.attention import _chunked
from reformer.attention._sorted import sorted_window_attention

F64 = torch.float64
MASK, SELF = _chunked.MASK_VALUE, _chunked.SELF_VALUE


def reference(q, v, s_pos, valid, M, offsets, causal, log_count):
    G, Lp, E = q.shape
    k = torch.nn.functional.normalize(q, dim=-1)
    R, n = s_pos.shape[1] // Lp, s_pos.shape[1] // M
    idx = s_pos.unsqueeze(-1).expand(-1, -1, E)
    sq, sk, sv = q.gather(1, idx), k.gather(1, idx), v.gather(1, idx)  # (G, R*Lp, E)
    g = torch.arange(G)[:, None, None]
    outs, lses = [], []
    for c in range(n):
        qs = torch.arange(c * M, (c + 1) * M)
        ks = torch.cat([torch.arange(((c + o) % n) * M, ((c + o) % n + 1) * M) for o in offsets])
        qp, kp = s_pos[:, qs].unsqueeze(-1), s_pos[:, ks].unsqueeze(-2)  # (G, M, 1), (G, 1, K)
        bias = SELF * (kp == qp) - log_count[g, qp, kp]
        if causal:
            bias = bias + MASK * (kp > qp)
        if valid is not None:
            bias = bias + MASK * ~valid[g, kp]
        logits = sq[:, qs] @ sk[:, ks].transpose(1, 2) + bias  # (G, M, K)
        outs.append(torch.softmax(logits, -1) @ sv[:, ks])
        lses.append(torch.logsumexp(logits, -1))
    o_sorted, z_sorted = torch.cat(outs, 1), torch.cat(lses, 1)  # (G, R*Lp, E), (G, R*Lp)
    o_rounds, z_rounds = [], []
    for r in range(R):  # unsort: position s_pos[g, r*Lp + j] gets slot r*Lp + j
        slots = slice(r * Lp, (r + 1) * Lp)
        pos = s_pos[:, slots]
        o_rounds.append(torch.zeros_like(q).scatter(1, pos.unsqueeze(-1).expand(-1, -1, E),
                                                    o_sorted[:, slots]))
        z_rounds.append(torch.zeros(G, Lp, dtype=F64).scatter(1, pos, z_sorted[:, slots]))
    z = torch.stack(z_rounds)  # (R, G, Lp)
    lse = torch.logsumexp(z, 0)
    out = sum(torch.exp(z[r] - lse).unsqueeze(-1) * o_rounds[r] for r in range(R))
    return out, lse


def inputs(seed, G=2, Lp=12, R=2, E=4):
    gen = torch.Generator().manual_seed(seed)
    q, v = (torch.randn(G, Lp, E, dtype=F64, generator=gen, requires_grad=True)
            for _ in range(2))
    s_pos = torch.cat([torch.stack([torch.randperm(Lp, generator=gen) for _ in range(G)])
                       for _ in range(R)], 1)  # (G, R*Lp)
    valid = torch.rand(G, Lp, generator=gen) > 0.2
    valid[:, 0] = True  # every causal query has at least one real key
    log_count = torch.randint(1, 3, (G, Lp, Lp), generator=gen).double().log()
    w_out = torch.randn(G, Lp, E, dtype=F64, generator=gen)
    w_lse = torch.randn(G, Lp, dtype=F64, generator=gen)
    return q, v, s_pos, valid, log_count, w_out, w_lse


def count_fn_of(log_count):
    G = log_count.shape[0]

    def count_fn(qpos, kpos):  # the kernel passes float positions (G, nb, M), (G, nb, K)
        g = torch.arange(G)[:, None, None, None]
        return log_count[g, qpos.long().unsqueeze(-1), kpos.long().unsqueeze(-2)]
    return count_fn


@pytest.mark.parametrize("save_elements", [0, 1 << 25])  # recompute or keep the blocks
@pytest.mark.parametrize("block_elements", [1 << 19, 20])  # one block per round; many
@pytest.mark.parametrize("offsets", [[-1, 0], [-2, -1, 0, 1], [0]])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rounds", [1, 3])
@pytest.mark.parametrize("masks", [True, False])  # padding and de-duplication counts, or none
def test_kernel_matches_reference(monkeypatch, save_elements, block_elements, offsets, causal,
                                  rounds, masks):
    monkeypatch.setattr(_chunked, "BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(_chunked, "SAVE_ELEMENTS", save_elements)
    q, v, s_pos, valid, log_count, w_out, w_lse = inputs(rounds, R=rounds)
    if not masks:
        valid, log_count = None, torch.zeros_like(log_count)
    # A query whose every key is masked (padding, future) has a meaningless output: weigh it 0.
    with torch.no_grad():
        usable = reference(q, v, s_pos, valid, 3, offsets, causal, log_count)[1] > MASK / 2
    w_out, w_lse = w_out * usable.unsqueeze(-1), w_lse * usable
    results = []
    for kernel in (True, False):
        if kernel:
            out, lse = sorted_window_attention(q, v, s_pos, chunk_length=3, offsets=offsets,
                                               causal=causal, valid=valid,
                                               log_count_fn=count_fn_of(log_count) if masks
                                               else None)
        else:
            out, lse = reference(q, v, s_pos, valid, 3, offsets, causal, log_count)
        loss = (out * w_out).sum() + (lse * w_lse).sum()
        results.append((out[usable], lse[usable], *torch.autograd.grad(loss, [q, v])))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("save_elements", [0, 1 << 25])
def test_dropout_gradients_are_exact(monkeypatch, save_elements):
    """The backward replays the forward's dropout masks (finite differences agree)."""
    monkeypatch.setattr(_chunked, "BLOCK_ELEMENTS", 20)
    monkeypatch.setattr(_chunked, "SAVE_ELEMENTS", save_elements)
    q, v, s_pos, valid, _, w_out, _ = inputs(5, Lp=6, R=2)

    def f(q, v):
        torch.manual_seed(3)  # the same masks at every evaluation
        out, _ = sorted_window_attention(q, v, s_pos, chunk_length=3, offsets=[-1, 0],
                                         causal=True, valid=valid, dropout=0.4)
        return out * w_out

    assert torch.autograd.gradcheck(f, (q, v), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("offsets", [[-2, 0], [-2, -1]])
def test_rejects_offsets_with_gaps_or_without_the_chunk_itself(offsets):
    q, v, s_pos, *_ = inputs(0)
    with pytest.raises(ValueError, match="consecutive chunk offsets including 0"):
        sorted_window_attention(q, v, s_pos, chunk_length=3, offsets=offsets, causal=True)


def test_a_given_slot_map_matches_the_computed_one():
    q, v, s_pos, *_ = inputs(0)
    G, RL = s_pos.shape
    Lp = q.shape[1]
    s_slot = torch.empty_like(s_pos)
    for g in range(G):
        for slot in range(RL):
            s_slot[g, slot // Lp * Lp + s_pos[g, slot]] = slot
    shuffled = s_slot.view(G, -1, Lp).flip(-1).reshape(G, RL)  # each round's slots, reordered
    given, computed, wrong = (sorted_window_attention(q, v, s_pos, s_slot=m, chunk_length=3,
                                                      offsets=[-1, 0], causal=True)[0]
                              for m in (s_slot, None, shuffled))
    assert torch.equal(given, computed)
    assert not torch.allclose(wrong, computed)  # the given map is the one used


def test_rejects_a_slot_map_of_the_wrong_shape():
    q, v, s_pos, *_ = inputs(0)
    with pytest.raises(ValueError, match="s_slot has shape"):
        sorted_window_attention(q, v, s_pos, s_slot=s_pos[:, 1:], chunk_length=3,
                                offsets=[-1, 0], causal=True)


def test_rejects_lengths_that_are_not_chunk_multiples():
    q, v, s_pos, *_ = inputs(0)
    with pytest.raises(ValueError, match="chunk_length=5"):
        sorted_window_attention(q, v, s_pos, chunk_length=5, offsets=[-1, 0], causal=True)
