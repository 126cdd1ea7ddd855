"""Shared fixtures: a tiny float64 ReformerLM that mixes all three attention kinds, and one
intra-op thread for every test: the models here are tiny, and on a busy 2-core machine two
threads waiting for each other make every small op several times slower than one alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.training.trainer import Callback

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler to build the native kernels")

TINY = dict(vocab_size=32, d_model=16, n_heads=2, d_ff=32, n_layers=3,
            attn_layers=("lsh", "local", "full"), n_hashes=2, n_buckets=4, chunk_length=4,
            local_chunk_length=4, max_seq_len=64, hash_seed=0, init_std=0.1)


# Module- and session-scoped fixtures (e.g. a reference training run) are set up before the
# function fixture below: one thread for them too. With two, a run's losses differ from a
# one-thread run's in the last bits, and from another two-thread run's (measured: step 2 of
# test_checkpoint's reference run, step 5 between two two-thread runs), which made a resume
# test that compares against such a reference fail now and then.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_model():
    """``make_model(seed=0, dtype=float64, **config_overrides)`` -> ReformerLM in train mode."""

    def make(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> ReformerLM:
        torch.manual_seed(seed)
        return ReformerLM(ReformerConfig(**{**TINY, **overrides})).to(dtype).train()

    return make


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = TINY["vocab_size"]):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ids():
    """``ids(batch, length, seed=0)`` -> random (B, L) token ids below TINY's vocab_size."""
    return random_ids


def train_text_run(folder: Path, config: ReformerConfig) -> Path:
    """A run of ``config`` trained for one step on a short text in ``folder``: its directory
    (for command-line tests that need a checkpoint)."""
    from reformer.cli import main

    (folder / "model.json").write_text(config.to_json())
    (folder / "text.txt").write_text("Now is the winter of our discontent. " * 40)
    assert main(["train", "--config", str(folder / "model.json"), "--data",
                 str(folder / "text.txt"), "--steps", "1", "--eval-every", "1",
                 "--eval-windows", "1", "--batch-size", "1", "--out", str(folder / "run"),
                 "--device", "cpu"]) == 0
    return folder / "run"


def graph_has(t: torch.Tensor, name: str) -> bool:
    """Whether the autograd graph that produced ``t`` holds a node called ``name``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == name:
            return True
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return False


class StopAt(Callback):
    """Asks the trainer to stop after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer, report):
        if report.step == self.step:
            trainer.request_stop("test")

