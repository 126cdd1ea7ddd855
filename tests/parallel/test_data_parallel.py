"""DDP and FSDP2 per block on two gloo processes: gradients equal one process on the whole
batch, and processes stay in step with dropout on (reformer.parallel, reformer.reversible)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.parallel.launch import run_workers
from torch.utils import _pytree

from reformer.model import ReformerOutput

WORLD = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every figure, from one run of tests/parallel/workers.py on two processes."""
    tmp = tmp_path_factory.mktemp("ddp")
    return run_workers(Path(__file__).with_name("workers.py"), WORLD, tmp)


@pytest.mark.parametrize("how", ["ddp", "ddp-static", "fsdp"])
def test_gradients_equal_one_process_on_the_whole_batch(results, how):
    # lsh, local and full layers, float64, dropout 0: the same numbers up to rounding.
    assert results[f"grad/{how}"] <= 1e-6


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_accumulation_communicates_once_and_sums_every_micro_batch(results, how):
    assert results[f"accum/{how}"]["error"] <= 1e-6
    if how == "ddp":  # the first micro-batch's backward skipped the all-reduce
        assert results[f"accum/{how}"]["first_was_local"]


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_processes_stay_identical_with_dropout(results, how):
    assert results[f"steps/{how}"] == {"identical": True, "moved": True}


def test_fsdp_shards_every_block(results):
    # Sharded per block and at the root, each of 2 processes holds about half the elements
    # (dimensions that do not split evenly give one process a row more).
    assert results["share/fsdp"] <= 0.55


def test_model_output_is_a_pytree_of_its_tensors():
    # DDP with static_graph walks the output for tensors; an opaque output skips the all-reduce.
    loss, logits = torch.tensor(1.0), torch.zeros(1, 2, 3)
    leaves, _ = _pytree.tree_flatten(ReformerOutput(logits=logits, loss=loss))
    assert any(t is loss for t in leaves) and any(t is logits for t in leaves)
