"""Self-attention layers: LSH (the Reformer's), local (chunked by position) and full (exact)."""

from reformer.attention.base import AttentionState, HeadSlicedAttention
from reformer.attention.full import FullSelfAttention, full_attention
from reformer.attention.local import LocalSelfAttention, local_attention
from reformer.attention.lsh import LSHSelfAttention, bucketed_attention, lsh_attention

ATTENTION_MODULES = {
    "lsh": LSHSelfAttention,
    "local": LocalSelfAttention,
    "full": FullSelfAttention,
}

__all__ = [
    "ATTENTION_MODULES",
    "AttentionState",
    "FullSelfAttention",
    "HeadSlicedAttention",
    "LSHSelfAttention",
    "LocalSelfAttention",
    "bucketed_attention",
    "full_attention",
    "local_attention",
    "lsh_attention",
]
