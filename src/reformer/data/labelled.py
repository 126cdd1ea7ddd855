"""Tasks with one label per example: classification of the user's texts, and ListOps.

These feed the heads of reformer.heads rather than the language model; a batch is
``(input_ids, attention_mask, labels)``:

- ``classify``: the user's labelled text: a folder with one sub-folder per class (each file one
  example; the class is the sub-folder's name) or a JSONL file of ``{"text": ..., "label":
  ...}`` lines. Bytes are the tokens; an example longer than ``seq_len`` is cut to its first
  ``seq_len`` bytes. Labels (B,) are class ids in the sorted order of the class names.
- ``listops``: the Long Range Arena ListOps task, generated (reformer.data.listops).

The heads' two other tasks: mlm (text windows with BERT masking) in reformer.data.masking and
seq2seq (pairs of texts for the encoder-decoder) in reformer.data.pairs.

Shapes: B batch, L padded length (at most ``seq_len``), N held-out examples.

Decisions:
- A batch is padded with id 0 to the longest example in it, rounded up to a multiple of
  ``PAD_MULTIPLE`` (at most ``seq_len``); the attention mask marks the real tokens. Short
  batches cost less than padding every example to ``seq_len``.
- Training examples are drawn with replacement by a seeded generator whose state goes into
  checkpoints (exact resume), with the data-parallel rule of reformer.data.task: every rank
  draws the global micro-batch's indices and keeps its rows.
- Examples are drawn ``BUCKET_POOL`` micro-batches at a time, sorted by length, cut into
  micro-batches, and those are served in a random order: each batch holds examples of
  similar lengths, so little of it is padding (ListOps, 500 to 2,000 tokens in batches of 16,
  the first 2,048 training examples: 1,014 real tokens per example; batches padded to their
  longest example are 1,814 wide on average, grouped by length 1,138). The pending
  micro-batches' indices go into checkpoints.
- Held-out examples: the ``val_data`` given, else a fixed ``val_fraction`` of the examples (a
  permutation seeded by 0, so the split does not depend on the run's seed); ListOps has its
  own validation and test splits. The evaluation set is the first ``eval_windows`` of them.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reformer.data import listops
from reformer.data.task import Task, TaskSpec
from reformer.data.text import resolve_paths

PAD_MULTIPLE = 64
BUCKET_POOL = 8  # micro-batches drawn at once and regrouped by length
Example = tuple[torch.Tensor, int]  # (L,) ids, class id


def pad_examples(examples: Sequence[Example], seq_len: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, L), attention mask (B, L), labels (B,)) with L the longest example rounded up
    to PAD_MULTIPLE, at most ``seq_len``; longer examples are cut to ``seq_len``."""
    longest = max(min(len(ids), seq_len) for ids, _ in examples)
    length = min(seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    batch = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, (ids, _) in enumerate(examples):
        n = min(len(ids), length)
        batch[row, :n], mask[row, :n] = ids[:n], True
    labels = torch.tensor([label for _, label in examples], dtype=torch.long)
    return batch, mask, labels


class ExampleTask(Task):
    """Examples drawn by index with replacement; subclasses say how to read example i."""

    n_train: int  # training examples (indices [0, n_train))
    n_held_out: int  # held-out examples (indices [0, n_held_out))

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.pending: list[list[int]] = []  # global micro-batches' indices, next first
        self.drawn: dict[int, Example] = {}  # the pending examples, made once

    @abstractmethod
    def train_example(self, index: int) -> Example: ...

    @abstractmethod
    def held_out(self, index: int) -> Example: ...

    def _draw_pool(self) -> None:
        """BUCKET_POOL global micro-batches of examples, grouped by length, in random order."""
        size = self.spec.global_batch
        picks = torch.randint(0, self.n_train, (BUCKET_POOL * size,),
                              generator=self.generator).tolist()
        self.drawn = {i: self.train_example(i) for i in picks}
        by_length = sorted(picks, key=lambda i: len(self.drawn[i][0]))  # stable: ties keep order
        batches = [by_length[k * size:(k + 1) * size] for k in range(BUCKET_POOL)]
        order = torch.randperm(BUCKET_POOL, generator=self.generator).tolist()
        self.pending = [batches[k] for k in order]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.pending:
            self._draw_pool()
        picks = self.pending.pop(0)[self.spec.rank_rows]
        return pad_examples([self.drawn[i] if i in self.drawn else self.train_example(i)
                             for i in picks], self.spec.seq_len)

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = min(self.spec.eval_windows, self.n_held_out)
        return pad_examples([self.held_out(i) for i in range(n)], self.spec.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(),
                "pending": [list(batch) for batch in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.pending = [list(batch) for batch in state.get("pending", [])]
        self.drawn = {}  # remade on demand


class ListOpsTask(ExampleTask):
    """ListOps: 10 classes; training, validation and test examples generated from the seed.

    Every run generates the same examples (seed 0 of reformer.data.listops), whatever its own
    ``seed``, so that results of different runs are comparable; the run's seed orders them.
    """

    name, vocab_size, n_classes = "listops", len(listops.VOCAB), listops.N_CLASSES
    n_train = 96_000  # as in the LRA release
    n_held_out = 2_000
    DATA_SEED = 0

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.lo_spec = listops.ListOpsSpec(max_length=min(spec.seq_len, 2000),
                                           min_length=min(500, spec.seq_len))

    def _example(self, split: str, index: int) -> Example:
        symbols, value = listops.example(self.DATA_SEED, split, index, self.lo_spec)
        return listops.encode(symbols), value

    def train_example(self, index: int) -> Example:
        return self._example("train", index)

    def held_out(self, index: int) -> Example:
        return self._example("validation", index)

    def test_set(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first ``n`` test examples (never seen in training or validation)."""
        return pad_examples([self._example("test", i) for i in range(n)], self.spec.seq_len)

    def fingerprint(self) -> dict[str, int]:
        return {"max_length": self.lo_spec.max_length, "min_length": self.lo_spec.min_length}

    def describe(self) -> str:
        return (f"ListOps (generated): {self.lo_spec.min_length}-{self.lo_spec.max_length} "
                f"tokens, {self.n_classes} classes; {self.n_train:,} training examples, "
                f"{min(self.spec.eval_windows, self.n_held_out)} validation examples per "
                "evaluation")


class ClassifyTask(ExampleTask):
    """The user's labelled text (see the module docstring for the formats)."""

    name, vocab_size = "classify", 256

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        if not spec.data:
            raise ValueError("the classify task has no default data; pass --data with a folder "
                             "of class folders (one text file per example) or a JSONL file of "
                             '{"text": ..., "label": ...} lines')
        train, held_out = split_examples(spec, read_labelled)
        self.classes = sorted({label for _, label in train})
        if len(self.classes) < 2:
            raise ValueError(f"the training data has {len(self.classes)} class "
                             f"({self.classes}); a classifier needs at least 2")
        unknown = sorted({label for _, label in held_out} - set(self.classes))
        if unknown:
            raise ValueError(f"held-out labels {unknown[:5]} never occur in the training data "
                             f"(classes {self.classes[:10]}); fix the labels or the split")
        index = {c: i for i, c in enumerate(self.classes)}
        self.n_classes = len(self.classes)
        self.train = [(ids, index[c]) for ids, c in train]
        self.val = [(ids, index[c]) for ids, c in held_out]
        self.n_train, self.n_held_out = len(self.train), len(self.val)

    def train_example(self, index: int) -> Example:
        return self.train[index]

    def held_out(self, index: int) -> Example:
        return self.val[index]

    def fingerprint(self) -> dict[str, int]:
        return {"train_examples": self.n_train, "val_examples": self.n_held_out,
                "classes": self.n_classes}

    def describe(self) -> str:
        return (f"{self.n_train:,} training and {self.n_held_out:,} held-out examples, "
                f"{self.n_classes} classes ({', '.join(self.classes[:6])}"
                f"{', ...' if self.n_classes > 6 else ''})")


def split_examples(spec: TaskSpec, read: Callable[[Sequence[str]], list]
                   ) -> tuple[list, list]:
    """(training, held-out) examples: ``read(spec.val_data)`` if given, else the last
    ``val_fraction`` of ``read(spec.data)`` in an order permuted with seed 0 (the same split
    whatever the run's seed)."""
    train = read(spec.data)
    if spec.val_data:
        return train, read(spec.val_data)
    order = np.random.default_rng(0).permutation(len(train))
    n_val = max(1, int(len(train) * spec.val_fraction))
    if n_val >= len(train):
        raise ValueError(f"{len(train)} examples are too few to hold out val_fraction="
                         f"{spec.val_fraction} of them; add examples or pass --val-data")
    return [train[i] for i in order[:-n_val]], [train[i] for i in order[-n_val:]]


def read_labelled(paths: Sequence[str]) -> list[tuple[torch.Tensor, str]]:
    """(byte ids, class name) for every example of JSONL files and class folders."""
    examples: list[tuple[torch.Tensor, str]] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            classes = sorted(p for p in path.iterdir() if p.is_dir())
            if not classes:
                raise ValueError(f"{path} holds no class folders; put each class's files in "
                                 "a sub-folder named after the class, or pass a JSONL file")
            for folder in classes:
                examples += [(byte_ids(f.read_bytes()), folder.name)
                             for f in resolve_paths([str(folder)])]
        elif path.suffix == ".jsonl" and path.is_file():
            examples += _read_jsonl(path)
        else:
            raise ValueError(f"{given!r} is neither a folder of class folders nor a .jsonl "
                             "file; pass one of those")
    if not examples:
        raise ValueError(f"{list(paths)} hold no examples")
    return examples


def _read_jsonl(path: Path) -> list[tuple[torch.Tensor, str]]:
    examples = []
    for n, (text, label) in jsonl_records(path, "text", "label"):
        if not isinstance(text, str) or not isinstance(label, (str, int)) or not text:
            raise ValueError(f"{path}:{n}: \"text\" must be a non-empty string and \"label\" a "
                             f"string or an integer; got {type(text).__name__} and "
                             f"{type(label).__name__}")
        examples.append((byte_ids(text.encode("utf-8")), str(label)))
    return examples


def jsonl_records(path: Path, *keys: str) -> list[tuple[int, list]]:
    """(line number, [record[key] for key in keys]) for every non-empty line of a JSONL file."""
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append((n, [record[k] for k in keys]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            names = " and ".join(f'"{k}"' for k in keys)
            raise ValueError(f"{path}:{n} is not a JSON object with {names} ({err}); write "
                             "one such object per line") from err
    return records


def byte_ids(data: bytes) -> torch.Tensor:
    if not data:
        data = b" "  # an empty file still is an example of its class
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
