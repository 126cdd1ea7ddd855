"""Reversible residual blocks (Reformer section 3; Gomez et al. 2017, RevNets).

Each layer maps two streams (x1, x2) to (y1, y2):

    y1 = x1 + f(x2),   f = Attention(LayerNorm(.))
    y2 = x2 + g(y1),   g = FeedForward(LayerNorm(.))

and is inverted exactly by ``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``. The stack's forward keeps
only the final (y1, y2); its backward walks the layers in reverse, recomputing each layer's
inputs from its outputs, so activation memory does not grow with depth.

The backward of each half is itself chunked (DESIGN.md 1.6): g over blocks of positions, f over
slices of heads (each recomputed, differentiated and freed before the next). Dropout masks are
keyed by position and head (reformer._dropout): each half records their seeds in the forward
and the backward rebuilds the same masks from them, however it cuts the work, with no RNG
state to replay (the encoder-decoder's cross-attention half still replays one: ``record``);
LSH bucket ids are recorded in the forward and reused, since recomputed inputs can differ in
the last bit and flip a bucket.

Memory: the two streams are updated in place, in the forward (each layer's outputs overwrite
its inputs) and in the backward (the outputs are turned back into inputs and the two gradient
buffers accumulate), so a training step holds four (B, L, D) tensors plus one head slice's or
one row block's temporaries, whatever the depth. At a million tokens and D = 256 each stream
is 1 GiB, so a second copy of anything (L, D)-sized would matter.

Shapes: B batch, L length, D d_model, N = B*L rows.

Decision: parameter gradients are *returned* by the autograd Function (the parameters are its
inputs) rather than accumulated into ``.grad`` behind autograd's back, so that
``torch.autograd.grad``, gradient hooks and DistributedDataParallel see them as usual. The
backward adds every chunk's share into one buffer per parameter, allocated before the first
layer, and returns the totals, so hooks see each gradient once, not once per chunk. Most of
it is differentiated by hand; where autograd is used (the attention core, a feed-forward
with dropout) it runs on detached stand-ins of the parameters (``functional_call``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from reformer._dropout import PositionDropout, drop_rows, position_dropout
from reformer._memory import keep_freed_memory
from reformer._rng import capture_rng
from reformer.attention import ATTENTION_MODULES, AttentionState
from reformer.attention.base import LayerCache
from reformer.config import ReformerConfig
from reformer.layers import FeedForward, row_chunks
from reformer.plan import plan_for

Grads = list[torch.Tensor]
ROWS = 1 << 12  # rows per block of the position-wise work inside the attention half
PROJECT_ELEMENTS = 1 << 25  # project a group of heads at once up to this size (128 MiB fp32)


class HeadExchange(Protocol):
    """Sequence parallelism's exchange around the attention core (reformer.parallel.sequence).

    Each process holds a slice of the positions; ``__call__`` sends the projected inputs of
    one slice of heads, each (B, h, l, E) over the local positions, so that each process
    holds the whole length for its h/P of those heads, runs ``core`` on them, and sends the
    outputs back: (B, h, l, E), differentiably. ``add_forward_`` and ``backward_`` stand in
    for AttentionHalf's own in the reversible stack. ``length`` is the whole sequence's (the
    LSH bucket count follows it).
    """

    length: int
    parts: int  # processes: every head slice holds a multiple of it
    start: int  # the global position of this process's first

    def __call__(self, core: Callable, projected: list[torch.Tensor], heads: slice,
                 state: AttentionState, attention_mask: torch.Tensor | None) -> torch.Tensor: ...

    def add_forward_(self, half: AttentionHalf, x: torch.Tensor, acc: torch.Tensor,
                     rec: HalfRecord, call: CallInfo) -> None: ...

    def backward_(self, half: AttentionHalf, x: torch.Tensor, y: torch.Tensor,
                  grad_y: torch.Tensor, grad_x: torch.Tensor, rec: HalfRecord,
                  call: CallInfo, grads: dict) -> None: ...

    def splits(self, attn: nn.Module) -> bool:
        """True for a layer that runs on the local positions as in one process, all but its
        attention core (``lsh_core``, split by sorted slots: reformer.parallel.rounds)."""
        ...

    def lsh_core(self, attn: nn.Module, projected: list[torch.Tensor], heads: slice,
                 state: AttentionState, attention_mask: torch.Tensor | None
                 ) -> torch.Tensor: ...


@dataclass
class CallInfo:
    """What one forward call passes to every layer."""

    attention_mask: torch.Tensor | None = None
    n_hashes: int | None = None
    caches: list[LayerCache] | None = None  # filled with each layer's keys (prefill)
    # The gradients the stack's backward receives for (y1, y2) are fresh tensors that nothing
    # else holds (ReformerLM's fused loss makes them), so the backward may reuse their storage.
    owned_grads: bool = False
    stack: StackState | None = None  # set by a reversible stack's training forward
    # Sequence parallelism: this process holds a slice of the positions; attention_mask is
    # then the whole sequence's (B, L) mask, which only the attention core reads.
    exchange: HeadExchange | None = None


def _exchanged(attn: nn.Module, call: CallInfo) -> bool:
    """Whether ``attn``'s heads go through the sequence-parallel head exchange."""
    return call.exchange is not None and not call.exchange.splits(attn)


def _parts(attn: nn.Module, call: CallInfo) -> int:
    """Head slices hold a multiple of this many heads: the sequence-parallel processes' when
    the layer's heads are exchanged."""
    return call.exchange.parts if _exchanged(attn, call) else 1


@dataclass
class HalfRecord:
    """What a half-block keeps from its forward for the backward: RNG state (halves whose
    dropout is not keyed), the attention state (LSH rotations and buckets, the attention
    dropout seed) and the keyed hidden-dropout masks (reformer._dropout), which need no
    RNG to be rebuilt."""

    rng: tuple | None = None
    attn: AttentionState = field(default_factory=AttentionState)
    drops: tuple[PositionDropout | None, ...] = ()


def _start(call: CallInfo) -> int:
    """The global position of the first position this process holds."""
    return 0 if call.exchange is None else call.exchange.start


def output_drop(rec: HalfRecord) -> PositionDropout | None:
    """An attention half's output dropout (None in eval, at p = 0 and when prefilling)."""
    return rec.drops[0] if rec.drops else None


def _leaf_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached stand-ins for a module's parameters, to recompute it under functional_call.

    Differentiating the recomputation with respect to these, not the real parameters, keeps
    the partial gradients of each chunk away from the parameters' hooks: the hooks see only
    the total, once, when the autograd Function returns it.
    """
    return {name: p.detach().requires_grad_(True) for name, p in module.named_parameters()}


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], grad: torch.Tensor) -> Grads:
    gs = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, gs, strict=True)]


def _block(x: torch.Tensor) -> int:
    """Rows per block of the attention half's position-wise work on x's device."""
    return plan_for(x.device).rows(ROWS, x.shape[-1])


def _slices(attn: nn.Module, x: torch.Tensor, call: CallInfo) -> list[slice]:
    """The head slices of a layer for x (B, L, D) on its device's plan."""
    length = x.shape[1] if call.exchange is None else call.exchange.length
    size = plan_for(x.device).heads_per_slice(attn.n_heads, length)
    return attn.head_slices(_parts(attn, call), size)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (N, D), a view (the stack's streams are contiguous)."""
    return x.view(-1, x.shape[-1])


def _product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a matrix product of ``x`` here: autocast's when it is on for x's device,
    else x's own. An operand used by several products is cast to it once, not by autocast
    at each product (on the CPU a cast of a block costs about half its bf16 product)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """LayerNorm(x) with the statistics its backward needs: (out, mean, rstd)."""
    return torch.native_layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _layer_norm_backward_(norm: nn.LayerNorm, x: torch.Tensor, stats: tuple,
                          grad_out: torch.Tensor, grad_x: torch.Tensor, grads: dict) -> None:
    """grad_x += dL/dx and the parameters' gradients += theirs, for out = LayerNorm(x) and
    ``stats`` = (mean, rstd) from :func:`_layer_norm`."""
    gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
        grad_out.to(x.dtype), x, list(norm.normalized_shape), *stats, norm.weight, norm.bias,
        [True, True, True])
    grad_x += gx
    grads[norm.weight] += gw
    grads[norm.bias] += gb


class AttentionHalf(nn.Module):
    """f(x) = Dropout(Attention(LayerNorm(x))), computed over slices of heads.

    In the reversible stack (``add_forward_``, ``backward_``) each head slice's projections are
    computed block of rows by block of rows from a recomputed LayerNorm, and W_o, the
    projections and the LayerNorm are differentiated by hand block by block: per head slice
    only (N, h*E) tensors exist, never an (N, D) one besides the two streams and their
    gradients.
    """

    def __init__(self, config: ReformerConfig, layer_index: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = ATTENTION_MODULES[config.layer_kind(layer_index)](config, layer_index)
        self.dropout = config.dropout

    def uses_rng(self) -> bool:
        """False: its masks are keyed (the record holds their seeds), nothing to replay."""
        return False

    def begin(self, x: torch.Tensor, call: CallInfo) -> HalfRecord:
        if call.caches is not None:  # prefill: hash with the decode's fixed rotations
            rotations = call.caches[self.attn.layer_index].rotations
            if rotations is not None:
                return HalfRecord(attn=self.attn.prepare(x, rotations=rotations))
        state = (self.attn.prepare(x, call.n_hashes) if call.exchange is None
                 else self.attn.prepare(x, call.n_hashes, length=call.exchange.length))
        state = self.attn.with_dropout_seed(state)
        drop = position_dropout(self.dropout if self.training else 0.0, x.shape[1], _start(call))
        return HalfRecord(attn=state, drops=(drop,))

    def core(self, projected: list[torch.Tensor], heads: slice, rec: HalfRecord,
             call: CallInfo) -> torch.Tensor:
        """The attention core of one slice of heads, (B, h, L, E) each -> (B, h, L, E), through
        the sequence-parallel exchange when there is one."""
        if call.exchange is None:
            return self.attn.core(projected, heads, rec.attn, call.attention_mask)
        if call.exchange.splits(self.attn):
            return call.exchange.lsh_core(self.attn, projected, heads, rec.attn,
                                          call.attention_mask)
        return call.exchange(self.attn.core, projected, heads, rec.attn, call.attention_mask)

    def forward(self, x: torch.Tensor, rec: HalfRecord, call: CallInfo) -> torch.Tensor:
        h = self.norm(x)
        if call.caches is not None:
            self.attn.fill_cache(h, call.caches[self.attn.layer_index])
        drop = output_drop(rec)
        keep = None if drop is None else drop.like(x)
        out = None
        for heads in _slices(self.attn, x, call):
            projected = [self.attn.project(w, h, heads) for w in self.attn.projections()]
            part = self.attn.merge(self.core(projected, heads, rec, call), heads)
            part = part if keep is None else part * keep  # dropout is linear: per slice
            out = part if out is None else out + part
        return out

    def _columns(self, heads: slice) -> slice:
        E = self.attn.d_head
        return slice(heads.start * E, heads.stop * E)

    def _groups(self, x: torch.Tensor, call: CallInfo) -> list[tuple[slice, list[slice]]]:
        """The head slices in groups whose projections, (N, n_proj*h*E) values, fit in
        ``PROJECT_ELEMENTS``: (the group's heads, its slices). A group is projected, and
        merged through W_o, at once."""
        per_head = x[..., 0].numel() * self.attn.d_head * len(self.attn.projections())
        groups: list[list[slice]] = [[]]
        for heads in _slices(self.attn, x, call):
            size = (heads.stop - groups[-1][0].start) * per_head if groups[-1] else 0
            if size > PROJECT_ELEMENTS:
                groups.append([])
            groups[-1].append(heads)
        return [(slice(g[0].start, g[-1].stop), g) for g in groups]

    def _heads_view(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """(N, h*E) rows -> (B, h, L, E), a view."""
        return rows.view(batch, rows.shape[0] // batch, -1, self.attn.d_head).transpose(1, 2)

    def _projected(self, x: torch.Tensor, heads: slice) -> list[torch.Tensor]:
        """The projections of LayerNorm(x) for ``heads``, each (B, h, L, E), a view of
        (N, h*E) rows."""
        B, L, _ = x.shape
        cols, x_rows, dtype = self._columns(heads), _rows(x), _product_dtype(x)
        weights = [lin.weight[cols].t().to(dtype) for lin in self.attn.projections()]  # no biases
        outs = [x_rows.new_empty(x_rows.shape[0], w.shape[1], dtype=dtype) for w in weights]
        for s in row_chunks(x_rows.shape[0], _block(x_rows)):
            h = self.norm(x_rows[s]).to(dtype)  # cast once for every projection
            for out, w in zip(outs, weights, strict=True):  # straight into the rows
                torch.mm(h, w, out=out[s])  # (out= skips autocast)
        return [self._heads_view(o, B) for o in outs]

    def add_forward_(self, x: torch.Tensor, acc: torch.Tensor, rec: HalfRecord,
                     call: CallInfo) -> None:
        """acc += f(x), in place (no autograd)."""
        if _exchanged(self.attn, call):
            return call.exchange.add_forward_(self, x, acc, rec, call)
        keep = output_drop(rec)
        B, N = x.shape[0], x.shape[0] * x.shape[1]
        for group, slices in self._groups(x, call):
            projected = self._projected(x, group)
            o = None  # the group's outputs, (B, h, L, E) over (N, h*E) rows
            for heads in slices:
                part = slice(heads.start - group.start, heads.stop - group.start)
                o_part = self.core([p[:, part] for p in projected], heads, rec, call)
                if o is None:  # in the core's dtype (autocast's, when it is on)
                    width = (group.stop - group.start) * self.attn.d_head
                    o = self._heads_view(o_part.new_empty(N, width), B)
                o[:, part] = o_part
            del projected
            self._merge_into(o, group, acc, keep, sign=1.0)

    def _merge_into(self, o: torch.Tensor, heads: slice, acc: torch.Tensor,
                    keep: PositionDropout | None, sign: float) -> torch.Tensor:
        """acc += sign * Dropout(o W_o^T) over blocks of rows; returns o as (N, h*E) rows."""
        o_rows = o.transpose(1, 2).reshape(acc.numel() // acc.shape[-1], -1)
        w_o, acc_rows = self.attn.w_o.weight[:, self._columns(heads)], _rows(acc)
        for s in row_chunks(o_rows.shape[0], _block(acc)):
            acc_rows[s].add_(drop_rows(keep, F.linear(o_rows[s], w_o), s), alpha=sign)
        return o_rows

    def backward_(self, x: torch.Tensor, y: torch.Tensor, grad_y: torch.Tensor,
                  grad_x: torch.Tensor, rec: HalfRecord, call: CallInfo, grads: dict) -> None:
        """For y = x' + f(x): turn ``y`` into x' = y - f(x) and add dL/dx through f to
        ``grad_x``, both in place; add the parameter gradients to ``grads[p]``.

        Per group of heads: its projections and dL/do first; then each slice's attention is
        recomputed and differentiated, and its gradients overwrite its projections and its
        outputs overwrite its dL/do (each consumed by then), so a group holds two sets of
        rows, not four; then W_o and the projections are differentiated for the group."""
        if _exchanged(self.attn, call):
            return call.exchange.backward_(self, x, y, grad_y, grad_x, rec, call, grads)
        attn, x_rows, gy_rows, gx_rows = self.attn, _rows(x), _rows(grad_y), _rows(grad_x)
        keep = output_drop(rec)  # the forward's masks
        for group, slices in self._groups(x, call):
            projected = self._projected(x, group)
            grad_o = self._grad_merged(gy_rows, group, keep, x.shape[0])
            for heads in slices:
                part = slice(heads.start - group.start, heads.stop - group.start)
                inputs = [p[:, part].detach().requires_grad_(True) for p in projected]
                with torch.enable_grad():
                    o = self.core(inputs, heads, rec, call)
                grad_in = _grads(o, inputs, grad_o[:, part])
                del inputs  # this slice's graph is gone: its rows can be reused
                for p, g in zip(projected, grad_in, strict=True):
                    p[:, part] = g  # the projections' rows now hold their gradients
                grad_o[:, part] = o.detach()  # and dL/do's rows the outputs
                del o, grad_in
            o_rows = self._merge_into(grad_o, group, y, keep, sign=-1.0)  # y -= o W_o^T
            grad_w_o = grads[attn.w_o.weight][:, self._columns(group)]
            for s in row_chunks(o_rows.shape[0], _block(gy_rows)):
                grad_w_o += drop_rows(keep, gy_rows[s], s).t() @ o_rows[s]
            del grad_o, o_rows
            self._projections_backward_(x_rows, group, projected, gx_rows, grads)
            del projected

    def _grad_merged(self, gy_rows: torch.Tensor, heads: slice, keep: PositionDropout | None,
                     batch: int) -> torch.Tensor:
        """dL/do = Dropout'(dL/dy) W_o for ``heads``: (B, h, L, E), a view of (N, h*E) rows, in
        the products' dtype (autocast's, when it is on, like the outputs o it later holds)."""
        dtype = _product_dtype(gy_rows)
        w_o = self.attn.w_o.weight[:, self._columns(heads)].to(dtype)  # cast once, not per block
        grad_o = gy_rows.new_empty(gy_rows.shape[0], w_o.shape[1], dtype=dtype)
        for s in row_chunks(gy_rows.shape[0], _block(gy_rows)):
            g = drop_rows(keep, gy_rows[s], s)
            torch.mm(g.to(dtype), w_o, out=grad_o[s])
        return self._heads_view(grad_o, batch)

    def _projections_backward_(self, x_rows: torch.Tensor, heads: slice, grad_in: Grads,
                               gx_rows: torch.Tensor, grads: dict) -> None:
        """From the gradients of the projected inputs (B, h, L, E): add the projections' and
        LayerNorm's parameter gradients and dL/dx, block of rows by block of rows."""
        cols = self._columns(heads)
        grad_in = [g.transpose(1, 2).reshape(x_rows.shape[0], -1) for g in grad_in]
        for s in row_chunks(x_rows.shape[0], _block(x_rows)):
            h, *stats = _layer_norm(self.norm, x_rows[s])
            h = h.to(_product_dtype(h))  # cast once for every projection
            grad_h = None
            for lin, g in zip(self.attn.projections(), grad_in, strict=True):
                grads[lin.weight][cols] += g[s].t() @ h
                part = g[s] @ lin.weight[cols]
                grad_h = part if grad_h is None else grad_h.add_(part)
            _layer_norm_backward_(self.norm, x_rows[s], stats, grad_h, gx_rows[s], grads)


class FeedForwardHalf(nn.Module):
    """g(x) = FeedForward(LayerNorm(x)), computed over blocks of positions.

    Without dropout its backward is written out (LayerNorm by ATen's own backward, the two
    linear layers and the activation by hand), block by block, with the activation's buffer
    reused for its gradient; with dropout it differentiates the recomputed block with
    autograd.
    """

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ff = FeedForward(config)
        self.chunk, self.width = config.ff_chunk_size, config.d_ff

    def uses_rng(self) -> bool:
        """False: its masks are keyed (the record holds their seeds), nothing to replay."""
        return False

    def _block(self, rows: torch.Tensor) -> int:
        """Rows per block on the rows' device (its (rows, d_ff) activation bounds it)."""
        return plan_for(rows.device).rows(self.chunk, self.width)

    def begin(self, x: torch.Tensor, call: CallInfo) -> HalfRecord:
        """The dropout masks of the hidden layer and of the output, keyed by position."""
        p = self.ff.dropout if self.training else 0.0
        if p <= 0:
            return HalfRecord()
        start = _start(call)
        return HalfRecord(drops=(position_dropout(p, x.shape[1], start),
                                 position_dropout(p, x.shape[1], start)))

    def _ff(self, x_rows: torch.Tensor, rows: slice, rec: HalfRecord) -> torch.Tensor:
        """FeedForward(LayerNorm(.)) of the flat rows ``rows`` (n, D), with their masks."""
        return self.ff(self.norm(x_rows), rec.drops, rows)

    def forward(self, x: torch.Tensor, rec: HalfRecord, call: CallInfo,
                first_row: int = 0) -> torch.Tensor:
        """g(x) for x (B, l, D), or for flat rows (n, D) from ``first_row`` on (a block of
        the backward's recomputation)."""
        rows = x.reshape(-1, x.shape[-1])  # (N, D)
        parts = [self._ff(rows[s], slice(first_row + s.start, first_row + s.stop), rec)
                 for s in row_chunks(rows.shape[0], self._block(rows))]
        return torch.cat(parts).view_as(x) if len(parts) > 1 else parts[0].view_as(x)

    def add_forward_(self, x: torch.Tensor, acc: torch.Tensor, rec: HalfRecord,
                     call: CallInfo) -> None:
        """acc += g(x), in place (no autograd)."""
        rows, acc_rows = _rows(x), _rows(acc)
        for s in row_chunks(rows.shape[0], self._block(rows)):
            acc_rows[s].add_(self._ff(rows[s], s, rec))

    def backward_(self, x: torch.Tensor, y: torch.Tensor, grad_y: torch.Tensor,
                  grad_x: torch.Tensor, rec: HalfRecord, call: CallInfo, grads: dict) -> None:
        """For y = x' + g(x): turn ``y`` into x' = y - g(x) and add dL/dx through g to
        ``grad_x``, both in place, block by block; add the parameter gradients to
        ``grads[p]``."""
        rows, y_rows, gy_rows, gx_rows = _rows(x), _rows(y), _rows(grad_y), _rows(grad_x)
        if rec.drops:
            self._autograd_backward_(rows, y_rows, gy_rows, gx_rows, rec, call, grads)
            return
        for s in row_chunks(rows.shape[0], self._block(rows)):
            self._block_backward_(rows[s], y_rows[s], gy_rows[s], gx_rows[s], grads)

    def _block_backward_(self, xs: torch.Tensor, ys: torch.Tensor, gy: torch.Tensor,
                         gx: torch.Tensor, grads: dict) -> None:
        """One block of rows without dropout: ys -= g(xs), gx += dL/dxs, grads += the
        parameters' gradients."""
        w_in, w_out = self.ff.w_in, self.ff.w_out
        h, *stats = _layer_norm(self.norm, xs)
        h, gy_mm = h.to(_product_dtype(h)), gy.to(_product_dtype(gy))  # each cast once, not twice
        if self.ff.relu:  # relu(h W_in^T + b_in) needs no pre-activation for its backward
            act, pre = self.ff.hidden(h), None  # (n, F)
        else:
            pre = F.linear(h, w_in.weight, w_in.bias)
            act = self.ff.activate(pre)
        ys -= F.linear(act, w_out.weight, w_out.bias)
        grads[w_out.weight] += gy_mm.t() @ act
        grads[w_out.bias] += gy.sum(dim=0)
        grad_act = gy_mm @ w_out.weight  # (n, F)
        if self.ff.relu:  # relu' = [relu(pre) > 0], in grad_act's buffer
            grad_pre = torch.ops.aten.threshold_backward.grad_input(grad_act, act, 0,
                                                                     grad_input=grad_act)
        else:
            grad_pre = torch.ops.aten.gelu_backward(grad_act, pre)
        del act, pre
        grads[w_in.weight] += grad_pre.t() @ h
        grads[w_in.bias] += grad_pre.sum(dim=0)
        _layer_norm_backward_(self.norm, xs, stats, grad_pre @ w_in.weight, gx, grads)

    def _autograd_backward_(self, rows: torch.Tensor, y_rows: torch.Tensor,
                            gy_rows: torch.Tensor, gx_rows: torch.Tensor, rec: HalfRecord,
                            call: CallInfo, grads: dict) -> None:
        """The backward with dropout: each block recomputed (its masks rebuilt from their
        keys) and differentiated by autograd."""
        params = _leaf_params(self)
        for s in row_chunks(rows.shape[0], self._block(rows)):
            with torch.enable_grad():
                xs = rows[s].detach().requires_grad_(True)
                ys = functional_call(self, params, (xs, rec, call, s.start))  # one chunk
                g = _grads(ys, [xs, *params.values()], gy_rows[s])
            y_rows[s] -= ys.detach()
            gx_rows[s] += g[0]
            for p, gp in zip(self.parameters(), g[1:], strict=True):
                grads[p] += gp
            del ys, g


class ReversibleBlock(nn.Module):
    """One layer: y1 = x1 + f(x2), y2 = x2 + g(y1)."""

    def __init__(self, config: ReformerConfig, layer_index: int) -> None:
        super().__init__()
        self.f = AttentionHalf(config, layer_index)
        self.g = FeedForwardHalf(config)

    @staticmethod
    def record(half: nn.Module, x: torch.Tensor, call: CallInfo) -> HalfRecord:
        """What the half's backward will replay: its per-call state and RNG state."""
        rec = half.begin(x, call)
        if half.uses_rng():
            rec.rng = capture_rng(x.device)
        return rec

    def step(self, x1: torch.Tensor, x2: torch.Tensor, cache: LayerCache) -> tuple:
        """One new position (B, 1, D) per stream, attending over ``cache`` (eval mode)."""
        y1 = x1 + self.f.attn.step(self.f.norm(x2), cache)  # y1 = x1 + f(x2)
        return y1, x2 + self.g.ff(self.g.norm(y1))  # y2 = x2 + g(y1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, call: CallInfo) -> tuple:
        """(y1, y2): reversible (one autograd node, see :class:`_BlockFunction`) inside a
        reversible stack's training forward, else plain autograd.

        The stack calls each block through ``__call__``, so module hooks (FSDP2's gathering
        of a sharded block's parameters) see every block's forward."""
        if call.stack is not None:
            return _BlockFunction.apply(x1, x2, self, call.stack, *self.parameters())
        return self.forward_plain(x1, x2, call)[:2]

    def forward_plain(self, x1: torch.Tensor, x2: torch.Tensor, call: CallInfo) -> tuple:
        """Plain (non-reversible) forward; returns (y1, y2, f record, g record)."""
        f_rec = self.record(self.f, x2, call)
        y1 = x1 + self.f(x2, f_rec, call)  # y1 = x1 + f(x2)
        g_rec = self.record(self.g, y1, call)
        return y1, x2 + self.g(y1, g_rec, call), f_rec, g_rec  # y2 = x2 + g(y1)

    def forward_(self, x1: torch.Tensor, x2: torch.Tensor, call: CallInfo) -> tuple:
        """The same in place: x1 becomes y1 and x2 becomes y2 (no autograd)."""
        f_rec = self.record(self.f, x2, call)
        self.f.add_forward_(x2, x1, f_rec, call)
        g_rec = self.record(self.g, x1, call)
        self.g.add_forward_(x1, x2, g_rec, call)
        return f_rec, g_rec


class StackState:
    """What the autograd nodes of one reversible forward share.

    ``streams`` are the two (B, L, D) buffers that every block updates in place: after the
    forward they hold the final (y1, y2), and each block's backward turns them back into its
    inputs. They are held as detached aliases: a node's outputs are fresh aliases of the same
    memory, so autograd never sees an input modified in place (module hooks may wrap a block's
    inputs in views of their own). ``grad_streams`` are the two gradient buffers the nodes pass
    down, updated in place by each block's backward.
    """

    def __init__(self, call: CallInfo, sharded: bool) -> None:
        self.call, self.sharded = call, sharded
        self.streams: tuple[torch.Tensor, torch.Tensor] | None = None
        self.grad_streams: tuple[torch.Tensor, torch.Tensor] | None = None
        self.block_params: list[list[torch.Tensor]] = []  # per block, in forward order
        self.grads: dict[torch.Tensor, torch.Tensor] = {}

    def own_grads(self, grad_y1: torch.Tensor | None, grad_y2: torch.Tensor | None) -> tuple:
        """The gradient buffers to update in place: the ones handed down by the block above,
        or, at the top, the incoming gradients. Unless ``call.owned_grads`` says nothing
        else holds them, those and the outputs (the streams) are copied first."""
        if self.grad_streams is not None and grad_y1 is self.grad_streams[0] \
                and grad_y2 is self.grad_streams[1]:
            return self.grad_streams
        y1 = self.streams[0]
        g1 = torch.zeros_like(y1) if grad_y1 is None else grad_y1.contiguous()
        g2 = torch.zeros_like(y1) if grad_y2 is None else grad_y2.contiguous()
        top = self.grad_streams is None
        if not top or not self.call.owned_grads:
            g1, g2 = g1.clone(), g2.clone()  # someone else may hold them
        if top and not self.call.owned_grads:  # and the outputs
            self.streams = tuple(s.clone() for s in self.streams)
        self.grad_streams = (g1, g2)
        return self.grad_streams

    def param_grads(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Zeroed gradient buffers for a block's parameters. Unsharded, every block's buffers
        are allocated at the first block's backward, before any layer's temporaries exist:
        allocated layer by layer they would sit between the next layers' temporaries and
        fragment the heap, which then grows with depth (see _memory.py). Sharded (FSDP), only
        this block's parameters are gathered now, so only its buffers are allocated."""
        if not self.grads:
            todo = [params] if self.sharded else self.block_params
            self.grads = {p: torch.zeros_like(p) for ps in todo for p in ps}
        return {p: self.grads.pop(p) for p in params}


class _Streams(torch.autograd.Function):
    """x -> (x1, x2) = (x, x): the two streams of a reversible stack, as two buffers that the
    blocks then update in place (so the caller's x is copied once, not per layer)."""

    @staticmethod
    def forward(ctx, x, state):
        if x.device.type == "cpu":
            keep_freed_memory()  # reuse the step's temporaries' pages (see _memory.py)
        x1, x2 = (x.clone(memory_format=torch.contiguous_format) for _ in range(2))
        state.streams = (x1.detach(), x2.detach())
        ctx.state = state
        return x1, x2

    @staticmethod
    def backward(ctx, grad_x1, grad_x2):
        mine = ctx.state.grad_streams
        ctx.state = None
        if mine is not None and grad_x1 is mine[0] and grad_x2 is mine[1]:
            return grad_x1.add_(grad_x2), None  # dL/dx = dL/dx1 + dL/dx2
        return grad_x1 + grad_x2, None


class _BlockFunction(torch.autograd.Function):
    """One reversible block as one autograd node that keeps nothing of its activations.

    The forward turns the stack's streams from (x1, x2) into (y1, y2) in place and returns
    fresh aliases of them; the backward turns them back into (x1, x2), adds dL/dx into the
    gradient buffers in place and returns them, with this block's parameter gradients. One
    node per block, so autograd hands a block's parameter gradients on (to DDP's buckets,
    FSDP's reduce-scatter, hooks) as soon as that block is done, while the blocks below are
    still being recomputed. Blocks run their backward strictly in reverse order (each needs
    the gradients of the one above), which is what sharing the streams requires.
    """

    @staticmethod
    def forward(ctx, x1, x2, block, state, *params):
        s1, s2 = state.streams  # the memory of x1 and x2
        ctx.records = block.forward_(s1, s2, state.call)
        ctx.block, ctx.state, ctx.params = block, state, params
        ctx.autocast = (s1.device.type, torch.is_autocast_enabled(s1.device.type),
                        torch.get_autocast_dtype(s1.device.type))
        state.block_params.append(list(params))
        return s1.detach(), s2.detach()

    @staticmethod
    def backward(ctx, grad_y1, grad_y2):
        state, block, (f_rec, g_rec) = ctx.state, ctx.block, ctx.records
        grad_y1, grad_y2 = state.own_grads(grad_y1, grad_y2)
        y1, y2 = state.streams  # a second backward (retain_graph) fails: they change below
        grads = state.param_grads(list(ctx.params))
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):  # masks: keyed
            block.g.backward_(y1, y2, grad_y2, grad_y1, g_rec, state.call, grads)  # x2 = y2 - g(y1)
            block.f.backward_(y2, y1, grad_y1, grad_y2, f_rec, state.call, grads)  # x1 = y1 - f(x2)
        ctx.records = ctx.state = None
        return (grad_y1, grad_y2, None, None, *(grads[p] for p in ctx.params))


class ReversibleStack(nn.Module):
    """The layer stack; reversible (memory O(1) in depth) or plain autograd (``reversible``).

    ``sharded`` is set by whoever shards each block's parameters (reformer.parallel's FSDP2
    wiring): gradient buffers are then allocated one block at a time.
    """

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ReversibleBlock(config, i) for i in range(config.n_layers))
        self.reversible = config.reversible
        self.sharded = False

    def forward(self, x: torch.Tensor, call: CallInfo,
                reversible: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) embeddings -> final streams (y1, y2), each (B, L, D)."""
        reversible = self.reversible if reversible is None else reversible
        if reversible and torch.is_grad_enabled():
            call = replace(call, stack=StackState(call, self.sharded))
            x1, x2 = _Streams.apply(x, call.stack)
        else:
            x1 = x2 = x
        for block in self.blocks:
            x1, x2 = block(x1, x2, call)
        return x1, x2
