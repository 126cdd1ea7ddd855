"""Sequence parallelism (reformer.parallel.sequence) on 2 and 4 gloo processes: logits, loss
and every gradient equal one process on the whole sequence, in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.parallel.launch import run_workers
from tests.parallel.sequence_workers import CASES, COLLECTIVE, HEADS

TOLERANCE = 1e-9


@pytest.fixture(scope="module", params=[2, 4], ids=["2-processes", "4-processes"])
def results(request, tmp_path_factory) -> dict:
    """The worst relative differences over the processes, per case (sequence_workers.py)."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"sp{world}")
    return run_workers(Path(__file__).with_name("sequence_workers.py"), world, tmp)


NOT_DIFFERENCES = ("split", "shared", "shm_calls", "shm_fallbacks")


@pytest.mark.parametrize("case", sorted(CASES) + [f"heads/{c}" for c in HEADS]
                         + [f"collective/{c}" for c in COLLECTIVE])
def test_equals_one_process_on_the_whole_sequence(results, case):
    # lsh, local and full layers; the slices' lengths differ when P does not divide L; LSH
    # split by sorted slots (where long enough) and, "heads/", through the head exchange;
    # rows moved through shared memory and, "collective/", through gloo
    got = {k: v for k, v in results[case].items() if k not in NOT_DIFFERENCES}
    assert got == pytest.approx({k: 0.0 for k in got}, abs=TOLERANCE)


def test_rows_move_through_shared_memory_unless_told_otherwise(results):
    # every process is on this machine: "auto" sends through /dev/shm, and these messages
    # are far below its bound, so none falls back to gloo
    for case in [*CASES, *(f"heads/{c}" for c in HEADS)]:
        assert results[case]["shared"] == 1 and results[case]["shm_calls"] > 0, case
        assert results[case]["shm_fallbacks"] == 0, case
    for case in COLLECTIVE:
        assert results[f"collective/{case}"]["shared"] == 0
        assert results[f"collective/{case}"]["shm_calls"] == 0


def test_lsh_layers_split_by_sorted_slots_where_long_enough(results):
    # the all-LSH cases split every layer on 2 and 4 processes (one of them with one head:
    # more processes than heads); lsh_split="heads" never splits
    for case in ("lsh-bidirectional-padded", "lsh-dropout-bidirectional", "lsh-look-ahead",
                 "lsh-one-head", "lsh-not-reversible"):
        assert results[case]["split"] == 3, case
    assert results["causal"]["split"] == 1  # its lsh layer; local and full are exchanged
    assert all(results[f"heads/{c}"]["split"] == 0 for c in HEADS)


def test_bf16_autocast_is_as_close_to_float32_as_one_process(results):
    # the exchanges' by-hand products must take autocast's dtypes like one process's
    errors = results["bf16"]
    assert 0 < errors["one"] < 0.5  # bf16 does round
    assert errors["sp"] <= 1.5 * errors["one"] + 1e-3
    assert errors["loss"] < 1e-2


def test_float32_spans_in_the_cpp_kernel_equal_one_process(results):
    # float32 without padding or dropout: each span attends in csrc/lsh_chunks.cpp (its rows
    # as received, its own chunks as queries), as one process attends in the same kernel;
    # the blockwise PyTorch kernel over the same spans is the reference it must match
    kernel, by_chunk = results["fused/kernel"], results["fused/kernel-by-chunk"]
    blocks = results["fused/blocks"]
    assert kernel["fused_calls"] > 0 and by_chunk["fused_calls"] > 0
    assert blocks["fused_calls"] == 0
    for got in (kernel, by_chunk, blocks):
        # float32 rounding (measured: about 2e-7 and 1e-6), where a misrouted row is O(0.1)
        assert got["logits"] < 1e-6 and got["loss"] < 1e-6 and got["grads"] < 1e-5


def test_heads_that_do_not_divide_are_refused_only_where_heads_are_exchanged(results):
    check = results["heads-check"]
    assert "n_heads=3 divisible" in check["mixed"] and "LocalSelfAttention" in check["mixed"]
    assert isinstance(check["lsh"], float) and check["lsh"] > 0  # 3 heads on 2 or 4


def test_slices_cover_the_sequence_and_differ_by_at_most_one():
    from reformer.parallel.sequence import split_lengths

    for length in range(4, 40):
        for parts in (2, 3, 4):
            sizes = split_lengths(length, parts)
            assert sum(sizes) == length and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least 4 tokens"):
        split_lengths(3, 4)


def test_head_slices_round_up_to_a_multiple_of_the_processes(make_model):
    attn = make_model(n_heads=4, d_model=16).stack.blocks[0].f.attn
    assert attn.head_slices() == [slice(h, h + 1) for h in range(4)]  # chunk size 1
    assert attn.head_slices(2) == [slice(0, 2), slice(2, 4)]
    assert attn.head_slices(4) == [slice(0, 4)]


def test_an_unknown_lsh_split_is_refused_with_the_choices(make_model):
    from reformer.parallel.sequence import SequenceParallelLM

    with pytest.raises(ValueError, match="lsh_split='slots'.*'rounds'"):
        SequenceParallelLM(make_model(), lsh_split="slots")


def test_chunk_runs_cover_a_round_in_order():
    from reformer.parallel.rounds import chunk_runs

    assert chunk_runs(10, 4) == [0, 3, 6, 8, 10]
    assert chunk_runs(8, 2) == [0, 4, 8]
