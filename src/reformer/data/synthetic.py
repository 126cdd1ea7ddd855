"""The paper's synthetic duplication task (Kitaev et al. 2020, section 2.1 and Table 2).

A sequence is ``0 w 0 w``: a word w of |w| symbols drawn uniformly from 1..127, preceded by the
separator 0 and repeated once (vocabulary 128, length L = 2 (|w| + 1)). The first copy is
random and cannot be predicted; each symbol of the second copy can, but only by looking back
|w| + 1 positions, which is what LSH attention must find in its buckets. The paper uses
|w| = 511 (L = 1024) and a one-layer model.

Shapes: B batch, N evaluation sequences, L sequence length, V vocabulary.

Decisions:
- Loss and accuracy count the second copy of w only: labels are -100 up to and including the
  second separator, whose position is fixed and so trivially predictable. Accuracy is the
  fraction of those |w| symbols whose argmax prediction is exact.
- Training sequences come from the run's seeded generator (an endless stream, resumable from
  its state); the evaluation set is ``eval_windows`` sequences from a generator seeded with
  ``seed + EVAL_SEED_OFFSET``, so it is fixed and disjoint in origin from the training stream.
"""

from __future__ import annotations

from typing import Any

import torch

from reformer.data.task import Task, TaskSpec

VOCAB_SIZE = 128
SEPARATOR = 0
EVAL_SEED_OFFSET = 1_000_003


def duplication_batch(batch_size: int, word_length: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 2 (|w| + 1)) int64 sequences ``0 w 0 w`` with w uniform over 1..127."""
    if word_length < 1:
        raise ValueError(f"word_length={word_length} must be >= 1")
    w = torch.randint(1, VOCAB_SIZE, (batch_size, word_length), generator=generator)  # (B, |w|)
    sep = torch.full((batch_size, 1), SEPARATOR, dtype=torch.long)
    return torch.cat([sep, w, sep, w], dim=1)  # (B, L)


def second_copy_labels(sequences: torch.Tensor) -> torch.Tensor:
    """(B, L) labels: the sequences with everything before the second copy of w set to -100."""
    labels = sequences.clone()
    labels[:, : sequences.shape[1] // 2 + 1] = -100
    return labels


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of labelled next-token targets predicted exactly by the argmax.

    Args:
        logits: (B, L, V), position t predicting labels[t + 1]; labels: (B, L), -100 = ignore.
    """
    predicted = logits[:, :-1].argmax(dim=-1)  # (B, L-1)
    targets = labels[:, 1:]
    counted = targets != -100
    if not counted.any():
        raise ValueError("no labelled positions to score; the labels are all -100")
    return float((predicted == targets)[counted].float().mean())


class DuplicationTask(Task):
    """0w0w sequences of ``seq_len = 2 (|w| + 1)`` tokens; loss on the second copy of w."""

    name, vocab_size = "synthetic", VOCAB_SIZE

    def __init__(self, spec: TaskSpec) -> None:
        self.word_length = spec.seq_len // 2 - 1
        self.global_batch, self.rank_rows = spec.global_batch, spec.rank_rows
        self.generator = torch.Generator().manual_seed(spec.seed)
        eval_generator = torch.Generator().manual_seed(spec.seed + EVAL_SEED_OFFSET)
        self.eval_inputs = duplication_batch(spec.eval_windows, self.word_length,
                                             eval_generator)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (B, L) rows of a global micro-batch (all of it is generated: cheap)."""
        batch = duplication_batch(self.global_batch, self.word_length, self.generator)
        batch = batch[self.rank_rows]  # (world * B, L) -> (B, L)
        return batch, second_copy_labels(batch)

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.eval_inputs, second_copy_labels(self.eval_inputs)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def fingerprint(self) -> dict[str, int]:
        return {"word_length": self.word_length, "eval_sequences": len(self.eval_inputs)}

    def describe(self) -> str:
        return (f"synthetic 0w0w, |w| = {self.word_length}, symbols 1..{VOCAB_SIZE - 1}; "
                f"{len(self.eval_inputs)} held-out sequences")

    @staticmethod
    def extra_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {"accuracy": masked_accuracy(logits, labels)}
