"""Reversible residual blocks (Reformer section 3; Gomez et al. 2017, RevNets).

Each layer maps two streams (x1, x2) to (y1, y2):

    y1 = x1 + f(x2),   f = Attention(LayerNorm(.))
    y2 = x2 + g(y1),   g = FeedForward(LayerNorm(.))

and is inverted exactly by ``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``. The stack's forward keeps
only the final (y1, y2); its backward walks the layers in reverse, recomputing each layer's
inputs from its outputs, so activation memory does not grow with depth.

The backward of each half is itself chunked (DESIGN.md 1.6): g over blocks of positions, f over
slices of heads (each recomputed, differentiated and freed before the next). Dropout masks are
replayed by restoring the RNG state recorded before each half's forward and consuming it in
the same order; LSH bucket ids are recorded in the forward and reused, since recomputed inputs
can differ in the last bit and flip a bucket.

Shapes: B batch, L length, D d_model, N = B*L rows.

Decision: parameter gradients are *returned* by the autograd Function (the parameters are its
inputs) rather than accumulated into ``.grad`` behind autograd's back, so that
``torch.autograd.grad``, gradient hooks and DistributedDataParallel see them as usual. The
recomputation runs on detached stand-ins of the parameters (``functional_call``), so hooks see
each total gradient once, not once per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from reformer._rng import capture_rng, replay_rng
from reformer.attention import ATTENTION_MODULES, AttentionState
from reformer.attention.base import LayerCache
from reformer.config import ReformerConfig
from reformer.layers import FeedForward, dropout_keep, row_chunks

Grads = list[torch.Tensor]


@dataclass
class CallInfo:
    """What one forward call passes to every layer."""

    attention_mask: torch.Tensor | None = None
    n_hashes: int | None = None
    caches: list[LayerCache] | None = None  # filled with each layer's keys (prefill)
    # The gradients the stack's backward receives for (y1, y2) are fresh tensors that nothing
    # else holds (ReformerLM's fused loss makes them), so the backward may reuse their storage.
    owned_grads: bool = False


@dataclass
class HalfRecord:
    """What a half-block keeps from its forward for the backward: RNG state, LSH buckets."""

    rng: tuple | None = None
    attn: AttentionState = field(default_factory=AttentionState)


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


def _accumulate(total: Grads | None, new: Grads) -> Grads:
    return new if total is None else [a + b for a, b in zip(total, new, strict=True)]


class AttentionHalf(nn.Module):
    """f(x) = Dropout(Attention(LayerNorm(x))), computed over slices of heads."""

    def __init__(self, config: ReformerConfig, layer_index: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = ATTENTION_MODULES[config.layer_kind(layer_index)](config, layer_index)
        self.dropout = config.dropout

    def uses_rng(self) -> bool:
        return self.training and (self.dropout > 0 or self.attn.config.attention_dropout > 0)

    def begin(self, x: torch.Tensor, call: CallInfo) -> HalfRecord:
        if call.caches is not None:  # prefill: hash with the decode's fixed rotations
            rotations = call.caches[self.attn.layer_index].rotations
            if rotations is not None:
                return HalfRecord(attn=self.attn.prepare(x, rotations=rotations))
        return HalfRecord(attn=self.attn.prepare(x, call.n_hashes))

    def forward(self, x: torch.Tensor, rec: HalfRecord, call: CallInfo) -> torch.Tensor:
        h = self.norm(x)
        if call.caches is not None:
            self.attn.fill_cache(h, call.caches[self.attn.layer_index])
        keep = dropout_keep(x, self.dropout if self.training else 0.0)
        out = None
        for heads in self.attn.head_slices():
            part = self.attn.heads_forward(h, heads, rec.attn, call.attention_mask)
            part = part if keep is None else part * keep  # dropout is linear: per slice
            out = part if out is None else out + part
        return out

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor, rec: HalfRecord,
                 call: CallInfo) -> tuple[torch.Tensor, torch.Tensor, Grads]:
        """Recompute f(x) head slice by head slice; return f(x), dL/dx and parameter grads."""
        attn_params, norm_params = _leaf_params(self.attn), _leaf_params(self.norm)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            h = functional_call(self.norm, norm_params, (x,))
            h_in = h.detach().requires_grad_(True)
            keep = dropout_keep(x, self.dropout if self.training else 0.0)
            out, grad_h, attn_grads = torch.zeros_like(x), torch.zeros_like(h), None
            for heads in self.attn.head_slices():
                part = functional_call(self.attn, attn_params, (h_in, call.attention_mask),
                                       {"state": rec.attn, "heads": heads})
                part = part if keep is None else part * keep
                g = _grads(part, [h_in, *attn_params.values()], grad_out)
                grad_h += g[0]
                attn_grads = _accumulate(attn_grads, g[1:])
                out += part.detach()
                del part, g
            grad_x, *norm_grads = _grads(h, [x, *norm_params.values()], grad_h)
        return out, grad_x, norm_grads + attn_grads  # order of self.parameters()


class FeedForwardHalf(nn.Module):
    """g(x) = FeedForward(LayerNorm(x)), computed over blocks of positions."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ff = FeedForward(config)
        self.chunk = config.ff_chunk_size

    def uses_rng(self) -> bool:
        return self.training and self.ff.dropout > 0

    def begin(self, x: torch.Tensor, call: CallInfo) -> HalfRecord:
        return HalfRecord()

    def forward(self, x: torch.Tensor, rec: HalfRecord, call: CallInfo) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (N, D)
        parts = [self.ff(self.norm(rows[s])) for s in row_chunks(rows.shape[0], self.chunk)]
        return torch.cat(parts).view_as(x) if len(parts) > 1 else parts[0].view_as(x)

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor, rec: HalfRecord,
                 call: CallInfo) -> tuple[torch.Tensor, torch.Tensor, Grads]:
        """Recompute g(x) block by block; return g(x), dL/dx and parameter grads."""
        params = _leaf_params(self)
        rows, grad_rows = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, x.shape[-1])
        out, grad_x, param_grads = torch.empty_like(rows), torch.empty_like(rows), None
        with torch.enable_grad():
            for s in row_chunks(rows.shape[0], self.chunk):
                xs = rows[s].detach().requires_grad_(True)
                ys = functional_call(self, params, (xs, rec, call))  # one block: one chunk
                g = _grads(ys, [xs, *params.values()], grad_rows[s])
                grad_x[s], out[s] = g[0], ys.detach()
                param_grads = _accumulate(param_grads, g[1:])
                del ys, g
        return out.view_as(x), grad_x.view_as(x), param_grads


class ReversibleBlock(nn.Module):
    """One layer: y1 = x1 + f(x2), y2 = x2 + g(y1)."""

    def __init__(self, config: ReformerConfig, layer_index: int) -> None:
        super().__init__()
        self.f = AttentionHalf(config, layer_index)
        self.g = FeedForwardHalf(config)

    def half_forward(self, half: nn.Module, x: torch.Tensor, call: CallInfo) -> tuple:
        rec = half.begin(x, call)
        if half.uses_rng():
            rec.rng = capture_rng(x.device)
        return half(x, rec, call), rec

    def step(self, x1: torch.Tensor, x2: torch.Tensor, cache: LayerCache) -> tuple:
        """One new position (B, 1, D) per stream, attending over ``cache`` (eval mode)."""
        y1 = x1 + self.f.attn.step(self.f.norm(x2), cache)  # y1 = x1 + f(x2)
        return y1, x2 + self.g.ff(self.g.norm(y1))  # y2 = x2 + g(y1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, call: CallInfo) -> tuple:
        """Plain (non-reversible) forward; returns (y1, y2, f record, g record)."""
        f_out, f_rec = self.half_forward(self.f, x2, call)
        y1 = x1 + f_out  # y1 = x1 + f(x2)
        g_out, g_rec = self.half_forward(self.g, y1, call)
        return y1, x2 + g_out, f_rec, g_rec  # y2 = x2 + g(y1)


class _ReversibleFunction(torch.autograd.Function):
    """The whole stack as one autograd node that keeps only its final outputs."""

    @staticmethod
    def forward(ctx, x1, x2, blocks, call, *params):
        records = []
        for block in blocks:
            x1, x2, f_rec, g_rec = block(x1, x2, call)
            records.append((f_rec, g_rec))
        ctx.blocks, ctx.call, ctx.records = blocks, call, records
        ctx.autocast = (x1.device.type, torch.is_autocast_enabled(x1.device.type),
                        torch.get_autocast_dtype(x1.device.type))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, grad_y1, grad_y2):
        y1, y2 = ctx.saved_tensors
        grad_y1 = torch.zeros_like(y1) if grad_y1 is None else grad_y1
        grad_y2 = torch.zeros_like(y2) if grad_y2 is None else grad_y2
        device_type, enabled, dtype = ctx.autocast
        param_grads: Grads = []
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for block, (f_rec, g_rec) in zip(reversed(ctx.blocks), reversed(ctx.records),
                                             strict=True):
                with replay_rng(g_rec.rng, y1.device):
                    g_out, grad_from_g, g_grads = block.g.backward(y1, grad_y2, g_rec, ctx.call)
                x2 = y2 - g_out  # x2 = y2 - g(y1)
                grad_y1 = grad_y1 + grad_from_g  # dL/dy1 through both y1 and y2
                with replay_rng(f_rec.rng, y1.device):
                    f_out, grad_from_f, f_grads = block.f.backward(x2, grad_y1, f_rec, ctx.call)
                x1 = y1 - f_out  # x1 = y1 - f(x2)
                y1, y2, grad_y2 = x1, x2, grad_y2 + grad_from_f
                param_grads = f_grads + g_grads + param_grads
        ctx.records = None
        return (grad_y1, grad_y2, None, None, *param_grads)


class ReversibleStack(nn.Module):
    """The layer stack; reversible (memory O(1) in depth) or plain autograd (``reversible``)."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ReversibleBlock(config, i) for i in range(config.n_layers))
        self.reversible = config.reversible

    def forward(self, x: torch.Tensor, call: CallInfo,
                reversible: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) embeddings -> final streams (y1, y2), each (B, L, D)."""
        reversible = self.reversible if reversible is None else reversible
        if reversible and torch.is_grad_enabled():
            return _ReversibleFunction.apply(x, x, list(self.blocks), call, *self.parameters())
        x1 = x2 = x
        for block in self.blocks:
            x1, x2, _, _ = block(x1, x2, call)
        return x1, x2
