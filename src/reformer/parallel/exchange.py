"""The head exchange of sequence parallelism (reformer.parallel.sequence): local positions of
a slice of heads <-> the whole length of this process's share of those heads.

Two ways through it:
- ``__call__`` wraps the attention core in two differentiable ``all_to_all``s (projected
  inputs out, outputs back). The layers' plain forward uses it: a stack that is not
  reversible, and evaluation (no gradients, so no reversible node).
- :meth:`add_forward_` and :meth:`backward_` run a reversible attention half themselves, one
  head slice at a time, and exchange rows straight from and into the buffers they are
  computed in. Each process's heads are projected into the send buffer, in the order the
  receiver reads them, and the outputs and gradients that come back are merged through W_o
  and the projections head by head where they arrived, so no (B, h, l, E) tensor is ever
  transposed into another layout, and whatever the local positions need is freed as soon as
  it has been sent.

Memory, the reason for the second way (measured, docs/benchmarks.md): with the autograd
exchange the backward of one head slice held the local projections of its heads (qk and v),
dL/do, their head-major copies for sending, the received whole-length rows and their
gradients at once; at 2M tokens on 2 processes that was 6.2 GiB next to the 3.8 GiB of the
streams. Here a slice's backward holds, at its peak, the whole-length qk and v of this
process's heads, the core's output, dL/do and the gradients of qk and v: six (B, k, L, E)
tensors.

Shapes: B batch, L whole length, l this process's positions, H heads, h a head slice, k = h/P
this process's heads of it, E d_head, D d_model, P processes. A received buffer is
(P, B, k, l, E): from each process p, its heads of the slice over my positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from reformer._dropout import drop_rows
from reformer.attention.base import AttentionState
from reformer.layers import row_chunks
from reformer.parallel.shm import SharedMemoryAllToAll
from reformer.reversible import (
    _block,
    _grads,
    _layer_norm,
    _layer_norm_backward_,
    _product_dtype,
    _slices,
    output_drop,
)


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single on flat tensors; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, transport):
        ctx.splits, ctx.group, ctx.transport = (out_splits, in_splits), group, transport
        return _exchange(x, out_splits, in_splits, group, "values", transport=transport)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return (_exchange(grad, in_splits, out_splits, ctx.group, "gradients",
                          transport=ctx.transport), None, None, None, None)


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
              group: dist.ProcessGroup | None, what: str, out: torch.Tensor | None = None,
              transport: SharedMemoryAllToAll | None = None,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """All-to-all of the flat ``x`` (or of ``x.index_select(0, rows)``, ``x`` 2-D): ``in_splits[p]``
    elements to process p, ``out_splits[p]`` from it, into ``out`` (contiguous,
    ``sum(out_splits)`` elements) or a new tensor, through ``transport`` (shm.py, which gathers
    the rows straight into its outbox) or else the group's backend. ``what`` (values |
    gradients: inputs, outputs or their gradients) names the traffic for
    benchmarks/sequence.py."""
    out = x.new_empty(sum(out_splits)) if out is None else out.view(-1)
    x = x.contiguous()
    _all_to_all(out, x if rows is not None else x.view(-1), out_splits, in_splits, group,
                transport, rows)
    return out


def _all_to_all(out: torch.Tensor, x: torch.Tensor, out_splits: list[int],
                in_splits: list[int], group: dist.ProcessGroup | None,
                transport: SharedMemoryAllToAll | None,
                rows: torch.Tensor | None = None) -> None:
    """Every exchange of rows goes through here (benchmarks/sequence.py meters it)."""
    if transport is not None:
        transport(out, x, out_splits, in_splits, rows)
        return
    if rows is not None:
        x = x.index_select(0, rows).view(-1)
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)


def _flat(x: torch.Tensor, b: int, s: slice) -> slice:
    """Sequence b's positions s of the (B, l, D) ``x`` as rows of its (B*l, D) grid."""
    return slice(b * x.shape[1] + s.start, b * x.shape[1] + s.stop)


class HeadExchange:
    """Around the attention core: local positions of h heads <-> all positions of h/P heads
    (the interface of reformer.reversible.HeadExchange)."""

    def __init__(self, lengths: list[int], rank: int, group: dist.ProcessGroup | None,
                 transport: SharedMemoryAllToAll | None = None) -> None:
        self.lengths, self.rank, self.group, self.transport = lengths, rank, group, transport
        self.length, self.parts = sum(lengths), len(lengths)
        self.start = sum(lengths[:rank])  # my first position in the whole sequence

    def splits(self, attn) -> bool:
        """Whether a layer runs on the local positions as in one process, its core split
        by sorted slots (rounds.SplitExchange): never, here."""
        return False

    # ------------------------------------------------------------------- autograd exchange
    def __call__(self, core: Callable, projected: list[torch.Tensor], heads: slice,
                 state: AttentionState, attention_mask: torch.Tensor | None) -> torch.Tensor:
        out = core([self._to_heads(p) for p in projected], self.mine(heads), state,
                   attention_mask)
        return self._to_positions(out)

    def mine(self, heads: slice) -> slice:
        """This process's heads of the slice ``heads``."""
        k = (heads.stop - heads.start) // self.parts
        return slice(heads.start + self.rank * k, heads.start + (self.rank + 1) * k)

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, l, E) local positions -> (B, h/P, L, E) this process's heads, all positions
        (differentiable)."""
        B, h, n_local, E = x.shape
        send = x.reshape(B, self.parts, h // self.parts, n_local, E).transpose(0, 1)
        return self._out(send, "values", differentiable=True)

    def _to_positions(self, y: torch.Tensor) -> torch.Tensor:
        """(B, h/P, L, E) -> (B, h, l, E): each process's positions of every head back
        (differentiable)."""
        B, k, _, E = y.shape
        got = self._back(y, "values", differentiable=True)  # (P, B, k, l, E)
        return got.transpose(0, 1).reshape(B, self.parts * k, got.shape[3], E)

    def _whole(self, got: torch.Tensor, B: int, k: int, E: int) -> torch.Tensor:
        """A received flat buffer, every process's (B, k, l_p, E) in turn -> (B, k, L, E)."""
        if B * k == 1:  # the sources' (1, 1, l_p, E) blocks, one after another, are (1, 1, L, E)
            return got.view(B, k, self.length, E)
        sizes = [B * k * n * E for n in self.lengths]
        parts = [g.view(B, k, n, E) for g, n in zip(got.split(sizes), self.lengths, strict=True)]
        return torch.cat(parts, dim=2)

    def _by_owner(self, y: torch.Tensor) -> torch.Tensor:
        """(B, k, L, E) -> flat, each process's positions (B, k, l_p, E) in turn."""
        if y.shape[0] * y.shape[1] == 1:  # positions in owner order already
            return y.reshape(-1)
        return torch.cat([part.reshape(-1) for part in y.split(self.lengths, dim=2)])

    # ------------------------------------------------------- a reversible half, by hand
    def add_forward_(self, half, x: torch.Tensor, acc: torch.Tensor, rec, call) -> None:
        """acc += f(x) for the reversible attention ``half`` (no autograd)."""
        drop = output_drop(rec)  # keyed by global position
        for heads in _slices(half.attn, x, call):
            qk_v = self._project_out(half, x, heads)
            o = half.attn.core(qk_v, self.mine(heads), rec.attn, call.attention_mask)
            del qk_v
            self._merge_(half, self._back(o, "values"), heads, acc, 1.0, drop)

    def backward_(self, half, x: torch.Tensor, y: torch.Tensor, grad_y: torch.Tensor,
                  grad_x: torch.Tensor, rec, call, grads: dict) -> None:
        """As AttentionHalf.backward_: y -> y - f(x), grad_x += dL/dx through f, and the
        parameters' gradients, one head slice at a time."""
        drop = output_drop(rec)  # the forward's
        for heads in _slices(half.attn, x, call):
            inputs = [t.detach().requires_grad_(True) for t in self._project_out(half, x, heads)]
            grad_o = self._grad_o_out(half, grad_y, heads, drop)
            with torch.enable_grad():
                o = half.attn.core(inputs, self.mine(heads), rec.attn, call.attention_mask)
            grad_in = _grads(o, inputs, grad_o)
            del inputs, grad_o
            o_back = self._back(o.detach(), "values")
            del o
            self._merge_(half, o_back, heads, y, -1.0, drop)  # y - o W_o^T: the input again
            self._w_o_grad_(half, grad_y, o_back, heads, grads, drop)
            del o_back
            grad_back = [self._back(g, "gradients") for g in grad_in]
            del grad_in
            self._projections_backward_(half, x, heads, grad_back, grad_x, grads)

    def _heads(self, heads: slice):
        """(source process p, its j-th head of the slice, the head's index), in the order
        of a received (P, B, k, l, E) buffer."""
        k = (heads.stop - heads.start) // self.parts
        return [(p, j, heads.start + p * k + j) for p in range(self.parts) for j in range(k)]

    def _send_buffer(self, like: torch.Tensor, heads: slice, E: int,
                     dtype: torch.dtype) -> torch.Tensor:
        """An empty (P, B, k, l, E) buffer: for each process, its heads over my positions."""
        B, n_local = like.shape[0], like.shape[1]
        k = (heads.stop - heads.start) // self.parts
        return like.new_empty(self.parts, B, k, n_local, E, dtype=dtype)

    def _out(self, send: torch.Tensor, what: str, differentiable: bool = False
             ) -> torch.Tensor:
        """Send (P, B, k, l, E) -> receive (B, k, L, E): my heads over all positions."""
        _, B, k, n_local, E = send.shape
        splits = ([B * k * n * E for n in self.lengths], [B * k * n_local * E] * self.parts)
        got = (_AllToAll.apply(send.reshape(-1), *splits, self.group, self.transport)
               if differentiable else _exchange(send, *splits, self.group, what,
                                                transport=self.transport))
        return self._whole(got, B, k, E)

    def _back(self, y: torch.Tensor, what: str, differentiable: bool = False
              ) -> torch.Tensor:
        """(B, k, L, E) my heads -> received (P, B, k, l, E): every head over my positions."""
        B, k, _, E = y.shape
        n_local = self.lengths[self.rank]
        splits = ([B * k * n_local * E] * self.parts, [B * k * n * E for n in self.lengths])
        got = (_AllToAll.apply(self._by_owner(y), *splits, self.group, self.transport)
               if differentiable else _exchange(self._by_owner(y), *splits, self.group, what,
                                                transport=self.transport))
        return got.view(self.parts, B, k, n_local, E)

    def _project_out(self, half, x: torch.Tensor, heads: slice) -> list[torch.Tensor]:
        """LayerNorm(x)'s projections for ``heads``, computed into the send buffers and
        exchanged: [(B, k, L, E)] for this process's heads, one per projection."""
        E = half.attn.d_head
        dtype = _product_dtype(x)
        linears = half.attn.projections()
        sends = [self._send_buffer(x, heads, E, dtype) for _ in linears]
        weights = [lin.weight.to(dtype) for lin in linears]
        for b in range(x.shape[0]):
            for s in row_chunks(x.shape[1], _block(x)):
                h = half.norm(x[b, s]).to(dtype)  # once for every projection and head
                for send, w in zip(sends, weights, strict=True):
                    for p, j, hd in self._heads(heads):
                        torch.mm(h, w[hd * E:(hd + 1) * E].t(), out=send[p, b, j, s])
        out = []
        for i in range(len(sends)):
            out.append(self._out(sends[i], "values"))
            sends[i] = None  # sent: free it before the next one is
        return out

    def _grad_o_out(self, half, grad_y: torch.Tensor, heads: slice, drop) -> torch.Tensor:
        """dL/do = Dropout'(dL/dy) W_o for ``heads``, exchanged: (B, k, L, E) for my heads."""
        E, dtype = half.attn.d_head, _product_dtype(grad_y)
        w_o = half.attn.w_o.weight.to(dtype)
        send = self._send_buffer(grad_y, heads, E, dtype)
        for b in range(grad_y.shape[0]):
            for s in row_chunks(grad_y.shape[1], _block(grad_y)):
                g = drop_rows(drop, grad_y[b, s], _flat(grad_y, b, s)).to(dtype)
                for p, j, hd in self._heads(heads):
                    torch.mm(g, w_o[:, hd * E:(hd + 1) * E], out=send[p, b, j, s])
        return self._out(send, "gradients")

    def _rows(self, got: torch.Tensor, b: int, s: slice) -> torch.Tensor:
        """Sequence b's rows s of a received (P, B, k, l, E) buffer as (rows, h*E), the heads
        in order: a block-sized copy, so that products over the slice's heads are single
        matrix products as in one process (in bf16, head by head products would be rounded
        and summed in bf16)."""
        P, _, k = got.shape[:3]
        return torch.cat([got[p, b, j, s] for p in range(P) for j in range(k)], dim=-1)

    def _merge_(self, half, got: torch.Tensor, heads: slice, acc: torch.Tensor,
                sign: float, drop) -> None:
        """acc += sign * Dropout(o W_o^T) from the received (P, B, k, l, E) outputs."""
        w_o = half.attn.w_o.weight[:, half._columns(heads)]
        for b in range(acc.shape[0]):
            for s in row_chunks(acc.shape[1], _block(acc)):
                part = drop_rows(drop, F.linear(self._rows(got, b, s), w_o), _flat(acc, b, s))
                acc[b, s].add_(part, alpha=sign)

    def _w_o_grad_(self, half, grad_y: torch.Tensor, got: torch.Tensor, heads: slice,
                   grads: dict, drop) -> None:
        """W_o's gradient for ``heads``: Dropout'(dL/dy)^T o."""
        grad_w_o = grads[half.attn.w_o.weight][:, half._columns(heads)]
        for b in range(grad_y.shape[0]):
            for s in row_chunks(grad_y.shape[1], _block(grad_y)):
                g = drop_rows(drop, grad_y[b, s], _flat(grad_y, b, s))
                grad_w_o += g.t() @ self._rows(got, b, s)

    def _projections_backward_(self, half, x: torch.Tensor, heads: slice,
                               grad_back: list[torch.Tensor], grad_x: torch.Tensor,
                               grads: dict) -> None:
        """From the received gradients of the projections (P, B, k, l, E) each: the
        projections' and LayerNorm's parameter gradients, and grad_x += dL/dx."""
        cols = half._columns(heads)
        for b in range(x.shape[0]):
            for s in row_chunks(x.shape[1], _block(x)):
                h, *stats = _layer_norm(half.norm, x[b, s])
                h = h.to(_product_dtype(h))
                grad_h = None
                for lin, g in zip(half.attn.projections(), grad_back, strict=True):
                    g = self._rows(g, b, s)
                    grads[lin.weight][cols] += g.t() @ h
                    part = g @ lin.weight[cols]
                    grad_h = part if grad_h is None else grad_h.add_(part)
                _layer_norm_backward_(half.norm, x[b, s], stats, grad_h, grad_x[b, s], grads)
