"""reformer: the Reformer (Kitaev, Kaiser, Levskaya, ICLR 2020) in PyTorch.

LSH attention, reversible residual layers and chunking, for Transformers on very long
sequences. Start with :class:`ReformerConfig` and :class:`ReformerLM`.

The public names are imported on first use (PEP 562): ``import reformer.cli`` must not
import PyTorch (about 1.5 s), so that the command line catches Ctrl-C during start-up and
exits with one line instead of a traceback from inside torch's import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reformer.attention import (
        FullSelfAttention,
        LocalSelfAttention,
        LSHSelfAttention,
        full_attention,
        local_attention,
        lsh_attention,
    )
    from reformer.config import ReformerConfig
    from reformer.encoder_decoder import ReformerEncoderDecoder
    from reformer.hashing import hash_vectors, sample_rotations
    from reformer.heads import ReformerForMaskedLM, ReformerForSequenceClassification
    from reformer.model import ReformerLM, ReformerOutput, ReformerTrunk

__version__ = "0.1.0"

_HOMES = {
    "reformer.attention": ("FullSelfAttention", "LSHSelfAttention", "LocalSelfAttention",
                           "full_attention", "local_attention", "lsh_attention"),
    "reformer.config": ("ReformerConfig",),
    "reformer.encoder_decoder": ("ReformerEncoderDecoder",),
    "reformer.hashing": ("hash_vectors", "sample_rotations"),
    "reformer.heads": ("ReformerForMaskedLM", "ReformerForSequenceClassification"),
    "reformer.model": ("ReformerLM", "ReformerOutput", "ReformerTrunk"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "FullSelfAttention",
    "LSHSelfAttention",
    "LocalSelfAttention",
    "ReformerConfig",
    "ReformerEncoderDecoder",
    "ReformerForMaskedLM",
    "ReformerForSequenceClassification",
    "ReformerLM",
    "ReformerOutput",
    "ReformerTrunk",
    "full_attention",
    "hash_vectors",
    "local_attention",
    "lsh_attention",
    "sample_rotations",
]


def __getattr__(name: str):
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'reformer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
