"""reformer: the Reformer (Kitaev, Kaiser, Levskaya, ICLR 2020) in PyTorch.

LSH attention, reversible residual layers and chunking, for Transformers on very long
sequences. Start with :class:`ReformerConfig` and :class:`ReformerLM`.
"""

from reformer.attention import (
    FullSelfAttention,
    LocalSelfAttention,
    LSHSelfAttention,
    full_attention,
    local_attention,
    lsh_attention,
)
from reformer.config import ReformerConfig
from reformer.hashing import hash_vectors, sample_rotations
from reformer.model import ReformerLM, ReformerOutput

__version__ = "0.1.0"

__all__ = [
    "FullSelfAttention",
    "LSHSelfAttention",
    "LocalSelfAttention",
    "ReformerConfig",
    "ReformerLM",
    "ReformerOutput",
    "full_attention",
    "hash_vectors",
    "local_attention",
    "lsh_attention",
    "sample_rotations",
]
