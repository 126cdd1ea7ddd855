"""The encoder-decoder's decoder (reformer.encoder_decoder): a causal reversible stack whose
layers add dense cross-attention to the encoder's output, the memory m.

    x1 = x2 = Embedding(tgt) + Positions                     (B, T, D)
    per decoder layer, three reversible half-residuals, each followed by a swap (as trax's):
        x1 = x1 + SelfAttention(LayerNorm(x2))               causal: lsh, local or full
        x2 = x2 + CrossAttention(LayerNorm(x1), m)           dense over the S source positions
        x1 = x1 + FeedForward(LayerNorm(x2))
        (x1, x2) = (x2, x1)
    logits = Linear(LayerNorm(concat(x1, x2)))               (B, T, V)

    CrossAttention(h, m) = softmax(q k^T / sqrt(E) + pad) v W_o,  q = h W_q, k = m W_k, v = m W_v

Shapes: B batch, S source length, T target length, D the decoder's d_model, De the encoder's
(m is (B, S, 2De)), H heads, E d_head, V vocab_size, t positions of one chunk.

Decisions:
- Each half-residual x_a += h(x_b) is undone by x_a -= h(x_b); the memory is constant inside
  the decoder, so the cross-attention half inverts like the others. Three swaps per layer (an
  odd number) make the streams trade roles from layer to layer, so that every half reads the
  earlier halves' outputs.
- Reversibility reuses the encoder's machinery (reformer.reversible): one autograd node per
  decoder layer (:class:`_DecoderLayerFunction`) on the stack's two stream buffers, updated
  in place; its backward recomputes the layer's inputs from its outputs, so no activation is
  kept per layer. It also returns that layer's share of dL/dm, which autograd sums over the
  layers and hands to the encoder. With ``reversible=False`` (and without grad) the layers
  run on plain autograd.
- The cross-attention works on chunks of ``cross_chunk_size`` target positions, in the forward
  and in the recomputing backward, so (B, H, t, S) scores exist for one chunk at a time; k and
  v (B, H, S, E) are projected once per layer and call, and their gradients summed over the
  chunks before one backward through W_k, W_v to the memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from reformer._rng import replay_rng
from reformer.attention._chunked import default_scale, mask_values
from reformer.attention.base import LayerCache
from reformer.config import ReformerConfig
from reformer.layers import dropout_keep, positional_embedding, row_chunks
from reformer.model import (
    ReformerTrunk,
)
from reformer.reversible import (
    AttentionHalf,
    CallInfo,
    FeedForwardHalf,
    HalfRecord,
    ReversibleBlock,
    StackState,
    _grads,
    _leaf_params,
    _Streams,
)

record = ReversibleBlock.record
_ATTEND = ("norm.weight", "norm.bias", "w_q.weight", "w_o.weight")  # the per-chunk parameters


def memory_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, S) bool source mask -> (B, 1, 1, S) additive logits: 0 on real tokens, -1e9 on
    padding (None without a mask)."""
    if attention_mask is None:
        return None
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~attention_mask.bool(), mask_values(dtype)[0])[:, None, None]


class CrossAttentionHalf(nn.Module):
    """c(x; m) = Dropout(CrossAttention(LayerNorm(x), m)), over chunks of target positions."""

    def __init__(self, config: ReformerConfig, memory_width: int, chunk: int) -> None:
        super().__init__()
        inner = config.n_heads * config.d_head
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.w_q = nn.Linear(config.d_model, inner, bias=False)
        self.w_k = nn.Linear(memory_width, inner, bias=False)
        self.w_v = nn.Linear(memory_width, inner, bias=False)
        self.w_o = nn.Linear(inner, config.d_model, bias=False)
        self.n_heads, self.d_head, self.chunk = config.n_heads, config.d_head, chunk
        self.dropout, self.attention_dropout = config.dropout, config.attention_dropout

    def uses_rng(self) -> bool:
        return self.training and (self.dropout > 0 or self.attention_dropout > 0)

    def begin(self, x: torch.Tensor, call: CallInfo) -> HalfRecord:
        return HalfRecord()

    def keys_values(self, memory: torch.Tensor, params: dict | None = None) -> list:
        """(B, S, 2De) memory -> [k, v], each (B, H, S, E)."""
        p = dict(self.named_parameters()) if params is None else params
        B, S, _ = memory.shape
        return [F.linear(memory, p[f"{name}.weight"]).view(B, S, self.n_heads, self.d_head)
                .transpose(1, 2) for name in ("w_k", "w_v")]

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None, keep: torch.Tensor | None = None,
               params: dict | None = None) -> torch.Tensor:
        """One chunk: x (B, t, D) over k, v (B, H, S, E) -> (B, t, D)."""
        p = dict(self.named_parameters()) if params is None else params
        B, t, D = x.shape
        h = F.layer_norm(x, (D,), p["norm.weight"], p["norm.bias"], self.norm.eps)
        q = F.linear(h, p["w_q.weight"]).view(B, t, self.n_heads, -1).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * default_scale(self.d_head)  # (B,H,t,S)
        if bias is not None:
            scores = scores + bias
        probs = F.dropout(torch.softmax(scores, dim=-1), self.attention_dropout, self.training)
        o = torch.matmul(probs, v).transpose(1, 2).reshape(B, t, -1)  # (B, t, H*E)
        out = F.linear(o, p["w_o.weight"])
        return out if keep is None else out * keep

    def _chunks(self, x: torch.Tensor) -> tuple[list[slice], torch.Tensor | None]:
        """The chunks of x's positions and the output's dropout multiplier (B, T, D), drawn
        first, then each chunk's attention dropout in order: the RNG order of every pass."""
        keep = dropout_keep(x, self.dropout if self.training else 0.0)
        return row_chunks(x.shape[1], self.chunk), keep

    def forward(self, x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor | None,
                rec: HalfRecord) -> torch.Tensor:
        """Plain autograd: (B, T, D) -> (B, T, D)."""
        k, v = self.keys_values(memory)
        chunks, keep = self._chunks(x)
        return torch.cat([self.attend(x[:, s], k, v, bias, None if keep is None else keep[:, s])
                          for s in chunks], dim=1)

    def add_forward_(self, x: torch.Tensor, acc: torch.Tensor, memory: torch.Tensor,
                     bias: torch.Tensor | None, rec: HalfRecord) -> None:
        """acc += c(x; m), in place (no autograd)."""
        k, v = self.keys_values(memory)
        chunks, keep = self._chunks(x)
        for s in chunks:
            acc[:, s] += self.attend(x[:, s], k, v, bias, None if keep is None else keep[:, s])

    def backward_(self, x: torch.Tensor, y: torch.Tensor, grad_y: torch.Tensor,
                  grad_x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor | None,
                  grads: dict, grad_memory: torch.Tensor | None) -> None:
        """For y = x' + c(x; m): turn ``y`` into x' = y - c(x; m), add dL/dx to ``grad_x`` and
        dL/dm to ``grad_memory`` (when not None), in place; add the parameters' gradients to
        ``grads[p]``. Each chunk is recomputed and differentiated on its own; dL/dk and dL/dv
        are summed over the chunks and taken back through W_k, W_v once."""
        params, real = _leaf_params(self), dict(self.named_parameters())
        with torch.no_grad():
            k, v = (t.detach().requires_grad_(True) for t in self.keys_values(memory))
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        chunks, keep = self._chunks(x)
        for s in chunks:
            with torch.enable_grad():
                xs = x[:, s].detach().requires_grad_(True)
                out = self.attend(xs, k, v, bias, None if keep is None else keep[:, s], params)
                g = _grads(out, [xs, k, v, *(params[n] for n in _ATTEND)], grad_y[:, s])
            y[:, s] -= out.detach()  # x' = y - c(x; m)
            grad_x[:, s] += g[0]
            grad_k += g[1]
            grad_v += g[2]
            for name, gp in zip(_ATTEND, g[3:], strict=True):
                grads[real[name]] += gp
            del out, g
        with torch.enable_grad():
            m = memory.detach().requires_grad_(grad_memory is not None)
            wanted = [params["w_k.weight"], params["w_v.weight"]] + [m] * (grad_memory is not None)
            g = torch.autograd.grad(self.keys_values(m, params), wanted, [grad_k, grad_v])
        grads[real["w_k.weight"]] += g[0]
        grads[real["w_v.weight"]] += g[1]
        if grad_memory is not None:
            grad_memory += g[2]


class DecoderLayer(nn.Module):
    """x1 += f(x2); x2 += c(x1; m); x1 += g(x2); then (x1, x2) = (x2, x1)."""

    def __init__(self, config: ReformerConfig, layer_index: int, memory_width: int,
                 cross_chunk_size: int) -> None:
        super().__init__()
        self.f = AttentionHalf(config, layer_index)
        self.cross = CrossAttentionHalf(config, memory_width, cross_chunk_size)
        self.g = FeedForwardHalf(config)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, memory: torch.Tensor,
                bias: torch.Tensor | None, call: CallInfo) -> tuple:
        """The swapped outputs (x2', x1'): reversible inside a reversible training forward (one
        autograd node, :class:`_DecoderLayerFunction`), else plain autograd."""
        if call.stack is not None:
            return _DecoderLayerFunction.apply(x1, x2, memory, self, call.stack, bias,
                                               *self.parameters())
        x1 = x1 + self.f(x2, record(self.f, x2, call), call)  # x1 += f(x2)
        x2 = x2 + self.cross(x1, memory, bias, record(self.cross, x1, call))  # x2 += c(x1; m)
        x1 = x1 + self.g(x2, record(self.g, x2, call), call)  # x1 += g(x2)
        return x2, x1

    def forward_(self, x1: torch.Tensor, x2: torch.Tensor, memory: torch.Tensor,
                 bias: torch.Tensor | None, call: CallInfo) -> tuple:
        """The same in place, before the swap (no autograd); returns the halves' records."""
        f_rec = record(self.f, x2, call)
        self.f.add_forward_(x2, x1, f_rec, call)
        c_rec = record(self.cross, x1, call)
        self.cross.add_forward_(x1, x2, memory, bias, c_rec)
        g_rec = record(self.g, x2, call)
        self.g.add_forward_(x2, x1, g_rec, call)
        return f_rec, c_rec, g_rec

    def step(self, x1: torch.Tensor, x2: torch.Tensor, cache: LayerCache, k: torch.Tensor,
             v: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        """One new position (B, 1, D) per stream, over the caches (eval mode)."""
        x1 = x1 + self.f.attn.step(self.f.norm(x2), cache)
        x2 = x2 + self.cross.attend(x1, k, v, bias)
        x1 = x1 + self.g.ff(self.g.norm(x2))
        return x2, x1


class _DecoderLayerFunction(torch.autograd.Function):
    """One decoder layer as one autograd node that keeps nothing of its activations (as
    reformer.reversible's ``_BlockFunction``, with the memory as a third input)."""

    @staticmethod
    def forward(ctx, x1, x2, memory, layer, state, bias, *params):
        s1, s2 = state.streams  # the memory of x1 and x2
        ctx.records = layer.forward_(s1, s2, memory, bias, state.call)
        ctx.layer, ctx.state, ctx.params, ctx.bias = layer, state, params, bias
        ctx.autocast = (s1.device.type, torch.is_autocast_enabled(s1.device.type),
                        torch.get_autocast_dtype(s1.device.type))
        ctx.save_for_backward(memory)
        state.block_params.append(list(params))
        state.streams = (s2, s1)  # the swap
        return s2.detach(), s1.detach()

    @staticmethod
    def backward(ctx, grad_y1, grad_y2):
        state, layer, (f_rec, c_rec, g_rec) = ctx.state, ctx.layer, ctx.records
        gy1, gy2 = state.own_grads(grad_y1, grad_y2)
        y1, y2 = state.streams
        x1, x2, g1, g2 = y2, y1, gy2, gy1  # undo the swap; the buffers become the inputs
        (memory,) = ctx.saved_tensors
        grad_memory = torch.zeros_like(memory) if ctx.needs_input_grad[2] else None
        grads, call, device = state.param_grads(list(ctx.params)), state.call, x1.device
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            with replay_rng(g_rec.rng, device):  # x1 -= g(x2)
                layer.g.backward_(x2, x1, g1, g2, g_rec, call, grads)
            with replay_rng(c_rec.rng, device):  # x2 -= c(x1; m)
                layer.cross.backward_(x1, x2, g2, g1, memory, ctx.bias, grads, grad_memory)
            with replay_rng(f_rec.rng, device):  # x1 -= f(x2)
                layer.f.backward_(x2, x1, g1, g2, f_rec, call, grads)
        state.streams, state.grad_streams = (x1, x2), (g1, g2)
        ctx.records = ctx.state = ctx.bias = None
        return (g1, g2, grad_memory, None, None, None, *(grads[p] for p in ctx.params))


class ReformerDecoder(nn.Module):
    """The decoder: embedding, positions, the reversible layers, LayerNorm(2D) and the output
    projection. Shares the trunk's input checks, embedding and initialisation."""

    check_inputs = ReformerTrunk._check_inputs
    embed_tokens = ReformerTrunk.embed_tokens
    _init_weights = ReformerTrunk._init_weights

    def __init__(self, config: ReformerConfig, memory_width: int, cross_chunk_size: int) -> None:
        super().__init__()
        self.config, self.reversible = config, config.reversible
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = positional_embedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, i, memory_width, cross_chunk_size)
                                    for i in range(config.n_layers))
        self.norm = nn.LayerNorm(2 * config.d_model, eps=config.layer_norm_eps)
        self.head = nn.Linear(2 * config.d_model, config.vocab_size)

    def streams(self, input_ids: torch.Tensor, memory: torch.Tensor,
                bias: torch.Tensor | None, call: CallInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) target ids -> the final streams (y1, y2), (B, T, D) each."""
        x = self.embed_tokens(input_ids)
        if self.reversible and torch.is_grad_enabled():
            call = replace(call, stack=StackState(call, sharded=False))
            x1, x2 = _Streams.apply(x, call.stack)
        else:
            x1 = x2 = x
        for layer in self.layers:
            x1, x2 = layer(x1, x2, memory, bias, call)
        return x1, x2


@dataclass
class DecoderCache:
    """An encoded source and the decoder's per-layer state, for decoding token by token.

    Shapes: B batch, S source length, H heads, E d_head.
    """

    bias: torch.Tensor | None  # (B, 1, 1, S) the source padding's logits
    cross: list[list[torch.Tensor]]  # per layer [k, v], each (B, H, S, E)
    layers: list[LayerCache]  # per layer, the self-attention's past positions

    @property
    def length(self) -> int:
        """Target positions decoded so far."""
        return self.layers[0].length
