"""The systems the benchmark compares, each built at one shape and wrapped as ``loss(ids)``.

Systems (issue 3): ``ours`` (reformer.ReformerLM, all-LSH), ``hf`` (transformers
ReformerModelWithLMHead, all-LSH), ``lucidrains`` (reformer_pytorch.ReformerLM), ``sdpa`` (a
plain pre-norm Transformer on F.scaled_dot_product_attention) and ``sdpa-ckpt`` (the same with
activation checkpointing per layer). A ``-bf16`` suffix runs any of them under CPU bf16
autocast, e.g. ``ours-bf16``.

Shapes: B batch (1), L length, D d_model, H heads, E d_head, F d_ff, V vocab (256 bytes).

Decisions:
- Every system gets the same shape (D 256, H 4 x E 64, F 1024, ReLU, causal, no dropout),
  the same hash rounds and the same attention window (chunk / bucket of 64, one chunk back);
  everything else is the library's default, as a user would get it.
- Positions: axial for the three Reformers (HF's axial shape must factor L exactly in training),
  a learned table for the SDPA Transformer.
- The anchors are imported lazily so that ``ours`` and ``sdpa`` run without them installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

SYSTEMS = ("ours", "hf", "lucidrains", "sdpa", "sdpa-ckpt")


@dataclass(frozen=True)
class Shape:
    """The benchmark shape (issue 3): everything but L, layers and hash rounds is fixed."""

    seq_len: int
    n_layers: int = 6
    n_hashes: int = 4
    d_model: int = 256
    n_heads: int = 4
    d_head: int = 64
    d_ff: int = 1024
    chunk_length: int = 64
    vocab_size: int = 256


def split_system(name: str) -> tuple[str, bool]:
    """'ours-bf16' -> ('ours', True); raises ValueError for an unknown system."""
    base, bf16 = (name[:-5], True) if name.endswith("-bf16") else (name, False)
    if base not in SYSTEMS:
        raise ValueError(f"system {name!r} is unknown; use one of {SYSTEMS}, optionally with "
                         "a '-bf16' suffix")
    return base, bf16


def axial_factors(seq_len: int) -> tuple[int, int]:
    """Two factors of L near sqrt(L) with product exactly L (1024 -> (32, 32))."""
    for f1 in range(math.isqrt(seq_len), 0, -1):
        if seq_len % f1 == 0:
            return f1, seq_len // f1
    raise AssertionError("unreachable: 1 divides every length")


def build(system: str, shape: Shape) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The model for ``system`` (base name, no -bf16) and a function ids (1, L) -> mean loss."""
    builders = {"ours": _ours, "hf": _hf, "lucidrains": _lucidrains,
                "sdpa": lambda s: _sdpa(s, ckpt=False), "sdpa-ckpt": lambda s: _sdpa(s, ckpt=True)}
    return builders[system](shape)


def _ours(s: Shape):
    from reformer import ReformerConfig, ReformerLM

    config = ReformerConfig(
        vocab_size=s.vocab_size, d_model=s.d_model, n_heads=s.n_heads, d_head=s.d_head,
        d_ff=s.d_ff, n_layers=s.n_layers, attn_layers=("lsh",), n_hashes=s.n_hashes,
        chunk_length=s.chunk_length, max_seq_len=s.seq_len)
    model = ReformerLM(config)
    return model, lambda ids: model(ids, labels=ids, return_logits=False).loss


def _hf(s: Shape):
    from transformers import ReformerConfig, ReformerModelWithLMHead
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "num_buckets is not set" notice on every call
    config = ReformerConfig(
        vocab_size=s.vocab_size, hidden_size=s.d_model, num_attention_heads=s.n_heads,
        attention_head_size=s.d_head, feed_forward_size=s.d_ff, hidden_act="relu",
        attn_layers=["lsh"] * s.n_layers, num_hashes=s.n_hashes,
        lsh_attn_chunk_length=s.chunk_length, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
        axial_pos_shape=list(axial_factors(s.seq_len)), axial_pos_embds_dim=[64, s.d_model - 64],
        max_position_embeddings=s.seq_len, is_decoder=True, use_cache=False,
        hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0, pad_token_id=None, eos_token_id=None)
    model = ReformerModelWithLMHead(config)
    return model, lambda ids: model(ids, labels=ids).loss


def _lucidrains(s: Shape):
    from reformer_pytorch import ReformerLM

    model = ReformerLM(
        num_tokens=s.vocab_size, dim=s.d_model, depth=s.n_layers, max_seq_len=s.seq_len,
        heads=s.n_heads, dim_head=s.d_head, bucket_size=s.chunk_length, n_hashes=s.n_hashes,
        ff_mult=s.d_ff // s.d_model, ff_activation=nn.ReLU, causal=True,
        axial_position_emb=True, axial_position_shape=axial_factors(s.seq_len))
    return model, lambda ids: _next_token_loss(model(ids), ids)


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # position t predicts ids[t + 1]; logits (1, L, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class SDPABlock(nn.Module):
    """Pre-norm layer: x + attn(LN(x)), then x + ff(LN(x)); exact causal attention."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.n_heads, self.d_head = s.n_heads, s.d_head
        self.norm1 = nn.LayerNorm(s.d_model)
        self.qkv = nn.Linear(s.d_model, 3 * s.n_heads * s.d_head)
        self.out = nn.Linear(s.n_heads * s.d_head, s.d_model)
        self.norm2 = nn.LayerNorm(s.d_model)
        self.ff = nn.Sequential(nn.Linear(s.d_model, s.d_ff), nn.ReLU(),
                                nn.Linear(s.d_ff, s.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, length, 3, self.n_heads, self.d_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, L, E) each
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, E)
        x = x + self.out(a.transpose(1, 2).reshape(b, length, -1))  # (B, L, D)
        return x + self.ff(self.norm2(x))


class SDPATransformer(nn.Module):
    """Token + learned position embedding, pre-norm blocks, final norm, output layer."""

    def __init__(self, s: Shape, ckpt: bool) -> None:
        super().__init__()
        self.ckpt = ckpt
        self.embed = nn.Embedding(s.vocab_size, s.d_model)
        self.pos = nn.Embedding(s.seq_len, s.d_model)
        self.blocks = nn.ModuleList(SDPABlock(s) for _ in range(s.n_layers))
        self.norm = nn.LayerNorm(s.d_model)
        self.head = nn.Linear(s.d_model, s.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos.weight[: ids.shape[1]]  # (B, L, D)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.ckpt else block(x)
        return self.head(self.norm(x))  # (B, L, V)


def _sdpa(s: Shape, ckpt: bool):
    model = SDPATransformer(s, ckpt)
    return model, lambda ids: _next_token_loss(model(ids), ids)
