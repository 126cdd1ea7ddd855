"""What a training task gives the trainer: batches, a fixed evaluation set, and their metric.

The trainer (reformer.training.trainer) is one loop for every kind of data; a :class:`Task`
hides what the tokens are. Three tasks exist:

- ``text``: random windows of byte-level text (reformer.data.text);
- ``images``: whole pictures as raster-order byte sequences (reformer.data.images);
- ``synthetic``: the paper's duplication task 0w0w (reformer.data.synthetic).

Shapes: B batch, L sequence length, N evaluation sequences.

Decisions:
- A batch is ``(input_ids, labels)``, both (B, L); labels are aligned with the inputs (the
  model shifts them) and -100 marks positions that carry no loss (the first half of a 0w0w
  sequence). The loss, and so the metric, is the mean over labelled positions in bits per
  token; each task names its token (``unit``: char, dim, symbol).
- The task's sampler owns a seeded generator whose state goes into checkpoints, so a resumed
  run sees the same batches. ``fingerprint`` describes the data; resuming with data whose
  fingerprint differs is refused.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from reformer.training.config import TrainConfig

TASKS = ("text", "images", "synthetic")
UNITS = {"text": "char", "images": "dim", "synthetic": "symbol"}  # what one token is


class Task(ABC):
    """The data side of a training run."""

    name: str  # one of TASKS
    vocab_size: int  # the smallest model vocabulary that holds every token

    @property
    def unit(self) -> str:
        """What one token is, for "bits per <unit>" (:data:`UNITS`)."""
        return UNITS[self.name]

    @abstractmethod
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), both (B, L) int64; labels -100 = no loss."""

    @abstractmethod
    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed held-out (input_ids, labels), both (N, L)."""

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


def build_task(cfg: TrainConfig) -> Task:
    """The task that ``cfg.task`` names, with its data loaded and its sampler seeded."""
    if cfg.task == "text":
        from reformer.data.text import TextTask
        return TextTask(cfg)
    if cfg.task == "images":
        from reformer.data.images import ImageTask
        return ImageTask(cfg)
    if cfg.task == "synthetic":
        from reformer.data.synthetic import DuplicationTask
        return DuplicationTask(cfg)
    raise ValueError(f"task={cfg.task!r} is unknown; use one of {TASKS}")
