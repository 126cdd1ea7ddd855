"""BERT-style token masking for masked language modelling (Devlin et al. 2019, section 3.1).

Of the real tokens (``attention_mask``), each is chosen with probability ``p`` (0.15); a chosen
token becomes ``mask_token_id`` with probability 0.8, a uniformly random token of the
vocabulary other than the mask token with 0.1, and stays itself with 0.1. The labels hold the
original token at the chosen positions and -100 (not predicted) everywhere else, the convention of
:class:`reformer.heads.ReformerForMaskedLM`.

:class:`MaskedTextTask` is the training CLI's ``--task mlm``: random windows of text
(reformer.data.text) masked so, with the mask token id 256, one past the 256 byte values.
:class:`MaskedListOpsTask` is ``--task listops-mlm``: ListOps's training inputs (their values
unused) masked so, with the mask token id 16, one past ListOps's symbols. It pre-trains a trunk
that ``--init-from`` then hands to a ``--task listops`` classifier (self-pre-training: the
trunk first learns the inputs' structure from the inputs alone); the ``listops`` preset's
vocabulary of 17 holds the mask token for that reason.

Decision: a data-parallel rank draws the masks of the whole global micro-batch at the full
``seq_len``, whatever its own rows' padded length, so every rank's generator makes the same
calls (TaskSpec's contract) though the ranks pad their rows to different lengths.

Shapes: B batch, L length.
"""

from __future__ import annotations

from typing import Any

import torch

from reformer.config import fail, is_int, is_real
from reformer.data import listops
from reformer.data.labelled import ListOpsTask
from reformer.data.task import Task, TaskSpec
from reformer.data.text import TextTask

KEEP, RANDOM = 0.1, 0.1  # of the chosen tokens; the rest (0.8) become the mask token
MASK_TOKEN = 256  # the mlm task's mask id: one past the 256 byte values
LISTOPS_MASK_TOKEN = len(listops.VOCAB)  # listops-mlm's mask id: one past ListOps's symbols


def bert_mask(input_ids: torch.Tensor, mask_token_id: int, vocab_size: int, *,
              p: float = 0.15, attention_mask: torch.Tensor | None = None,
              generator: torch.Generator | None = None, first_random_id: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids -> (masked inputs (B, L), labels (B, L) with -100 where not chosen).

    Random replacements are drawn from ids ``first_random_id`` to ``vocab_size - 1``, never
    the mask token; pass 1 where id 0 pads, so that no real token is replaced by padding.
    """
    if not is_real(p) or not 0 < p <= 1:
        fail("p", p, "must lie in (0, 1] (the share of tokens to predict)", "pass e.g. 0.15")
    if not is_int(mask_token_id) or not 0 <= mask_token_id < vocab_size:
        fail("mask_token_id", mask_token_id, f"is not an id of the vocabulary [0, {vocab_size})",
             "reserve one id of the vocabulary for the mask token (e.g. vocab_size - 1)")
    if not is_int(first_random_id) or not 0 <= first_random_id < vocab_size - 1:
        fail("first_random_id", first_random_id,
             f"must lie in [0, {vocab_size - 1}) (the first id random replacements are drawn "
             "from)", "pass 0, or 1 where id 0 pads")
    draw = torch.rand(input_ids.shape + (2,), generator=generator).to(input_ids.device)
    chosen = draw[..., 0] < p
    if attention_mask is not None:
        chosen &= attention_mask.bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = draw[..., 1]  # uniform: [0, 0.8) mask, [0.8, 0.9) random, [0.9, 1) keep
    skips_mask = mask_token_id >= first_random_id
    random_ids = torch.randint(first_random_id, vocab_size - skips_mask, input_ids.shape,
                               generator=generator).to(input_ids)
    if skips_mask:
        random_ids += random_ids >= mask_token_id  # any token but the mask token
    inputs = torch.where(chosen & (action < 1 - KEEP - RANDOM), mask_token_id, input_ids)
    inputs = torch.where(chosen & (action >= 1 - KEEP - RANDOM) & (action < 1 - KEEP),
                         random_ids, inputs)
    return inputs, labels


class MaskedTextTask(Task):
    """Masked language modelling on random windows of text (BERT masking of 15%)."""

    name, vocab_size = "mlm", MASK_TOKEN + 1

    def __init__(self, spec: TaskSpec) -> None:
        self.text = TextTask(spec)
        self.spec = spec
        self.generator = torch.Generator().manual_seed(spec.seed + 1)
        held_out = torch.Generator().manual_seed(0)  # the same masks whatever the run's seed
        self.val_inputs, self.val_labels = self._mask(self.text.val_windows, held_out)

    def _mask(self, ids: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return bert_mask(ids, MASK_TOKEN, self.vocab_size, p=self.spec.mask_prob,
                         generator=generator)

    def next_batch(self) -> tuple[torch.Tensor, None, torch.Tensor]:
        # the whole global micro-batch is masked (same generator calls on every rank); the
        # text sampler already returned this rank's rows only, so draw for world * B rows
        ids = self.text.sampler.next_batch()
        spec = self.spec
        full = ids.new_zeros((spec.global_batch, ids.shape[1]))
        full[spec.rank_rows] = ids
        inputs, labels = self._mask(full, self.generator)
        return inputs[spec.rank_rows], None, labels[spec.rank_rows]

    def eval_set(self) -> tuple[torch.Tensor, None, torch.Tensor]:
        return self.val_inputs, None, self.val_labels

    def state_dict(self) -> dict[str, Any]:
        return {"text": self.text.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.text.load_state_dict(state["text"])
        self.generator.set_state(state["generator"])

    def fingerprint(self) -> dict[str, int]:
        return self.text.fingerprint()

    def describe(self) -> str:
        return f"{self.text.describe()}; {100 * self.spec.mask_prob:g}% of tokens masked"


class MaskedListOpsTask(ListOpsTask):
    """Masked language modelling on ListOps's training inputs (BERT masking of 15%).

    The examples, their order and the held-out ones are ``--task listops``'s (the validation
    split, masked the same way whatever the run's seed); the values are not used.
    """

    name, vocab_size, n_classes = "listops-mlm", LISTOPS_MASK_TOKEN + 1, 0

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.mask_generator = torch.Generator().manual_seed(spec.seed + 1)
        self._held_out: tuple[torch.Tensor, ...] | None = None

    def _mask(self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return bert_mask(ids, LISTOPS_MASK_TOKEN, self.vocab_size, p=self.spec.mask_prob,
                         attention_mask=mask, generator=generator, first_random_id=1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask, _ = super().next_batch()  # this rank's rows, padded to their longest
        spec, length = self.spec, ids.shape[1]
        full = ids.new_zeros((spec.global_batch, spec.seq_len))  # see the module's Decision
        full_mask = torch.zeros_like(full, dtype=torch.bool)
        full[spec.rank_rows, :length], full_mask[spec.rank_rows, :length] = ids, mask
        inputs, labels = self._mask(full, full_mask, self.mask_generator)
        return inputs[spec.rank_rows, :length], mask, labels[spec.rank_rows, :length]

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._held_out is None:
            ids, mask, _ = super().eval_set()
            inputs, labels = self._mask(ids, mask, torch.Generator().manual_seed(0))
            self._held_out = (inputs, mask, labels)
        return self._held_out

    def test_set(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first ``n`` test inputs, masked the same way whatever the run's seed."""
        ids, mask, _ = super().test_set(n)
        inputs, labels = self._mask(ids, mask, torch.Generator().manual_seed(0))
        return inputs, mask, labels

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "masks": self.mask_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mask_generator.set_state(state["masks"])

    def describe(self) -> str:
        return f"{super().describe()}; {100 * self.spec.mask_prob:g}% of tokens masked"
