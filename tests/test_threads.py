"""Small work on one intra-op thread (reformer._threads), and decoding steps as such work."""

from __future__ import annotations

import pytest
import torch

from reformer import _threads
from reformer.generation import sample


@pytest.fixture
def two_threads():
    torch.set_num_threads(2)  # conftest's one_thread fixture restores its own count after


def test_small_work_runs_on_one_thread_and_the_count_comes_back(two_threads):
    with _threads.one_thread_if_small(_threads.SMALL_FLOPS - 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), _threads.one_thread_if_small(1):
        raise RuntimeError("a failing block")
    assert torch.get_num_threads() == 2


def test_large_work_keeps_every_thread(two_threads):
    with _threads.one_thread_if_small(_threads.SMALL_FLOPS):
        assert torch.get_num_threads() == 2


def test_cached_decoding_steps_run_on_one_thread(two_threads, make_model, monkeypatch):
    model = make_model(attn_layers=("lsh", "local"), n_layers=2)
    seen = {"prefill": [], "step": []}
    for name in seen:
        original = getattr(model, name)

        def record(*args, _original=original, _name=name, **kwargs):
            seen[_name].append(torch.get_num_threads())
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, name, record)
    tokens = list(sample(model, torch.tensor([1, 2, 3]), 5,
                         generator=torch.Generator().manual_seed(0)))
    assert len(tokens) == 5
    assert seen == {"prefill": [2], "step": [1, 1, 1, 1]}
    assert torch.get_num_threads() == 2  # between tokens too: the caller's count
