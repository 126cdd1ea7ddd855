"""The duplication task 0w0w: generator, labels, masked accuracy, and its sampler's state."""

from __future__ import annotations

import pytest
import torch

from reformer.data import synthetic
from reformer.training.config import TrainConfig


def test_sequences_are_separator_word_separator_word():
    gen = torch.Generator().manual_seed(0)
    batch = synthetic.duplication_batch(64, 7, gen)
    assert batch.shape == (64, 16) and batch.dtype == torch.long
    assert (batch[:, 0] == 0).all() and (batch[:, 8] == 0).all()
    assert torch.equal(batch[:, 1:8], batch[:, 9:])
    words = batch[:, 1:8]
    assert words.min() >= 1 and words.max() <= 127
    assert len(words.unique()) > 100  # uniform over 1..127, not a handful of symbols


def test_generator_is_deterministic_under_a_seed():
    a = synthetic.duplication_batch(4, 5, torch.Generator().manual_seed(3))
    b = synthetic.duplication_batch(4, 5, torch.Generator().manual_seed(3))
    c = synthetic.duplication_batch(4, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_labels_cover_exactly_the_second_copy():
    seq = synthetic.duplication_batch(2, 5, torch.Generator().manual_seed(0))  # L = 12
    labels = synthetic.second_copy_labels(seq)
    assert (labels[:, :7] == -100).all()
    assert torch.equal(labels[:, 7:], seq[:, 7:])


def test_masked_accuracy_counts_only_labelled_targets():
    labels = torch.tensor([[-100, -100, 5, 6, 7]])
    logits = torch.zeros(1, 5, 8)
    # position t predicts labels[t + 1]: t=1 -> 5 (right), t=2 -> 6 (wrong), t=3 -> 7 (right)
    logits[0, 1, 5] = logits[0, 2, 1] = logits[0, 3, 7] = 1.0
    logits[0, 0, 3] = 1.0  # predicting an unlabelled target: ignored
    assert synthetic.masked_accuracy(logits, labels) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no labelled positions"):
        synthetic.masked_accuracy(logits, torch.full((1, 5), -100))


def test_perfect_copying_logits_score_full_accuracy():
    seq = synthetic.duplication_batch(3, 9, torch.Generator().manual_seed(1))
    labels = synthetic.second_copy_labels(seq)
    logits = torch.nn.functional.one_hot(seq.roll(-1, dims=1), 128).float()  # next token
    assert synthetic.masked_accuracy(logits, labels) == 1.0


def test_task_resumes_its_stream_and_keeps_a_fixed_eval_set():
    cfg = TrainConfig(task="synthetic", seq_len=32, batch_size=3, eval_windows=5, seed=2)
    task = synthetic.DuplicationTask(cfg.task_spec())
    task.next_batch()
    state = task.state_dict()
    expected = [task.next_batch() for _ in range(2)]
    other = synthetic.DuplicationTask(cfg.replace(seed=9).task_spec())
    other.load_state_dict(state)
    for (x, y), (ex, ey) in zip((other.next_batch() for _ in range(2)), expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    inputs, labels = task.eval_set()
    assert inputs.shape == (5, 32)
    assert torch.equal(inputs, synthetic.DuplicationTask(cfg.task_spec()).eval_set()[0])
    assert not any(torch.equal(inputs[:3], b[0]) for b in expected)


@pytest.mark.parametrize("seq_len", [31, 2])
def test_bad_lengths_are_rejected(seq_len):
    with pytest.raises(ValueError, match="even and >= 4"):
        TrainConfig(task="synthetic", seq_len=seq_len)


def test_synthetic_data_cannot_come_from_files():
    with pytest.raises(ValueError, match="generates its data"):
        TrainConfig(task="synthetic", seq_len=32, data=("x.txt",))
