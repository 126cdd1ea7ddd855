"""What a training task gives the trainer: batches, a fixed evaluation set, and their metric.

The trainer (reformer.training.trainer) is one loop for every kind of data; a :class:`Task`
hides what the tokens are. Three tasks exist:

- ``text``: random windows of byte-level text (reformer.data.text);
- ``images``: whole pictures as raster-order byte sequences (reformer.data.images);
- ``synthetic``: the paper's duplication task 0w0w (reformer.data.synthetic);
- ``classify``, ``listops``, ``mlm`` and ``listops-mlm`` train the heads of reformer.heads
  (labelled text, Long Range Arena's ListOps, masked language modelling of text or of
  ListOps's inputs; reformer.data.labelled and reformer.data.masking). Their
  batches are ``(input_ids, attention_mask, labels)`` (the mask None where every token is
  real), labels (B,) class ids for the classifiers.
- ``seq2seq`` trains the encoder-decoder on pairs of texts; its batches are ``(input_ids,
  attention_mask, decoder_input_ids, labels)``.

Shapes: B batch, L sequence length, N evaluation sequences.

Decisions:
- A batch is ``(input_ids, labels)``, both (B, L); labels are aligned with the inputs (the
  model shifts them) and -100 marks positions that carry no loss (the first half of a 0w0w
  sequence). The loss, and so the metric, is the mean over labelled positions in bits per
  token; each task names its token (``unit``: char, dim, symbol).
- The task's sampler owns a seeded generator whose state goes into checkpoints, so a resumed
  run sees the same batches. ``fingerprint`` describes the data; resuming with data whose
  fingerprint differs is refused.
- A task is built from a :class:`TaskSpec`, the few fields of a run that describe its data;
  ``TrainConfig.task_spec`` makes one, so this package never imports reformer.training.

Data-parallel sampling (``world`` processes, this one ``rank``): every rank holds the same
seeded generator and each ``next_batch`` draws one global micro-batch of ``world * B``
samples, with exactly the generator calls of a one-process task with batch ``world * B``,
then keeps only rows ``[rank * B, (rank + 1) * B)``; only those rows are read from disk or
decoded. So world = 1 is the one-process run bit for bit, the ranks' batches concatenated
are the one-process batch of size ``world * B``, and the generator state (what a checkpoint
saves) is the same on every rank. ``eval_set`` is the whole held-out set on every rank (the
trainer splits it); ``fingerprint`` does not depend on the rank.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from reformer.config import is_int

TASKS = ("text", "images", "synthetic", "classify", "listops", "mlm", "listops-mlm",
         "seq2seq")
# what one token (or, for the classifiers, one example) is
UNITS = {"text": "char", "images": "dim", "synthetic": "symbol", "classify": "example",
         "listops": "example", "mlm": "masked char", "listops-mlm": "masked symbol",
         "seq2seq": "target byte"}
HEADS = ("lm", "classify", "mlm", "seq2seq")  # the models (reformer.heads.build_model)
# the heads' tasks; the other tasks train the language model
TASK_HEADS = {"classify": "classify", "listops": "classify", "mlm": "mlm",
              "listops-mlm": "mlm", "seq2seq": "seq2seq"}


def task_head(task: str) -> str:
    """The head (one of HEADS) that the task ``task`` trains."""
    return TASK_HEADS.get(task, "lm")


@dataclass(frozen=True)
class TaskSpec:
    """What a task needs to know: its data, window and batch sizes, seed, and this rank.

    The data fields are validated by ``TrainConfig`` (which makes a spec with
    ``TrainConfig.task_spec``); only ``rank`` and ``world`` are checked here.
    """

    task: str = "text"  # one of TASKS
    data: tuple[str, ...] = ()  # files, folders or globs; empty = the task's default data
    val_data: tuple[str, ...] = ()  # held-out files; empty = the tail of ``data``
    val_fraction: float = 0.05
    seq_len: int = 16384
    image_size: int = 32
    image_channels: int = 3
    batch_size: int = 1  # per rank: a global micro-batch is world * batch_size
    eval_windows: int = 4
    seed: int = 0
    mask_prob: float = 0.15  # mlm: the share of tokens masked and predicted
    rank: int = 0  # this process's index among the data-parallel processes
    world: int = 1  # the number of data-parallel processes

    def __post_init__(self) -> None:
        if not is_int(self.world) or self.world < 1:
            raise ValueError(f"world={self.world!r} must be an integer >= 1 (the number of "
                             "data-parallel processes); pass world=1 for one process")
        if not is_int(self.rank) or not 0 <= self.rank < self.world:
            raise ValueError(f"rank={self.rank!r} must be an integer with 0 <= rank < "
                             f"world={self.world}; pass this process's index among the "
                             "world (torch.distributed.get_rank())")

    @property
    def global_batch(self) -> int:
        """Samples drawn per micro-batch, over all ranks: world * batch_size."""
        return self.world * self.batch_size

    @property
    def rank_rows(self) -> slice:
        """This rank's rows of a global micro-batch: [rank * B, (rank + 1) * B)."""
        return slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)


class Task(ABC):
    """The data side of a training run."""

    name: str  # one of TASKS
    vocab_size: int  # the smallest model vocabulary that holds every token
    n_classes: int = 0  # classifiers: C

    @property
    def head(self) -> str:
        """The model this task trains: one of HEADS."""
        return task_head(self.name)

    @property
    def unit(self) -> str:
        """What one token is, for "bits per <unit>" (:data:`UNITS`)."""
        return UNITS[self.name]

    @abstractmethod
    def next_batch(self) -> tuple[torch.Tensor | None, ...]:
        """(input_ids, labels), both (B, L) int64, labels -100 = no loss; for the heads'
        tasks (input_ids, attention_mask, labels)."""

    @abstractmethod
    def eval_set(self) -> tuple[torch.Tensor | None, ...]:
        """The fixed held-out set, shaped as ``next_batch``'s with N rows."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The sampler's state (its generator), for exact resume."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def fingerprint(self) -> dict[str, int]:
        """Sizes that identify the data (a different value on resume is an error)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the CLI: what the training and held-out data are."""

    # Task-specific held-out metrics from one sequence's ((1, L, V) logits, (1, L) labels),
    # e.g. the synthetic task's accuracy; None = bits per token only (no full logits needed).
    extra_metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None


# where each task's class lives (imported when the task is built)
TASK_CLASSES = {"text": ("text", "TextTask"), "images": ("images", "ImageTask"),
                "synthetic": ("synthetic", "DuplicationTask"),
                "classify": ("labelled", "ClassifyTask"), "listops": ("labelled", "ListOpsTask"),
                "mlm": ("masking", "MaskedTextTask"),
                "listops-mlm": ("masking", "MaskedListOpsTask"),
                "seq2seq": ("pairs", "PairTask")}


def task_class(task: str) -> type[Task]:
    """The class of the task named ``task`` (its data not loaded)."""
    if task not in TASK_CLASSES:
        raise ValueError(f"task={task!r} is unknown; use one of {TASKS}")
    module, name = TASK_CLASSES[task]
    return getattr(importlib.import_module(f"reformer.data.{module}"), name)


def test_split_tasks() -> list[str]:
    """The tasks with a test split (a ``test_set`` method), in the order of TASKS."""
    return [task for task in TASKS if hasattr(task_class(task), "test_set")]


def build_task(spec: TaskSpec) -> Task:
    """The task that ``spec.task`` names, with its data loaded and its sampler seeded."""
    return task_class(spec.task)(spec)
