"""Shared pieces of chunked attention: masks, padding, and the chunk-window kernel.

Both LSH attention (chunks of the bucket-sorted sequence) and local attention (chunks of the
sequence in position order) reduce to the same computation: each chunk of M queries attends to
a window of K = W*M keys, the chunks at W fixed offsets from it, with masks that depend only on
the original positions of the query and key. This module holds that computation once.

Shapes: G = B*H independent sequences, n chunks, M items per chunk, W window chunks,
K = W*M keys per window, E head size, nb chunks per block. Prefix ``c_``: chunked.

Decisions:
- The kernel (:class:`ChunkWindowAttention`) works a block of chunks at a time, in the forward
  and again in its backward (flash-attention style): it keeps q, k, v, the output and the
  log-sum-exp, and recomputes each block's scores, so no (n, M, K) tensor ever exists for the
  whole sequence and the (block, M, K) temporaries stay in cache. Below ``SAVE_ELEMENTS`` it
  keeps the blocks' probabilities instead: the reversible backward calls this forward (for
  one head slice) immediately before its backward, so a third computation would be waste.
  Key windows are gathered per block by chunk index; nothing W times the size of k or v is
  built.
- Masks are ADDED to the logits (DESIGN.md 1.2), built arithmetically from positions and
  folded into the score matmul: invalid keys (padding, or later positions under causality)
  get ``MASK_VALUE``; a query's own position gets ``SELF_VALUE`` (shared-QK attention only),
  so that it attends to itself only when nothing else is valid. Since |q . k_hat| is tiny next
  to these values, the outputs equal those of replacing the logits (to rounding), except in
  rows with no valid key at all (padding queries), whose output is meaningless either way.
  Both values stay finite in bf16 and are reduced for fp16, whose largest value is 65504.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from reformer import _native
from reformer._dropout import AttentionDropout

MASK_VALUE = -1e9
SELF_VALUE = -1e5
BLOCK_ELEMENTS = 1 << 19  # scores per block: 2 MiB in float32, cache-sized
SAVE_ELEMENTS = 1 << 27  # keep probabilities for the backward up to this size (512 MiB fp32)


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """(invalid, self) logit values representable in ``dtype``."""
    if dtype == torch.float16:
        return -3e4, -1e4
    return MASK_VALUE, SELF_VALUE


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type of log-sum-exps for scores in ``dtype``: at least float32 (16-bit types cannot
    hold log R next to the masked logits' -1e5, see _sorted.py)."""
    return torch.promote_types(dtype, torch.float32)


def unit_keys(qk: torch.Tensor, key_offset: float = 0.0) -> torch.Tensor:
    """Shared-QK keys in qk's dtype: ``q / |q|`` (F.normalize), or with ``key_offset`` c > 0
    Hugging Face's ``q / sqrt(|q|^2 + c)`` (``hf_compat``: c = E * 1e-6)."""
    if not key_offset:
        return F.normalize(qk, dim=-1).to(qk.dtype)  # CUDA autocast computes norms in fp32
    return (qk * torch.rsqrt(qk.square().sum(dim=-1, keepdim=True) + key_offset)).to(qk.dtype)


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` up to a multiple of ``multiple``."""
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


def padded_mask(attention_mask: torch.Tensor | None, batch: int, length: int,
                padded_length: int, device: torch.device) -> torch.Tensor | None:
    """The (B, Lp) key-validity mask after padding L to Lp (None when nothing is masked)."""
    if attention_mask is None and padded_length == length:
        return None
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                         f"(B, L) = {(batch, length)}; pass one bool per token (True = real)")
    return F.pad(attention_mask.bool(), (0, padded_length - length), value=False)


def window_offsets(n_chunks: int, n_before: int, n_after: int) -> list[int]:
    """Chunk offsets of a window, each neighbour once even when the window wraps onto itself."""
    offsets = list(range(-n_before, n_after + 1))
    return offsets if len(offsets) <= n_chunks else list(range(n_chunks))


def default_scale(d_head: int) -> float:
    """1/sqrt(E), the scale of attention with separate queries and keys."""
    return 1.0 / math.sqrt(d_head)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[g, index[g, i]]`` for (G, L, E) ``x`` and (G, N) ``index`` -> (G, N, E).

    A flat ``index_select`` on rows: much faster on CPU than ``gather`` with an index expanded
    over E, in the forward and (as ``index_add``) in the backward.
    """
    G, L, E = x.shape
    flat = index + torch.arange(G, device=index.device).unsqueeze(1) * L  # (G, N)
    return x.reshape(G * L, E).index_select(0, flat.reshape(-1)).view(G, -1, E)


def window_index(start: int, stop: int, n: int, offsets: list[int],
                 circular: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk indices of the windows of chunks start..stop-1 -> (nb, W), and, when the window
    does not wrap, which of them lie inside the sequence (nb, W) bool (None when circular)."""
    idx = torch.arange(start, stop).unsqueeze(1) + torch.tensor(offsets).unsqueeze(0)
    if circular:
        return idx % n, None
    inside = (idx >= 0) & (idx < n)
    return idx.clamp(0, n - 1), inside


class ChunkWindowAttention(torch.autograd.Function):
    """Softmax attention of every chunk over its window of chunks, with a hand backward.

    ``apply(c_q, c_k, c_v, c_pos, c_valid, offsets, circular, causal, self_mask, scale,
    log_count_fn, dropout, grad_follows)``; see :func:`chunk_window_attention` for the
    arguments; ``grad_follows``: keep the blocks for the backward (when small enough).

    Per block: ``S = bias + scale * q k^T - log_count``, ``P = softmax(S)``, ``o = P v``,
    ``lse = max S - log max P`` (exact, and two cheap reductions instead of a second exp pass:
    exp of the -1e9 masked logits is many times slower than the fused softmax on CPU).
    Backward per block: ``dS = P * (dP - rowsum(dO * o) + dlse)``; dropout masks are rebuilt
    from their key (reformer._dropout: a function of the chunk and slot, not of the
    blocking).
    """

    @staticmethod
    def forward(ctx, c_q, c_k, c_v, c_pos, c_valid, offsets, circular, causal, self_mask,
                scale, log_count_fn, dropout, grad_follows):
        G, n, M, E = c_q.shape
        out = torch.empty_like(c_q)  # (G, n, M, E)
        lse = c_q.new_empty(G, n, M)
        ctx.spec = (offsets, circular, causal, self_mask, scale, log_count_fn, dropout)
        K = M * len(offsets)
        # Small enough: keep each block's probabilities for the backward instead of
        # recomputing them (the reversible backward runs this forward right before it).
        keep_blocks = grad_follows and G * n * M * (K + 2 * E) <= SAVE_ELEMENTS
        ctx.blocks = [] if keep_blocks else None
        for start, stop in _blocks(G, n, M, K):
            blk = _Block(c_q, c_k, c_v, c_pos, c_valid, start, stop, ctx.spec)
            out[:, start:stop] = torch.matmul(blk.kept, blk.v)  # (G, nb, M, E)
            lse[:, start:stop] = blk.lse
            if keep_blocks:
                ctx.blocks.append(blk)
        ctx.save_for_backward(c_q, c_k, c_v, c_pos, c_valid, out)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        c_q, c_k, c_v, c_pos, c_valid, out = ctx.saved_tensors
        G, n, M, E = c_q.shape
        scale = ctx.spec[4]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        row = (grad_out * out).sum(dim=-1)  # rowsum(dO * o) = rowsum(P * dP), (G, n, M)
        if grad_lse is not None:
            row = row - grad_lse  # dS = P * (dP - row)
        grad_q, grad_k, grad_v = torch.empty_like(c_q), torch.zeros_like(c_k), torch.zeros_like(c_v)
        saved, ctx.blocks = ctx.blocks, None
        for i, (start, stop) in enumerate(_blocks(G, n, M, M * len(ctx.spec[0]))):
            blk = saved[i] if saved else _Block(c_q, c_k, c_v, c_pos, c_valid, start, stop,
                                                ctx.spec)
            d_out = grad_out[:, start:stop]  # (G, nb, M, E)
            grad_p = torch.matmul(d_out, blk.v.transpose(-1, -2))  # (G, nb, M, K)
            if blk.keep is not None:
                grad_p.mul_(blk.keep)
            grad_s = grad_p.sub_(row[:, start:stop].unsqueeze(-1)).mul_(blk.probs)
            if scale != 1:
                grad_s.mul_(scale)
            grad_q[:, start:stop] = torch.matmul(grad_s, blk.k)
            blk.scatter(grad_k, torch.matmul(grad_s.transpose(-1, -2), blk.q))
            blk.scatter(grad_v, torch.matmul(blk.kept.transpose(-1, -2), d_out))
            if saved:
                saved[i] = None  # free as we go
        return (grad_q, grad_k, grad_v, None, None, None, None, None, None, None, None, None,
                None)


class _Block:
    """The forward quantities of one block of chunks (recomputed in the backward)."""

    def __init__(self, c_q, c_k, c_v, c_pos, c_valid, start, stop, spec) -> None:
        offsets, circular, causal, self_mask, scale, log_count_fn, dropout = spec
        G, n, M, E = c_q.shape
        nb, W = stop - start, len(offsets)
        idx, inside = window_index(start, stop, n, offsets, circular)  # (nb, W)
        self.idx = idx.to(c_q.device).reshape(-1)  # (nb*W,)
        self.q = c_q[:, start:stop]  # (G, nb, M, E)
        self.k = c_k.index_select(1, self.idx)  # (G, nb*W, M, E)
        self.v = c_v.index_select(1, self.idx)
        self.inside = None
        if inside is not None and not bool(inside.all()):
            # Chunks beyond the ends hold zero keys and values (and are masked below).
            self.inside = inside.to(c_q.device, c_q.dtype).view(1, nb * W, 1, 1)
            self.k, self.v = self.k * self.inside, self.v * self.inside
        self.k = self.k.view(G, nb, W * M, E)  # (G, nb, K, E)
        self.v = self.v.view(G, nb, W * M, E)
        qpos = c_pos[:, start:stop]  # (G, nb, M) float positions
        kpos = c_pos.index_select(1, self.idx).view(-1, nb, W * M)  # (G, nb, K)
        valid = None if c_valid is None else c_valid.index_select(1, self.idx).view(-1, nb,
                                                                                  W * M)
        if inside is not None:
            ok = inside.to(c_q.device).repeat_interleave(M, dim=1).view(1, nb, W * M)
            valid = ok if valid is None else valid & ok
        self.probs, self.lse = window_probs(
            self.q, self.k, qpos, kpos, valid, causal=causal, self_mask=self_mask, scale=scale,
            log_count_fn=log_count_fn)
        self.keep = None if dropout is None else dropout.blocks(start, stop, M, W * M, self.q)
        self.kept = self.probs if self.keep is None else self.probs * self.keep

    def scatter(self, grad: torch.Tensor, grad_window: torch.Tensor) -> None:
        """Add a (G, nb, K, E) gradient of the window keys back onto their chunks."""
        G, n, M, E = grad.shape
        grad_window = grad_window.reshape(G, -1, M, E)  # (G, nb*W, M, E)
        if self.inside is not None:
            grad_window = grad_window * self.inside
        grad.index_add_(1, self.idx, grad_window)


def grad_follows(*inputs: torch.Tensor) -> bool:
    """Whether autograd will differentiate a kernel called on ``inputs`` now.

    Asked before ``apply``: inside an autograd Function's forward grad mode is always off.
    """
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def window_probs(q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
                 valid: torch.Tensor | None, *, causal: bool, self_mask: bool, scale: float,
                 log_count_fn=None) -> tuple:
    """Softmax attention weights of query blocks over their key windows.

    Args:
        q: (G, nb, M, E) queries; k: (G, nb, K, E) the keys of each block's window.
        qpos: (G, nb, M), kpos: (G, nb, K) float positions (G may be 1 when shared).
        valid: (G, nb, K) bool, False = masked key, or None.
        causal, self_mask, scale, log_count_fn: as in :func:`chunk_window_attention`.

    Returns:
        probs (G, nb, M, K) and the log-sum-exp of each query's logits (G, nb, M) (the
        callers apply attention dropout: its masks depend on which chunks the block holds).
    """
    G, nb, M, E = q.shape
    K = k.shape[2]
    q3, k3 = q.reshape(G * nb, M, E), k.reshape(G * nb, K, E)
    fused = _native.op("window_softmax_", q) if valid is None and log_count_fn is None else None
    if fused is not None:  # masks, softmax and log-sum-exp in one pass (csrc/)
        probs = torch.bmm(q3, k3.transpose(1, 2)).view(G, nb, M, K)
        lse = fused(probs, qpos, kpos, scale, causal, self_mask, *mask_values(q.dtype))
        return probs, lse
    logits = _masked_logits(q3, k3, qpos, kpos, valid, causal=causal, self_mask=self_mask,
                            scale=scale, log_count_fn=log_count_fn).view(G, nb, M, K)
    probs = torch.softmax(logits, dim=-1).to(logits.dtype)  # CUDA autocast's softmax is fp32
    work = lse_dtype(logits.dtype)
    lse = logits.amax(dim=-1).to(work).sub_(probs.amax(dim=-1).to(work).log_())  # (G, nb, M)
    del logits
    return probs, lse


def _masked_logits(q3: torch.Tensor, k3: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
                   valid: torch.Tensor | None, *, causal: bool, self_mask: bool, scale: float,
                   log_count_fn) -> torch.Tensor:
    """``bias + scale * q k^T`` for (G*nb, M, E) queries and (G*nb, K, E) keys -> (G*nb, M, K),
    with PyTorch ops (``window_probs``'s arguments)."""
    nb, (GB, M, _), K, dtype = qpos.shape[1], q3.shape, k3.shape[1], q3.dtype
    G = GB // nb
    if causal and self_mask:  # the LSH default, in fewer passes than _pair_bias
        bias = _causal_self_bias(qpos, kpos, dtype)
    else:
        bias = _pair_bias(qpos.unsqueeze(-1), kpos.unsqueeze(-2), causal, self_mask, dtype)
    if valid is not None:
        work = torch.promote_types(dtype, torch.float32)
        key_bias = (~valid).to(work).mul_(mask_values(dtype)[0]).unsqueeze(-2)  # (G,nb,1,K)
        bias = key_bias if bias is None else bias + key_bias  # G may broadcast
    if log_count_fn is not None:
        count = log_count_fn(qpos, kpos)
        bias = -count if bias is None else bias.sub_(count)
    # logits = bias + scale * q k^T: the masks ride along in the matmul's accumulator
    if bias is None:
        logits = torch.bmm(q3, k3.transpose(1, 2))
        if scale != 1:
            logits.mul_(scale)
    else:
        bias = bias.to(dtype)
        if bias.shape == (G, nb, M, K) and bias.is_contiguous():  # built here: add into it
            logits = bias.view(G * nb, M, K).baddbmm_(q3, k3.transpose(1, 2), alpha=scale)
        else:
            bias = bias.expand(G, nb, M, K).reshape(G * nb, M, K)
            logits = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)
    return logits


def _causal_self_bias(qpos: torch.Tensor, kpos: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """The causal and self masks of (G, nb, M) queries over (G, nb, K) keys in four passes
    (_pair_bias's values, which it builds in five): ``clamp(invalid * d + self, invalid, 0)``
    with d = kpos - qpos (an exact integer) is 0 for earlier keys, the self value at the
    query's own position and the invalid value for later keys."""
    invalid_value, self_value = mask_values(dtype)
    work = torch.promote_types(dtype, torch.float32)
    d = torch.sub(kpos.unsqueeze(-2), qpos.unsqueeze(-1)).to(work)
    return d.mul_(invalid_value).add_(self_value).clamp_(invalid_value, 0.0)


def _pair_bias(qpos: torch.Tensor, kpos: torch.Tensor, causal: bool, self_mask: bool,
               dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask of every (query, key) pair from their positions (at least float32).

    With c = clamp(kpos - qpos, -1, 1) (earlier, same position, later) the bias is f(c), the
    quadratic through f(-1) = 0, f(0) = self value, f(1) = causal mask value: four cheap
    arithmetic passes instead of comparisons and masked fills (several times slower on CPU).
    The coefficients make f(-1) exactly 0 in float32.
    """
    if not (causal or self_mask):
        return None
    invalid_value, self_value = mask_values(dtype)
    f0 = self_value if self_mask else 0.0
    f1 = invalid_value if causal else 0.0
    a, b = (f1 - 2 * f0) / 2, f1 / 2  # f(c) = (a c + b) c + f0
    work = torch.promote_types(dtype, torch.float32)
    c = (kpos - qpos).clamp_(-1.0, 1.0).to(work)  # (G, nb, M, K)
    return torch.addcmul(c.new_tensor(f0), c, torch.add(c.new_tensor(b), c, alpha=a))


def _blocks(G: int, n: int, M: int, K: int) -> list[tuple[int, int]]:
    """Blocks of chunks whose (G, nb, M, K) score tensors hold about BLOCK_ELEMENTS values."""
    nb = max(1, BLOCK_ELEMENTS // (G * M * K))
    return [(s, min(s + nb, n)) for s in range(0, n, nb)]


def chunk_window_attention(c_q: torch.Tensor, c_k: torch.Tensor, c_v: torch.Tensor,
                           c_pos: torch.Tensor, *, offsets: list[int], circular: bool,
                           causal: bool, c_valid: torch.Tensor | None = None,
                           self_mask: bool = False, scale: float = 1.0,
                           log_count_fn=None, dropout: float | AttentionDropout = 0.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every chunk of queries attends to the keys of the chunks at ``offsets`` from it.

    Args:
        c_q, c_k, c_v: (G, n, M, E) chunked queries, keys, values (keys already normalised
            for shared-QK attention).
        c_pos: (G, n, M) original position of each item (for the causal and self masks);
            G may be 1 when every sequence shares them.
        offsets: window chunk offsets, e.g. [-1, 0].
        circular: the window wraps around the ends (LSH); otherwise chunks beyond the ends
            are masked (local attention).
        causal: mask keys at later positions than the query.
        c_valid: (G, n, M) bool, False = padding (masked as a key), or None.
        self_mask: a query's own position gets ``SELF_VALUE`` (shared-QK attention).
        scale: logit scale (1 for LSH, 1/sqrt(E) for local).
        log_count_fn: ``f(qpos (G, nb, M), kpos (G, nb, K)) -> (G, nb, M, K)`` log
            multiplicities subtracted from the logits (LSH de-duplication), or None.
        dropout: attention dropout on the probabilities (the caller passes 0 in eval): a
            probability (masks keyed by a seed drawn now) or an ``AttentionDropout`` (the
            layer's seed and head keys).

    Returns:
        out (G, n, M, E) and the log-sum-exp of each query's logits (G, n, M).
    """
    if c_pos.numel() and int(c_pos.max()) >= 1 << 24:
        raise ValueError(f"position {int(c_pos.max())} exceeds 2**24, the largest that the "
                         "float32 mask arithmetic represents exactly; use shorter sequences")
    c_pos = c_pos.to(torch.float32)  # exact below 2**24; used for the mask arithmetic
    return ChunkWindowAttention.apply(c_q, c_k, c_v, c_pos, c_valid, list(offsets), circular,
                                      causal, self_mask, scale, log_count_fn,
                                      AttentionDropout.of(dropout), grad_follows(c_q, c_k, c_v))
