"""The LSH attention kernel: chunks of the bucket-sorted sequence, without building it.

LSH attention sorts all R*Lp (round, position) items by bucket and lets every chunk of M
sorted items attend to the chunks at fixed offsets from it (lsh.py). Building the sorted
sequence costs R copies of q, k and v, and unsorting the per-round outputs R more; at a million
tokens and 4 rounds each copy is 1 GiB per head. This kernel never builds them: it walks the
sorted order a block of chunks at a time and gathers each block's window rows straight from the
unsorted (G, Lp, E) tensors through the sort permutation.

Rounds are combined on the fly: each round's output and log-sum-exp are written in sorted
order (contiguous block by block), put back in position order by one gather per round, and
folded into a running softmax-weighted mean, ``o = sum_r exp(z_r - Z) o_r`` with
``Z = logsumexp_r z_r``, so only three (G, Lp, E) buffers exist whatever R is. The result is
softmax attention over every key item that a query saw in any of its rounds, and the backward
uses exactly that (flash-attention style): with the fold's final state kept from the
forward, each block's global probabilities are ``P = softmax_block(S) * share`` with
``share = exp(z_block - Z)``, and ``dS = P * (dP - rowsum(dO * o))``, one block at a time, in
any order.

Shapes: G = B*H sequences, Lp positions (a multiple of M), E head size, R rounds,
n = R*Lp/M chunks, nr = Lp/M chunks per round, W window chunks, K = W*M keys per window,
nb chunks per block. Blocks never straddle two rounds, so a block's queries are distinct
positions.

Decisions:
- The fold is an online softmax (:class:`_Fold`): per position the mean so far, the maximum
  ``top`` of the rounds' log-sum-exps and ``total = sum_r exp(z_r - top)``, so that
  ``Z = top + log(total)`` is never rounded before it is used: ``share = exp(z_r - top) /
  total``, weights that sum to one in the working precision. A query that sees only itself has
  ``z_r = |q| - 1e5`` in every round; float32's spacing near 1e5 is 0.0078, and weights
  ``exp(z_r - Z)`` through a rounded Z summed to 1 +- 4e-3 (its output was v (1 +- 4e-3)),
  while ``z_r - top`` is exact there (two floats within a factor of two).
- Keys are the queries normalised (shared-QK attention). The kernel takes qk and v only and
  normalises each block's gathered key rows itself, applying the normalisation's Jacobian in
  its backward: no separate (G, Lp, E) key tensor, nor its gradient, exists.
- A block's windows overlap (W chunks each, one step apart), so its keys and values are
  gathered once for the nb + W - 1 chunks they span and each window is a view; so are its
  queries (offset 0 must be in the window: a chunk attends to itself).
- Outputs are unsorted by a gather per round, not scattered per block (``index_copy_`` is
  about three times slower than ``index_select`` on CPU); the backward adds each block's
  key/query and value gradients with one scatter-add each: a per-round sorted buffer
  unsorted by a gather measured no faster, its zeroing and random reads of a whole round
  costing what the scatters did.
- Where it applies (float32 or bfloat16 rows on the CPU with BLAS, no padding mask, round
  de-duplication or dropout) the whole kernel runs chunk by chunk in C++
  (``csrc/lsh_chunks.cpp``, see its header): a thread walks consecutive chunks with their
  windows' rows in a ring, so one chunk's rows, scores and output stay in cache, and the
  backward recomputes each chunk's probabilities from the final log-sum-exp instead of
  keeping them. One head, forward + backward: 27.6 -> 20.9 ms at 4K, 366 -> 318 ms at 64K.
  The blocks below are its reference and run every other case. For bfloat16 rows it
  computes in float32 (keeping its float32 output for the backward) and returns the output
  in the rows' type, like the blocks.
- Log-sum-exps are at least float32 whatever the rows' type. A query that sees only itself
  has z = SELF_VALUE (-1e5) in each of its R rounds, and its rounds must fold to weights 1/R:
  in bfloat16, whose spacing at 1e5 is 512, Z = z + log R rounded back to z, so every round
  got weight 1 and the output was R times too large.
- Below ``SAVE_ELEMENTS`` the blockwise forward keeps each block's gathered rows and
  probabilities for the backward (the reversible backward runs this forward right before its
  backward); above it, the backward recomputes them.
- Masks and the score arithmetic are shared with the chunk kernel (``window_probs``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from reformer import _native
from reformer._dropout import AttentionDropout
from reformer.attention import _chunked
from reformer.attention._chunked import grad_follows, window_probs
from reformer.hashing import inverse_permutation

NORM_EPS = 1e-12  # F.normalize's default eps


def norm_eps(key_offset: float) -> float:
    """The ``eps`` that the kernels (Python and csrc/) take for keys ``q / sqrt(|q|^2 + c)``:
    c = 0 is F.normalize's ``q / max(|q|, NORM_EPS)``, passed as the floor NORM_EPS; c > 0
    (Hugging Face's keys, ``hf_compat``) is passed as -c, a negative floor that never binds.
    The normalisation's Jacobian is ``(g - k (k . g)) / s`` with s the divisor either way."""
    return NORM_EPS if key_offset == 0 else -key_offset
_ROW_BLOCK = 1 << 16  # rows per step of whole-sequence elementwise work
FUSED_DTYPES = (torch.float32, torch.bfloat16)  # the rows' types that lsh_chunks.cpp takes


def _windows(span: torch.Tensor, nb: int, W: int, M: int) -> torch.Tensor:
    """(G, (nb+W-1)*M, ...) rows of consecutive chunks -> (G, nb, W*M, ...) overlapping
    windows, chunk j's being chunks j..j+W-1 (a view: nothing is copied)."""
    st = span.stride()
    return span.as_strided((span.shape[0], nb, W * M, *span.shape[2:]),
                           (st[0], M * st[1], *st[1:]))


def _unwindow(grad_windows: torch.Tensor, W: int, M: int) -> torch.Tensor:
    """The adjoint of :func:`_windows`: (G, nb, W*M, E) -> (G, (nb+W-1)*M, E), summing the
    rows that several windows share (strided adds: no window is copied first)."""
    G, nb, _, E = grad_windows.shape
    parts = grad_windows.view(G, nb, W, M, E)
    span = grad_windows.new_empty(G, nb + W - 1, M, E)
    span[:, :nb] = parts[:, :, 0]
    span[:, nb:].zero_()
    for w in range(1, W):
        span[:, w:w + nb] += parts[:, :, w]
    return span.view(G, -1, E)


class _Sequence:
    """The kernel's inputs in the forms that blocks read: (G*Lp, E) rows, and for every
    sorted slot its position as a row index and as a float (for the mask arithmetic)."""

    def __init__(self, q_rows: torch.Tensor, v_rows: torch.Tensor, s_pos: torch.Tensor,
                 valid: torch.Tensor | None, s_row: torch.Tensor | None = None) -> None:
        """``s_row`` (G, R*Lp): the row of the flat (N, E) q_rows and v_rows at each sorted
        slot, when it is not g*Lp + the slot's position (reformer.parallel.rounds: rows as
        received from other processes, whose positions are the whole sequence's)."""
        E = q_rows.shape[-1]
        self.q, self.v = q_rows.reshape(-1, E), v_rows.reshape(-1, E)
        self.pos, self.valid = s_pos, valid
        self.pos_f = s_pos.float()  # exact: positions are < 2**24
        if s_row is None:
            G, Lp = q_rows.shape[:2]
            base = torch.arange(G, device=s_pos.device).unsqueeze(1) * Lp
            s_row = s_pos if G == 1 else s_pos + base  # rows of the (G*Lp, E) views
        self.row = s_row

    def span(self, lo: int, hi: int) -> tuple[torch.Tensor, ...]:
        """(position, float position, row) of the sorted slots lo..hi-1, each (G, hi - lo):
        views, unless the span wraps around the ends of the sorted order."""
        n = self.pos.shape[1]
        if 0 <= lo and hi <= n:
            return self.pos[:, lo:hi], self.pos_f[:, lo:hi], self.row[:, lo:hi]
        slots = torch.arange(lo, hi, device=self.pos.device) % n
        return tuple(t.index_select(1, slots) for t in (self.pos, self.pos_f, self.row))


class _SortedBlock:
    """One block of sorted chunks: its rows, positions and attention weights.

    The windows of the block's nb chunks overlap: together they cover the S = (nb + W - 1) * M
    consecutive sorted slots from ``(start + offsets[0]) * M``, the block's span. Those rows
    are gathered (and their keys normalised) once; each chunk's window is a view into them,
    and so are the queries (the rows of offset 0's chunks).
    """

    def __init__(self, seq: _Sequence, start: int, stop: int, spec: tuple) -> None:
        M, offsets, causal, log_count_fn, dropout, key_offset = spec
        G, E = seq.pos.shape[0], seq.q.shape[1]
        self.eps = norm_eps(key_offset)
        nb, W = stop - start, len(offsets)
        self.W, self.M = W, M
        kpos, kpos_f, krow = seq.span((start + offsets[0]) * M, (stop + offsets[-1]) * M)
        self.k_flat = krow.reshape(-1)  # (G*S,) the span's rows
        # the span's raw rows (G, S, E), their norms and unit rows (F.normalize: q / |q|)
        unit_stride = seq.q.stride(1) == 1 and seq.v.stride(1) == 1
        gather = _native.op("gather_span_rows", seq.q) if unit_stride else None
        if gather is not None:  # one pass (csrc/)
            rows = gather(seq.q, seq.v, self.k_flat, self.eps)
            self.k_raw, self.k_span, self.k_norm, self.v_span = (t.view(G, -1, t.shape[-1])
                                                                 for t in rows)
        else:
            self.k_raw = seq.q.index_select(0, self.k_flat).view(G, -1, E)
            self.k_norm = torch.linalg.vector_norm(self.k_raw, dim=-1, keepdim=True)
            if key_offset:  # sqrt(|q|^2 + c)
                self.k_norm = self.k_norm.square().add_(key_offset).sqrt_()
            # in the rows' dtype: under CUDA autocast the norm is fp32, the rows maybe bf16
            self.k_span = (self.k_raw / self.k_norm.clamp_min(NORM_EPS)).to(self.k_raw.dtype)
            self.v_span = seq.v.index_select(0, self.k_flat).view(G, -1, E)
        self.q_in_span = slice(-offsets[0] * M, (nb - offsets[0]) * M)  # offset 0's chunks
        self.q = self.k_raw[:, self.q_in_span].view(G, nb, M, E)
        self.q_flat = krow[:, self.q_in_span].reshape(-1)  # (G*nb*M,) the queries' rows
        self.k = _windows(self.k_span, nb, W, M)  # (G, nb, K, E)
        self.v = _windows(self.v_span, nb, W, M)
        k_valid = None if seq.valid is None else _windows(seq.valid.gather(1, kpos), nb, W, M)
        self.probs, self.lse = window_probs(
            self.q, self.k, kpos_f[:, self.q_in_span].view(G, nb, M),
            _windows(kpos_f, nb, W, M), k_valid, causal=causal, self_mask=True, scale=1.0,
            log_count_fn=log_count_fn)
        self.keep = None if dropout is None else dropout.blocks(start, stop, M, W * M, self.q)
        self.kept = self.probs if self.keep is None else self.probs * self.keep

    def normalize_backward_(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of the span's raw rows from ``grad`` (G, S, E), that of the unit keys
        (overwritten): (g - u (u . g)) / s for u = q / s, s = |q| (or sqrt(|q|^2 + c)), or
        g / eps where s < eps (F.normalize divides by max(|q|, eps) there)."""
        radial = (self.k_span * grad).sum(dim=-1, keepdim=True).mul_(self.k_norm > NORM_EPS)
        return grad.addcmul_(self.k_span, radial, value=-1).div_(self.k_norm.clamp_min(NORM_EPS))


def _round_blocks(G: int, r: int, nr: int, M: int, K: int) -> list[tuple[int, int]]:
    """Round r's chunks in the chunk kernel's blocks (about BLOCK_ELEMENTS scores each)."""
    return [(r * nr + a, r * nr + b) for a, b in _chunked._blocks(G, nr, M, K)]


class SortedWindowAttention(torch.autograd.Function):
    """``apply(qk_rows, v_rows, s_pos, s_slot, valid, M, offsets, causal, log_count_fn,
    dropout, grad_follows, key_offset)`` -> (out (G, Lp, E), lse (G, Lp)); see
    :func:`sorted_window_attention`."""

    @staticmethod
    def forward(ctx, q_rows, v_rows, s_pos, s_slot, valid, M, offsets, causal, log_count_fn,
                dropout, grad_follows, key_offset):
        G, Lp, E = q_rows.shape
        R, nr, K = s_pos.shape[1] // Lp, Lp // M, M * len(offsets)
        spec = (M, offsets, causal, log_count_fn, dropout, key_offset)
        ctx.spec, ctx.blocks = spec, None
        ctx.fused = _fused_applies(q_rows, v_rows, s_pos, valid, log_count_fn, dropout)
        if ctx.fused:  # chunk by chunk in C++ (csrc/lsh_chunks.cpp), float32 out and fold
            out, top, total = (q_rows.new_empty(size, dtype=torch.float32)
                               for size in ((G, Lp, E), (G, Lp), (G, Lp)))
            _native.op("lsh_forward_", q_rows, FUSED_DTYPES)(
                out.view(G * Lp, E), top.view(-1), total.view(-1),
                *_fused_args(q_rows, v_rows, s_pos, spec))
            fold = _Fold(out, top, total)
            ctx.save_for_backward(q_rows, v_rows, s_pos, valid, *fold)
            return out.to(q_rows.dtype), fold.lse()
        # per sorted item: K probabilities and its raw, unit and value rows
        keep_blocks = grad_follows and G * R * Lp * (K + 3 * E) <= _chunked.SAVE_ELEMENTS
        saved = [] if keep_blocks else None
        fold = None
        seq = _Sequence(q_rows, v_rows, s_pos, valid)
        unsort = _unsort_rows(s_pos, s_slot, Lp)
        o_s = q_rows.new_empty(G, Lp, E)  # a round's output in sorted order
        z_s = q_rows.new_empty(G, Lp, dtype=_chunked.lse_dtype(q_rows.dtype))
        for r in range(R):
            for start, stop in _round_blocks(G, r, nr, M, K):
                blk = _SortedBlock(seq, start, stop, spec)
                a, b = (start - r * nr) * M, (stop - r * nr) * M
                torch.matmul(blk.kept, blk.v, out=o_s[:, a:b].view(G, stop - start, M, E))
                z_s[:, a:b] = blk.lse.view(G, -1)
                if keep_blocks:
                    saved.append(blk)
            fold = _fold_round(fold, o_s, z_s, unsort[r])
        ctx.blocks = saved
        ctx.save_for_backward(q_rows, v_rows, s_pos, valid, *fold)
        return fold.out, fold.lse()

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q_rows, v_rows, s_pos, valid, out, top, total = ctx.saved_tensors
        G, Lp, E = q_rows.shape
        M, offsets = ctx.spec[0], ctx.spec[1]
        R, nr, K = s_pos.shape[1] // Lp, Lp // M, M * len(offsets)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        d_out, top, total = grad_out.reshape(G * Lp, E), top.reshape(-1), total.reshape(-1)
        # rowsum(dO * o) = rowsum(P * dP)
        row = row_dots(d_out, out.reshape(G * Lp, E), torch.empty_like(top))
        if grad_lse is not None:
            row -= grad_lse.reshape(-1)  # dS = P * (dP - row)
        # float32 in the fused kernel whatever the rows' type
        grad_dtype = torch.float32 if ctx.fused else q_rows.dtype
        grad_q, grad_v = (torch.zeros(G * Lp, E, dtype=grad_dtype, device=q_rows.device)
                          for _ in range(2))
        if ctx.fused:  # chunk by chunk in C++ (csrc/lsh_chunks.cpp)
            q, v, pos, *rest = _fused_args(q_rows, v_rows, s_pos, ctx.spec)
            # d_out in float32 or the rows' type (the output was cast to it): read as is
            _native.op("lsh_backward_", q_rows, FUSED_DTYPES)(
                grad_q, grad_v, q, v, pos, d_out if d_out.stride(1) == 1 else d_out.contiguous(),
                row, top, total, *rest)
            return _grads(grad_q.to(q_rows.dtype), grad_v.to(v_rows.dtype), q_rows.shape)
        saved, ctx.blocks = ctx.blocks, None
        seq = None if saved else _Sequence(q_rows, v_rows, s_pos, valid)
        blocks = [b for r in range(R) for b in _round_blocks(G, r, nr, M, K)]
        for i, (start, stop) in enumerate(blocks):  # dropout masks rebuilt from their key
            blk = saved[i] if saved else _SortedBlock(seq, start, stop, ctx.spec)
            _block_backward(blk, d_out, row, _Fold(None, top, total), grad_q, grad_v)
            if saved:
                saved[i] = None  # free as we go
        return _grads(grad_q, grad_v, q_rows.shape)


def _grads(grad_q: torch.Tensor, grad_v: torch.Tensor, shape: torch.Size) -> tuple:
    """SortedWindowAttention.backward's result: the (G*Lp, E) row gradients of qk and v."""
    return (grad_q.view(shape), grad_v.view(shape), None, None, None, None, None, None, None,
            None, None, None)


def _fused_applies(q_rows: torch.Tensor, v_rows: torch.Tensor, s_pos: torch.Tensor,
                   valid: torch.Tensor | None, log_count_fn, dropout) -> bool:
    """Whether the chunkwise C++ kernel (csrc/lsh_chunks.cpp) runs this call: float32 or
    bfloat16 rows (one type) on the CPU with BLAS for that type, int64 positions; no padding
    mask, round de-duplication or dropout (the blockwise path handles those; ``dropout``: a
    probability, an AttentionDropout or None)."""
    if (valid is not None or log_count_fn is not None or dropout
            or q_rows.stride(-1) != 1 or v_rows.stride(-1) != 1 or s_pos.dtype != torch.int64
            or v_rows.dtype != q_rows.dtype):
        return False
    return (_native.op("lsh_forward_", q_rows, FUSED_DTYPES) is not None
            and _native.blas(q_rows.dtype))


def _fused_args(q_rows: torch.Tensor, v_rows: torch.Tensor, s_pos: torch.Tensor,
                spec: tuple) -> tuple:
    """The arguments that lsh_forward_ and lsh_backward_ share, after their outputs (and,
    for the backward, dO, the row sums and the log-sum-exp)."""
    (G, Lp, E), (M, offsets, causal), key_offset = q_rows.shape, spec[:3], spec[5]
    return (q_rows.reshape(G * Lp, E), v_rows.reshape(G * Lp, E), s_pos.contiguous(),
            s_pos.shape[1] // Lp, M, offsets[0], len(offsets), causal,
            *_chunked.mask_values(q_rows.dtype), norm_eps(key_offset))


class _Fold(NamedTuple):
    """The rounds folded so far, per position: ``out`` (G, Lp, E) their softmax-weighted
    mean, ``top`` (G, Lp) the largest of their log-sum-exps and ``total`` (G, Lp) =
    sum_r exp(z_r - top); the log-sum-exp over all of them is top + log(total)."""

    out: torch.Tensor | None
    top: torch.Tensor
    total: torch.Tensor

    def lse(self) -> torch.Tensor:
        return self.top + self.total.log()

    def share(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """exp(z - Z) for log-sum-exps ``z`` of the positions ``index`` (flat rows of
        top/total): their rounds' weights in the final softmax."""
        top, total = (t.reshape(-1).index_select(0, index).view(z.shape) for t in self[1:])
        return (z - top).exp_().div_(total)


def _fold_round(fold: _Fold | None, o_s: torch.Tensor, z_s: torch.Tensor,
                unsort: torch.Tensor) -> _Fold:
    """Fold a round's outputs o_s (G, Lp, E) and log-sum-exps z_s (G, Lp), in sorted order,
    into the rounds so far (None before the first): put them in position order by a gather
    through ``unsort`` (contiguous writes in the blocks, no scatter), then, online-softmax
    style, with m = max(top, z_r), a = total exp(top - m), b = exp(z_r - m):
    ``out = (a out + b o_r) / (a + b)``, ``top = m``, ``total = a + b`` (the weights
    a / (a + b) and b / (a + b) sum to one by construction)."""
    G, Lp, E = o_s.shape
    native = _native.op("fold_round_", o_s)
    if native is not None:  # gather and fold in one pass (csrc/)
        first = fold is None
        if first:
            fold = _Fold(o_s.new_empty(G, Lp, E), *(z_s.new_empty(G, Lp) for _ in range(2)))
        native(fold.out.view(G * Lp, E), fold.top.view(-1), fold.total.view(-1),
               o_s.view(G * Lp, E), z_s.view(-1), unsort, first)
        return fold
    o_r = o_s.view(G * Lp, E).index_select(0, unsort).view(G, Lp, E)
    z_r = z_s.view(-1).index_select(0, unsort).view(G, Lp)
    if fold is None:
        return _Fold(o_r, z_r, torch.ones_like(z_r))
    return fold_step(fold, o_r, z_r)


def fold_step(fold: _Fold, o_r: torch.Tensor, z_r: torch.Tensor) -> _Fold:
    """One round's outputs o_r (..., E) and log-sum-exps z_r (...) folded into ``fold`` of
    the same positions (its ``out`` updated in place): with m = max(top, z_r),
    a = total exp(top - m), b = exp(z_r - m), ``out = (a out + b o_r) / (a + b)``. A fold of
    top = -inf and total = 0 (no round yet) gives out = o_r, top = z_r, total = 1."""
    top = torch.maximum(fold.top, z_r)
    a = (fold.top - top).exp_().mul_(fold.total)
    b = (z_r - top).exp_()
    total = a + b
    out = fold.out.mul_(a.div_(total).unsqueeze(-1)).addcmul_(o_r, b.div_(total).unsqueeze(-1))
    return _Fold(out, top, total)


def row_dots(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[..., i] = x[..., i, :] . y[..., i, :] (rowsum(dO * o) for the backward), a block
    of ``_ROW_BLOCK`` rows at a time so that no x-sized product exists."""
    n = x.shape[-2]
    for s in range(0, n, _ROW_BLOCK):
        block = slice(s, min(n, s + _ROW_BLOCK))
        out[..., block] = (x[..., block, :] * y[..., block, :]).sum(dim=-1)
    return out


def _unsort_rows(s_pos: torch.Tensor, s_slot: torch.Tensor | None,
                 Lp: int) -> list[torch.Tensor]:
    """For each round r, the (G*Lp,) rows that put a (G, Lp, ...) buffer of round r in sorted
    order (its slot j at row j) back in position order."""
    G, RL = s_pos.shape
    R = RL // Lp
    if s_slot is None:  # s_slot[g, r*Lp + p]: the sorted slot of (round r, position p)
        items = s_pos.view(G, R, Lp) + torch.arange(R, device=s_pos.device).view(1, R, 1) * Lp
        s_slot = inverse_permutation(items.view(G, RL))
    base = torch.arange(G, device=s_pos.device).view(G, 1) * Lp
    return [(s_slot[:, r * Lp:(r + 1) * Lp] - r * Lp + base).reshape(-1) for r in range(R)]


def _block_backward(blk: _SortedBlock, d_out: torch.Tensor, row: torch.Tensor,
                    fold: _Fold, grad_q: torch.Tensor, grad_v: torch.Tensor) -> None:
    """Add one block's gradients to those of the (G*Lp, E) rows of q and v.

    With P = share * probs the block's global probabilities (share = exp(z_block - Z) per
    query, from the forward's ``fold``; its ``out`` is not read),
    dS = P (dP - row) = probs (share dP - share row), and share dP = (share dO) v^T: the
    share scales the (M, E) rows of dO, not the (M, K) probabilities.
    """
    G, nb, M, E = blk.q.shape
    shape = blk.lse.shape  # (G, nb, M)
    unit_stride = d_out.stride(1) == 1 and blk.q_flat.is_contiguous()
    scaled = _native.op("scaled_query_rows", d_out) if unit_stride else None
    if scaled is not None:  # one pass (csrc/)
        d_o, share_row = scaled(d_out, row, fold.top, fold.total, blk.q_flat,
                                blk.lse.reshape(-1))
        d_o, share_row = d_o.view(*shape, E), share_row.view(shape)
    else:
        share = fold.share(blk.lse, blk.q_flat)
        d_o = d_out.index_select(0, blk.q_flat).view(*shape, E).mul_(share.unsqueeze(-1))
        share_row = row.index_select(0, blk.q_flat).view(shape).mul_(share)
    grad_p = torch.matmul(d_o, blk.v.transpose(-1, -2))  # share * dP, (G, nb, M, K)
    if blk.keep is not None:
        grad_p.mul_(blk.keep)
    fused = _native.op("softmax_backward_", grad_p)
    if fused is not None:  # dS = P (dP - row) in one pass (csrc/)
        grad_s = fused(grad_p, share_row, blk.probs)
    else:
        grad_s = grad_p.sub_(share_row.unsqueeze(-1)).mul_(blk.probs)
    grad_k = _span_grad(blk, torch.matmul(grad_s.transpose(-1, -2), blk.q), unit_keys=True)
    grad_k[:, blk.q_in_span] += torch.matmul(grad_s, blk.k).view(G, nb * M, E)  # as queries
    _add_rows(grad_q, blk.k_flat, grad_k.view(-1, E))
    grad_v_span = _span_grad(blk, torch.matmul(blk.kept.transpose(-1, -2), d_o), unit_keys=False)
    _add_rows(grad_v, blk.k_flat, grad_v_span.view(-1, E))


def _add_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] += src[i] for (N, E) ``dst``, (S,) ``index`` (may repeat), (S, E) ``src``."""
    native = _native.op("index_add_rows_", dst)
    if native is not None and src.is_contiguous() and index.is_contiguous():
        native(dst, index, src)  # csrc/: PyTorch's index_add_ runs as a scatter_add_
    else:
        dst.index_add_(0, index, src)


def _span_grad(blk: _SortedBlock, grad_windows: torch.Tensor, unit_keys: bool) -> torch.Tensor:
    """(G, nb, K, E) gradients of the block's windows -> those of its span's (G, S, E) rows;
    with ``unit_keys``, carried back through the keys' normalisation to the raw rows."""
    native = _native.op("unwindow", grad_windows)
    if native is not None:  # one pass (csrc/)
        if unit_keys:
            return native(grad_windows, blk.W, blk.k_span, blk.k_norm, blk.eps)
        return native(grad_windows, blk.W, None, None, 0.0)
    span = _unwindow(grad_windows, blk.W, blk.M)
    return blk.normalize_backward_(span) if unit_keys else span


def sorted_window_attention(qk_rows: torch.Tensor, v_rows: torch.Tensor, s_pos: torch.Tensor,
                            *, chunk_length: int, offsets: list[int],
                            s_slot: torch.Tensor | None = None,
                            causal: bool, valid: torch.Tensor | None = None,
                            log_count_fn=None, dropout: float | AttentionDropout = 0.0,
                            key_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every chunk of the sorted order over its window, rounds combined.

    Args:
        qk_rows, v_rows: (G, Lp, E) shared queries/keys and values in position order; the
            keys are the unit-normalised queries.
        s_pos: (G, R*Lp) the position at each sorted slot (round-major: slots r*Lp.. hold
            round r, sorted by bucket).
        s_slot: (G, R*Lp) its inverse: the sorted slot of item r*Lp + p (round r, position
            p), e.g. ``undo`` from :func:`reformer.hashing.sort_by_bucket`; None: computed.
        chunk_length: M; Lp must be a multiple of it.
        offsets: consecutive window chunk offsets over the n = R*Lp/M sorted chunks
            (circular), e.g. [-1, 0].
        causal: mask keys at later positions; a query's own position is always masked with
            the self value (shared-QK attention).
        valid: (G, Lp) bool, False = padding (never a key), or None.
        log_count_fn: LSH de-duplication, see ``_chunked.chunk_window_attention``.
        dropout: attention dropout on the probabilities (0 in eval), as in
            ``_chunked.chunk_window_attention``.
        key_offset: c in the keys ``q / sqrt(|q|^2 + c)`` (0: unit keys; Hugging Face's
            E * 1e-6 under ``hf_compat``).

    Returns:
        out (G, Lp, E) and each query's log-sum-exp over all its rounds (G, Lp).
    """
    G, Lp, _ = qk_rows.shape
    if list(offsets) != list(range(offsets[0], offsets[0] + len(offsets))) or 0 not in offsets:
        raise ValueError(f"offsets={list(offsets)} must be consecutive chunk offsets "
                         "including 0 (a chunk attends to itself), e.g. [-1, 0]; build them "
                         "with window_offsets")
    if Lp % chunk_length or s_pos.shape[1] % Lp:
        raise ValueError(f"{Lp} positions and {s_pos.shape[1]} sorted slots must be multiples "
                         f"of chunk_length={chunk_length} and of each other; pad the input")
    if Lp > 1 << 24:
        raise ValueError(f"{Lp} positions exceed 2**24, the largest that the float32 mask "
                         "arithmetic represents exactly; use shorter sequences")
    if s_slot is not None and s_slot.shape != s_pos.shape:
        raise ValueError(f"s_slot has shape {tuple(s_slot.shape)}, expected s_pos's "
                         f"{tuple(s_pos.shape)}: one sorted slot per (round, position) item")
    return SortedWindowAttention.apply(qk_rows, v_rows, s_pos, s_slot, valid, chunk_length,
                                       list(offsets), causal, log_count_fn,
                                       AttentionDropout.of(dropout),
                                       grad_follows(qk_rows, v_rows), key_offset)
