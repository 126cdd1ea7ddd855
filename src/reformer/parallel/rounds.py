"""LSH attention split by sorted slots: sequence parallelism whose attention memory is O(L/P).

Head parallelism (exchange.py) gives each process the whole length of some heads, so the
attention core's working set stays the one-process one, c x L bytes, whatever P is
(docs/benchmarks.md: it cannot go below 0.64x of one process's peak on 2 processes). Here
every process keeps its own positions, for every head, and splits each hash round's sorted
order instead:

1. Each process hashes its positions (the rotations are the whole length's, shared) and
   counts its items per (sequence-head, round, bucket). One all-gather of the counts fixes
   every item's slot in the one-process sorted order, ``round * Lp + (items in lower buckets)
   + (items of its bucket at lower positions)``: a position on a lower process is a lower
   position, and a process's own items keep their order (a stable counting sort).
2. Each round's Lp/M sorted chunks are dealt out in contiguous runs, process p owning chunks
   ``C[p]..C[p+1]`` of every round. For round r a process needs its run plus the window's
   neighbours around it (``before`` chunks earlier, ``after`` later, wrapping over the
   n = R*Lp/M chunks as one process's windows do: the first chunk of a round looks back at
   the previous round's last). An ``all_to_all`` sends every item in that span to it, with
   its span slot and its position, so that it holds the span's rows in sorted order. A run
   is attended in passes of about ``SPAN_ROWS`` slots (each with its own neighbours), so
   that a pass's received rows stay small next to the streams: at 1M tokens on 2 processes
   rank 0 peaked at 4.37 GiB with one pass per round and 3.78 GiB with passes of 64K slots
   (sampled resident memory, one step each).
3. It attends each of its chunks over its window with the one-process kernel (masks by the
   items' whole-sequence positions; see below for which), and sends
   each item's output and log-sum-exp back to the item's owner, which folds the rounds
   online as one process does (round by round, in the same order).
4. Backward (flash style, as ``SortedWindowAttention``): the owner sends every item of the
   span again with dL/do, ``rowsum(dL/do * o)`` and the folded log-sum-exp of its position;
   the slot owner recomputes its chunks' probabilities and sends the span rows' gradients
   back, which the owners add up per position (a position is in several spans: one per
   round, and halos).

Every tensor is then O(L/P) per process (the sorted item keys 16 bytes per local item and
round, the folded output, the gradients of qk and v, a pass's rows); the price is traffic:
each position's rows travel once per round (R times head parallelism's). The results equal
one process's: the same items in the same slots, the same windows and masks; attention
dropout is keyed by the sorted chunk (reformer._dropout), shifted here to the global chunk number.

Used for LSH layers whose rounds have at least ``P * (1 + before + after)`` chunks (every
process owns a run, and a span never wraps onto itself) and no round de-duplication (its
counts need every round's chunk of every key); other layers and shorter sequences go
through the head exchange.

Some per-pass tensors take sizes that do not recur (how many items a process sends, and how
many of them it owns), which the caching allocator (reformer._memory) keeps by exact size:
allocated afresh, they would pile up to its 1 GiB cap of free blocks (with one pass per round,
rank 0's peak at 1M on 2 was 4.87 GiB without a release and 4.37 GiB with one after every
pass). They are views of grow-only buffers (:class:`_Buffers`) instead, and the allocator's
free blocks are released once at the end of each forward and backward. Releasing after every
pass, as before, unmapped the blocks whose sizes do recur too, so that each pass faulted all of
its memory in again.

A span attends in the chunkwise C++ kernel (csrc/lsh_chunks.cpp) where one process's sorted
attention would (float32 or bfloat16 rows, no padding mask, no dropout): given the received
rows' order for each slot and the span's own chunks as the queries, it writes each query's
output and log-sum-exp in its received row, the order they go back in. Otherwise the
blockwise kernel in PyTorch ops (``_SortedBlock``) runs, over the same span. Rows move
through shared memory where every process is on one machine (shm.py), and a process folds
the rows returned to it (and adds the gradients) in one native pass each. On this 2-core CPU
2M tokens on 2 processes took 1.23x the time of 1M on one (head parallelism: 1.22x, in
another session) at 6.82 GiB per process (head parallelism: 8.69; docs/benchmarks.md).

Shapes: B batch, h heads of the slice, G = B*h, l this process's positions (l' with the
padding to Lp that the last process adds), L / Lp whole (padded) length, R rounds, M chunk
length, nr = Lp/M chunks per round, n = R*nr, S span chunks, E d_head. An item is
(g, round, local position); flat item ids run over (G, R, l').
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from reformer import _native
from reformer._memory import release_cached_blocks
from reformer.attention import _chunked
from reformer.attention._chunked import padded_mask
from reformer.attention._sorted import (
    FUSED_DTYPES,
    _add_rows,
    _block_backward,
    _Fold,
    _fused_applies,
    _Sequence,
    _SortedBlock,
    fold_step,
    norm_eps,
    row_dots,
)
from reformer.attention.base import AttentionState, consecutive, key_offset, window
from reformer.attention.lsh import LSHSelfAttention
from reformer.hashing import n_buckets_of, sort_by_bucket
from reformer.parallel.exchange import HeadExchange, _exchange


def even_sizes(n: int, parts: int) -> list[int]:
    """``n`` things in ``parts`` contiguous parts, the first ones larger by one where it does
    not divide (some empty when n < parts)."""
    base, extra = divmod(n, parts)
    return [base + (p < extra) for p in range(parts)]


def chunk_runs(chunks: int, parts: int) -> list[int]:
    """Boundaries C[0..P] of P contiguous runs of ``chunks`` chunks (:func:`even_sizes`)."""
    return [0, *itertools.accumulate(even_sizes(chunks, parts))]


SPAN_ROWS = 1 << 16  # sorted slots of a round that a process attends per pass, all sequences


class _Buffers:
    """Grow-only (rows, width) buffers, one per role, for the per-pass tensors whose row count
    changes from pass to pass: a pass takes a view of its role's buffer, which is replaced
    (with an eighth to spare) only when a pass needs more rows. A role's view is used up
    before the next one of the same role is taken (every exchange here is synchronous)."""

    SPARE = 8

    def __init__(self) -> None:
        self._held: dict[str, torch.Tensor] = {}

    def rows(self, role: str, n: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """An (n, width) view in ``like``'s dtype and device, its values unset."""
        buf = self._held.get(role)
        if (buf is None or buf.shape[0] < n or buf.shape[1] != width or buf.dtype != like.dtype
                or buf.device != like.device):
            buf = self._held[role] = like.new_empty(n + n // self.SPARE, width)
        return buf[:n]

    def clear(self) -> None:
        self._held.clear()


class _Route:
    """Where this process's items go in one pass: ``ids`` (K,) flat item ids in send order
    (destination by destination, ``splits``), ``target`` (K,) each one's row in its
    destination's span buffer, ``own`` the entries that carry an item to the owner of its
    chunk (as opposed to a neighbour's halo) and ``rows`` their local positions' rows;
    ``span`` (chunks) and ``chunks`` (first, stop within the round) are this process's."""

    def __init__(self, ids, target, splits, own, rows, span, chunks) -> None:
        self.ids, self.target, self.splits = ids, target, splits
        self.own, self.rows, self.span, self.chunks = own, rows, span, chunks
        self.received: list[int] | None = None  # entries from each process (asked once)


class RoundSplit:
    """One LSH call of one head slice, split by sorted slots over the processes of an
    exchange (reformer.parallel.exchange.HeadExchange)."""

    def __init__(self, attn: LSHSelfAttention, exchange, buckets: torch.Tensor,
                 state: AttentionState, heads: slice, valid: torch.Tensor | None,
                 dropout) -> None:
        cfg = attn.config
        self.ex, self.group = exchange, exchange.group
        self.P, self.rank = exchange.parts, exchange.rank
        B, h, R, lp = buckets.shape
        self.B, self.h, self.G, self.R, self.lp = B, h, B * h, R, lp
        self.M = M = cfg.chunk_length
        self.Lp = attn.padded_length(exchange.length)
        self.nr = self.Lp // M
        self.n = R * self.nr
        offsets = window(cfg, self.n, cfg.n_chunks_before, cfg.n_chunks_after)
        if not consecutive(offsets):
            raise ValueError(f"{self.n} sorted chunks are too few for a split window "
                             f"{offsets}; use longer sequences")
        self.offsets, self.before, self.after = offsets, -offsets[0], offsets[-1]
        # each process's run of every round, in passes of about SPAN_ROWS slots (the same
        # number of passes everywhere: every pass is a collective)
        runs = chunk_runs(self.nr, self.P)
        longest = max(runs[d + 1] - runs[d] for d in range(self.P))
        self.passes = -(-longest // max(1, SPAN_ROWS // (self.G * M)))
        self.pieces = []  # [process][pass] -> (first, stop) chunk within a round
        for d in range(self.P):
            cuts = chunk_runs(runs[d + 1] - runs[d], self.passes)
            self.pieces.append([(runs[d] + cuts[j], runs[d] + cuts[j + 1])
                                for j in range(self.passes)])
        self.valid = (None if valid is None else
                      valid[:, None, :].expand(B, h, self.Lp).reshape(self.G, self.Lp))
        self.dropout, self.causal, self.key_offset = dropout, cfg.causal, key_offset(cfg)
        # every item's key g*R*Lp + slot, sorted: the items of any run of sorted chunks are
        # one stretch of ``order``
        key = self._slots(buckets, n_buckets_of(state.rotations))
        key += torch.arange(self.G, device=key.device).view(-1, 1, 1) * (self.n * M)
        self.skey, self.order = key.view(-1).sort()
        del key
        self.buffers = _Buffers()

    # ----------------------------------------------------------------- the sorted order
    def _slots(self, buckets: torch.Tensor, nb: int) -> torch.Tensor:
        """(G, R, l') every local item's slot in the whole sorted order (0..R*Lp-1)."""
        G, R, lp = self.G, self.R, self.lp
        b = buckets.reshape(G, R, lp).long()
        counts = torch.zeros(G, R, nb + 1, dtype=torch.int64, device=b.device)
        counts.scatter_add_(2, b, torch.ones_like(b))
        every = [torch.empty_like(counts) for _ in range(self.P)]
        dist.all_gather(every, counts, group=self.group)
        total = torch.stack(every).sum(0)
        lower = sum(every[:self.rank], torch.zeros_like(counts))  # at lower positions
        # slot in round = (items in lower buckets) + lower[b] + (local rank in round
        # - local items in lower buckets)
        offset = (total.cumsum(2) - total) + lower - (counts.cumsum(2) - counts)
        _, undo = sort_by_bucket(b.view(G, 1, R, lp).contiguous())  # local rank per round
        rank_in_round = undo.view(G, R, lp) - torch.arange(R, device=b.device).view(1, R, 1) * lp
        rounds = torch.arange(R, device=b.device).view(1, R, 1) * self.Lp
        return offset.gather(2, b) + rank_in_round + rounds

    def route(self, r: int, j: int) -> _Route:
        """Pass j of round r: every local item in some process's span (its run's piece j
        of round r and the window's neighbour chunks around it)."""
        G, M, nM = self.G, self.M, self.n * self.M
        ids, target, splits, own, rows = [], [], [], [], []
        sent = 0
        for d in range(self.P):
            first, stop = self.pieces[d][j]
            lo = r * self.nr + first - self.before  # the span's first chunk
            span = stop - first + self.before + self.after
            for g in range(G):  # slots lo*M .. (lo+span)*M - 1, wrapping over n*M
                a = (lo * M) % nM
                parts = [(a, min(a + span * M, nM))]
                if a + span * M > nM:
                    parts.append((0, a + span * M - nM))
                for s0, s1 in parts:
                    i0, i1 = (int(torch.searchsorted(self.skey, g * nM + x)) for x in (s0, s1))
                    sel = self.order[i0:i1]
                    at = (self.skey[i0:i1] - g * nM - lo * M) % nM  # the slot in the span
                    mine = ((at >= self.before * M)
                            & (at < (span - self.after) * M)).nonzero().squeeze(1)
                    own.append(mine + sent)
                    rows.append(self.row_of(sel.index_select(0, mine)))
                    ids.append(sel)
                    target.append(at + g * span * M)
                    sent += sel.numel()
            splits.append(sent - sum(splits))
        first, stop = self.pieces[self.rank][j]
        return _Route(torch.cat(ids), torch.cat(target), splits, torch.cat(own),
                      torch.cat(rows), stop - first + self.before + self.after, (first, stop))

    def row_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Flat item ids -> rows g*l' + i of a (G*l', E) local buffer."""
        R, lp = self.R, self.lp
        return ids // (R * lp) * lp + ids % lp

    # ----------------------------------------------------------------------- exchanges
    def _send(self, x: torch.Tensor, route: _Route, what: str,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """Entries' rows (K, ...) out to their destinations (or rows ``rows`` (K,) of a 2-D
        ``x``, gathered as they are sent) -> the span rows received."""
        width = x.shape[1:].numel()
        out = [s * width for s in self._recv_splits(route)]
        got = _exchange(x, out, [s * width for s in route.splits], self.group, what,
                        transport=self.ex.transport, rows=rows)
        return got.view(-1, *x.shape[1:])

    def _return(self, x: torch.Tensor, route: _Route, what: str,
                role: str = "returned") -> torch.Tensor:
        """Rows (K_in, width) for the entries received -> their senders', in send order (a
        view of the ``role`` buffer, used up before the next return to it)."""
        width = x.shape[1]
        out = self.buffers.rows(role, sum(route.splits), width, x)
        return _exchange(x, [s * width for s in route.splits],
                         [s * width for s in self._recv_splits(route)], self.group, what,
                         out=out, transport=self.ex.transport).view(-1, width)

    def _recv_splits(self, route: _Route) -> list[int]:
        """How many entries each process sends here in ``route``'s pass (asked once)."""
        if route.received is None:
            sent = torch.tensor(route.splits, dtype=torch.int64)
            got = torch.empty_like(sent)
            if self.ex.transport is not None:  # (not a row exchange: not through _exchange)
                self.ex.transport(got, sent, [1] * self.P, [1] * self.P)
            else:
                dist.all_to_all_single(got, sent, group=self.group)
            route.received = got.tolist()
        return route.received

    def _gather(self, x: torch.Tensor, ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (B, h, l, E) local rows of the entries' items, to be sent: (rows of E over x's
        memory, the entries' rows of it), which the send gathers straight where they go;
        where x's rows are not rows of E in memory, or the padding's rows must be zero,
        (the entries' rows in the ``sent`` buffer (used up by the send that follows), None)."""
        lp, R, (B, h, n_local, E) = self.lp, self.R, x.shape
        g, i = ids // (R * lp), ids % lp
        b, head, i = g // h, g % h, i.clamp(max=n_local - 1)
        strides = x.stride()
        if strides[3] == 1 and all(st % E == 0 for st in strides[:3]):  # rows of E
            extent = ((B - 1) * strides[0] + (h - 1) * strides[1]
                      + (n_local - 1) * strides[2]) // E
            flat = x.as_strided((extent + 1, E), (E, 1))  # from x's own storage offset
            at = (b * strides[0] + head * strides[1] + i * strides[2]) // E
            if n_local == lp:
                return flat, at
            rows = torch.index_select(flat, 0, at,
                                      out=self.buffers.rows("sent", at.numel(), E, x))
        else:
            rows = x[b, head, i]
        if n_local < lp:
            rows[ids % lp >= n_local] = 0
        return rows, None

    def _span(self, qk: torch.Tensor, v: torch.Tensor, route: _Route,
              extra: tuple = (), what: str = "values") -> tuple:
        """Send a pass's entries: (their span slots here (K_in,), the span as a _Sequence
        over the received rows, what each of ``extra`` (functions making the entries' rows,
        as :meth:`_gather` does) made, as received). Received rows stay in the order they came in;
        ``_Sequence.row`` maps span slots to them. Each tensor is made, sent and freed in
        turn. ``what`` names the traffic (``_exchange``): the backward's gradient pass sends
        "gradients", so that benchmarks/sequence.py tells it from the recomputation."""
        G, SM = self.G, route.span * self.M
        meta = self.buffers.rows("meta", route.ids.numel(), 2, route.ids)
        torch.stack([route.target, self.ex.start + route.ids % self.lp], dim=1, out=meta)
        got_meta = self._send(meta, route, what)
        at, pos = got_meta[:, 0].contiguous(), got_meta[:, 1]
        span_pos = pos.new_empty(G * SM).index_copy_(0, at, pos)
        rows = torch.empty_like(at).index_copy_(0, at, torch.arange(at.numel(),
                                                                      device=at.device))
        del meta, got_meta, pos
        got = []
        for make in (lambda: self._gather(qk, route.ids), lambda: self._gather(v, route.ids),
                     *extra):
            src, index = make()
            got.append(self._send(src, route, what, index))
            del src, index
        seq = _Sequence(got[0], got[1], span_pos.view(G, SM), self.valid,
                        s_row=rows.view(G, SM))
        return at, seq, got[2:]

    def _blocks(self, r: int, route: _Route) -> list[tuple[int, int, tuple]]:
        """My chunks of the pass in kernel blocks: (span chunk start, stop, spec)."""
        first, stop = route.chunks
        shift = r * self.nr + first - self.before  # span chunk 0's number in the sorted order
        drop = None if self.dropout is None else self.dropout.shifted(shift)
        spec = (self.M, self.offsets, self.causal, None, drop, self.key_offset)
        K = self.M * len(self.offsets)
        return [(self.before + a, self.before + b, spec)
                for a, b in _chunked._blocks(self.G, stop - first, self.M, K)]

    def _fused(self, qk: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether spans attend in the chunkwise C++ kernel (csrc/lsh_chunks.cpp, given the
        received rows' order and the span's query chunks): as one process's sorted
        attention decides, for float32 or bfloat16 rows without padding or dropout."""
        # (the span's positions are int64, as self.skey, which stands in for them here)
        return _fused_applies(qk, v, self.skey, self.valid, None, self.dropout)

    def _kernel_args(self, seq: _Sequence, route: _Route) -> tuple:
        """The arguments that lsh_forward_ and lsh_backward_ take after their own, for a
        span: one round of its chunks, rows as received, my chunks as the queries."""
        first, stop = route.chunks
        return (seq.q, seq.v, seq.pos, 1, self.M, self.offsets[0], len(self.offsets),
                self.causal, *_chunked.mask_values(seq.q.dtype), norm_eps(self.key_offset),
                seq.row, self.before, stop - first)

    def _passes(self):
        """(round, its route) for every pass, in order (rounds in order, as one process
        folds them)."""
        for r in range(self.R):
            for j in range(self.passes):
                yield r, self.route(r, j)

    # --------------------------------------------------------------- forward, backward
    def forward(self, qk: torch.Tensor, v: torch.Tensor) -> _Fold:
        """-> the folded rounds (out (G, l', E), top, total) for the local positions."""
        G, E, lp = self.G, qk.shape[-1], self.lp
        lse_dtype = _chunked.lse_dtype(qk.dtype)
        fold = _Fold(qk.new_zeros(G * lp, E),
                     qk.new_full((G * lp,), float("-inf"), dtype=lse_dtype),
                     qk.new_zeros(G * lp, dtype=lse_dtype))
        fused = self._fused(qk, v)
        for r, route in self._passes():
            at, seq, _ = self._span(qk, v, route)
            o, z = self._attend(r, route, seq, at, fused)
            del seq, at  # the received rows
            self._fold_returned(fold, o.to(qk.dtype), z.view(-1, 1), route)
            del o, z, route
        self.buffers.clear()
        release_cached_blocks()  # what the buffers held: sizes that need not recur
        return _Fold(fold.out.view(G, lp, E), fold.top.view(G, lp), fold.total.view(G, lp))

    def _attend(self, r: int, route: _Route, seq: _Sequence, at: torch.Tensor,
                fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """My chunks of a received span attended: (outputs (K_in, E), log-sum-exps (K_in,))
        of the entries received, in the order they came (and go back) in; the halos' rows
        are left unset (their senders drop them: ``route.own``)."""
        n_in, E = seq.q.shape
        if fused:  # the kernel writes each query's row where it was received
            o, z, ones = (seq.q.new_empty(size, dtype=torch.float32)
                          for size in ((n_in, E), (n_in,), (n_in,)))
            _native.op("lsh_forward_", seq.q, FUSED_DTYPES)(o, z, ones,
                                                            *self._kernel_args(seq, route))
            return o, z
        G, M, SM = self.G, self.M, route.span * self.M
        o = seq.q.new_empty(G, SM, E)  # in the span's slot order
        z = seq.q.new_empty(G, SM, dtype=_chunked.lse_dtype(seq.q.dtype))
        for start, stop, spec in self._blocks(r, route):
            blk = _SortedBlock(seq, start, stop, spec)
            torch.matmul(blk.kept, blk.v, out=o[:, start * M:stop * M].view(
                G, stop - start, M, E))
            z[:, start * M:stop * M] = blk.lse.view(G, -1)
            del blk
        return o.view(G * SM, E).index_select(0, at), z.view(-1).index_select(0, at)

    def _fold_returned(self, fold: _Fold, o: torch.Tensor, z: torch.Tensor,
                       route: _Route) -> None:
        """Send the outputs o (K_in, E) and log-sum-exps z (K_in, 1) of the entries received
        back to their senders, and fold those of my own positions' items into ``fold``."""
        o_sent = self._return(o, route, "values")
        z_sent = self._return(z, route, "values", "lse").view(-1)
        _fold_rows(fold, route.rows, o_sent, z_sent, route.own, self.buffers)

    def _attend_backward(self, r: int, route: _Route, seq: _Sequence, d_span: torch.Tensor,
                         s_span: torch.Tensor, fused: bool) -> tuple[torch.Tensor, ...]:
        """The gradients of a received span's rows (qk and v, (K_in, E) each, in the order
        received) from my chunks, given each row's dL/do and (row sum, top, total)."""
        n_in, E = seq.q.shape
        span_fold = _Fold(None, s_span[:, 1].contiguous(), s_span[:, 2].contiguous())
        row_span = s_span[:, 0].contiguous()
        if fused:  # float32 whatever the rows' type
            gq, gv = (seq.q.new_zeros(n_in, E, dtype=torch.float32) for _ in range(2))
            q_rows, v_rows, pos, *rest = self._kernel_args(seq, route)
            _native.op("lsh_backward_", seq.q, FUSED_DTYPES)(
                gq, gv, q_rows, v_rows, pos, d_span, row_span, span_fold.top, span_fold.total,
                *rest)
            return gq, gv
        gq, gv = seq.q.new_zeros(n_in, E), seq.q.new_zeros(n_in, E)
        for start, stop, spec in self._blocks(r, route):
            blk = _SortedBlock(seq, start, stop, spec)
            _block_backward(blk, d_span, row_span, span_fold, gq, gv)
            del blk
        return gq, gv

    def backward(self, qk: torch.Tensor, v: torch.Tensor, fold: _Fold,
                 grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dL/d(qk), dL/dv (G*l', E) each, from dL/do (B, h, l, E)."""
        G, E, lp = self.G, qk.shape[-1], self.lp
        n_local = grad_out.shape[2]
        out = fold.out.view(grad_out.shape[:2] + (lp, E))[:, :, :n_local]
        row = fold.top.new_zeros(grad_out.shape[:2] + (lp,))  # dS = P (dP - row)
        row_dots(grad_out, out, row[:, :, :n_local])
        stats = torch.stack([row.view(-1), fold.top.reshape(-1), fold.total.reshape(-1)], 1)
        del row
        grad_q = qk.new_zeros(G * lp, E)
        grad_v = qk.new_zeros(G * lp, E)
        fused = self._fused(qk, v)
        for r, route in self._passes():
            rows = self.row_of(route.ids)
            at, seq, (d_span, s_span) = self._span(
                qk, v, route, (lambda ids=route.ids: self._gather(grad_out, ids),
                               lambda rows=rows: (stats, rows)), "gradients")
            del at
            gq_span, gv_span = self._attend_backward(r, route, seq, d_span, s_span, fused)
            gq_span, gv_span = gq_span.to(qk.dtype), gv_span.to(qk.dtype)
            del seq, d_span, s_span
            _add_rows(grad_q, rows, self._return(gq_span, route, "gradients"))
            del gq_span
            _add_rows(grad_v, rows, self._return(gv_span, route, "gradients"))
            del gv_span, route, rows
        self.buffers.clear()
        release_cached_blocks()
        return grad_q, grad_v


def _fold_rows(fold: _Fold, rows: torch.Tensor, o: torch.Tensor, z: torch.Tensor,
               index: torch.Tensor, buffers: _Buffers) -> None:
    """Fold one round's outputs o[index] (N, E) and log-sum-exps z[index] (N,) into the flat
    ``fold``'s rows ``rows`` ((N,), distinct) in place, as one process folds every position's;
    a position's first round finds top = -inf and total = 0. In one pass over the rows where
    everything is float32 (csrc/sorted_rows.cpp, fold_row as one process's native fold), else
    in PyTorch ops (``fold_step``), through ``buffers``' "owned" and "fold" rows."""
    native = _native.op("fold_rows_", o) if all(
        t.dtype == torch.float32 for t in (*fold, z)) else None
    if native is not None:
        native(fold.out, fold.top, fold.total, rows, o, z, index)
        return
    n, E = index.numel(), o.shape[1]
    o_r = torch.index_select(o, 0, index, out=buffers.rows("owned", n, E, o))
    part = _Fold(torch.index_select(fold.out, 0, rows, out=buffers.rows("fold", n, E, o)),
                 *(t.index_select(0, rows) for t in fold[1:]))
    for whole, folded in zip(fold, fold_step(part, o_r, z.index_select(0, index)),
                             strict=True):
        whole.index_copy_(0, rows, folded)


class _RoundSplitAttention(torch.autograd.Function):
    """``apply(qk, v, split)``: (B, h, l, E) each -> the attention output (B, h, l, E)."""

    @staticmethod
    def forward(ctx, qk, v, split):
        fold = split.forward(qk, v)
        ctx.split = split
        ctx.save_for_backward(qk, v, *fold)
        B, h, n_local, E = qk.shape
        return fold.out.view(B, h, split.lp, E)[:, :, :n_local]

    @staticmethod
    def backward(ctx, grad):
        qk, v, *fold = ctx.saved_tensors
        split = ctx.split
        fold = _Fold(*fold)
        grad_q, grad_v = split.backward(qk, v, fold, grad)
        B, h, n_local, E = qk.shape
        shape = (B, h, split.lp, E)
        return grad_q.view(shape)[:, :, :n_local], grad_v.view(shape)[:, :, :n_local], None


class SplitExchange(HeadExchange):
    """The head exchange, except for LSH layers that split by sorted slots: those run as in
    one process on the local positions (projections, W_o, their gradients) around
    :meth:`lsh_core`."""

    def splits(self, attn) -> bool:
        """Whether ``attn``'s calls split by sorted slots (else the head exchange runs
        them)."""
        if not isinstance(attn, LSHSelfAttention) or attn.config.dedup_rounds:
            return False
        cfg = attn.config
        chunks = attn.padded_length(self.length) // cfg.chunk_length
        return chunks >= self.parts * (1 + cfg.n_chunks_before + cfg.n_chunks_after)

    def lsh_core(self, attn: LSHSelfAttention, projected: list[torch.Tensor], heads: slice,
                 state: AttentionState, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return lsh_core(attn, self, projected, heads, state, attention_mask)


def lsh_core(attn: LSHSelfAttention, exchange: HeadExchange, projected: list[torch.Tensor],
             heads: slice, state: AttentionState, attention_mask: torch.Tensor | None
             ) -> torch.Tensor:
    """The LSH attention of this process's positions for ``heads``: (B, h, l, E) qk and v
    -> (B, h, l, E), equal to the one-process core's rows of these positions."""
    qk, v = projected
    B, _, n_local, _ = qk.shape
    L, start = exchange.length, exchange.start
    Lp = attn.padded_length(L)
    lp = n_local + (Lp - L if exchange.rank == exchange.parts - 1 else 0)  # the last pads
    valid = padded_mask(attention_mask, B, L, Lp, qk.device)
    mine = None if valid is None else valid[:, start:start + n_local]
    buckets = attn.record_buckets(qk, heads, state, mine, pad=lp - n_local)
    dropout = attn.dropout_for(state, B, heads, qk.device)
    split = RoundSplit(attn, exchange, buckets, state, heads, valid, dropout)
    return _RoundSplitAttention.apply(qk, v, split)
