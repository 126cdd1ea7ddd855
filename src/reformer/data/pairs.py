"""The seq2seq task: the user's pairs of texts for the encoder-decoder
(reformer.encoder_decoder), a JSONL file of ``{"source": ..., "target": ...}`` lines read as
bytes.

A batch is ``(input_ids, attention_mask, decoder_input_ids, labels)``: sources padded and
masked as the classifiers' examples (reformer.data.labelled.pad_examples), targets framed by a
start and an end token (ids 256 and 257, after the bytes) and padded, their labels -100 on the
padding. Training pairs are drawn with replacement by a seeded generator (exact resume); the
held-out pairs are ``val_data`` or a fixed ``val_fraction`` (reformer.data.labelled).

Shapes: B batch, S source length, T target length (each at most ``seq_len``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from reformer.data.labelled import byte_ids, jsonl_records, pad_examples, split_examples
from reformer.data.task import Task, TaskSpec

BOS, EOS = 256, 257  # the start and end tokens: after the 256 bytes


def pad_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], seq_len: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source ids (B, S), source mask (B, S), decoder inputs (B, T), labels (B, T)).

    The decoder reads ``[BOS, target..., EOS]`` (cut to ``seq_len``) and its labels are the
    same ids, -100 on the padding; both sides are padded like :func:`pad_examples`.
    """
    sources, mask, _ = pad_examples([(src, 0) for src, _ in pairs], seq_len)
    framed = [(torch.cat([torch.tensor([BOS]), tgt, torch.tensor([EOS])]), 0)
              for _, tgt in pairs]
    targets, real, _ = pad_examples(framed, seq_len)
    return sources, mask, targets, targets.masked_fill(~real, -100)


class PairTask(Task):
    """Sequence to sequence on the user's pairs: JSONL lines ``{"source": ..., "target":
    ...}``, both texts read as bytes (at most ``seq_len`` each; the target with its start and
    end tokens)."""

    name, vocab_size = "seq2seq", EOS + 1

    def __init__(self, spec: TaskSpec) -> None:
        if not spec.data:
            raise ValueError("the seq2seq task has no default data; pass --data with a JSONL "
                             'file of {"source": ..., "target": ...} lines')
        self.spec = spec
        self.train, self.val = split_examples(spec, read_pairs)
        self.generator = torch.Generator().manual_seed(spec.seed)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        spec = self.spec
        picks = torch.randint(0, len(self.train), (spec.global_batch,), generator=self.generator)
        return pad_pairs([self.train[i] for i in picks[spec.rank_rows].tolist()], spec.seq_len)

    def eval_set(self) -> tuple[torch.Tensor, ...]:
        return pad_pairs(self.val[:self.spec.eval_windows], self.spec.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def fingerprint(self) -> dict[str, int]:
        return {"train_pairs": len(self.train), "val_pairs": len(self.val)}

    def describe(self) -> str:
        return (f"{len(self.train):,} training and {len(self.val):,} held-out pairs "
                f"({min(self.spec.eval_windows, len(self.val))} per evaluation)")


def read_pairs(paths: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(source bytes, target bytes) of every line of JSONL files."""
    pairs = []
    for given in paths:
        path = Path(given)
        if path.suffix != ".jsonl" or not path.is_file():
            raise ValueError(f"{given!r} is not a .jsonl file; the seq2seq task reads JSONL "
                             'lines {"source": ..., "target": ...}')
        for n, (source, target) in jsonl_records(path, "source", "target"):
            if not (isinstance(source, str) and isinstance(target, str) and source):
                raise ValueError(f"{path}:{n}: \"source\" must be a non-empty string and "
                                 "\"target\" a string")
            pairs.append((byte_ids(source.encode("utf-8")),
                          torch.tensor(list(target.encode("utf-8")), dtype=torch.long)))
    if not pairs:
        raise ValueError(f"{list(paths)} hold no pairs")
    return pairs
