"""The shared-memory all_to_all (reformer.parallel.shm) on 2 and 3 gloo processes: every
exchange equals dist.all_to_all_single's, outboxes grow, no file outlives a call, and a
message over the size bound sends everyone through gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.parallel.launch import run_workers

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")


@pytest.fixture(scope="module", params=[2, 3], ids=["2-processes", "3-processes"])
def results(request, tmp_path_factory) -> dict:
    world = request.param
    tmp = tmp_path_factory.mktemp(f"shm{world}")
    return run_workers(Path(__file__).with_name("shm_workers.py"), world, tmp)


@pytest.fixture(scope="module")
def ranks(results) -> list[dict]:
    return results["ranks"]


def test_every_exchange_equals_gloos(ranks):
    # four dtypes, parts of 0 to 70,000 elements, some empty, in every process
    for r in ranks:
        assert r["equal"] and r["calls"] == 24 and r["fallbacks"] == 0


def test_rows_gathered_as_they_are_sent_equal_gloos_of_the_gathered_tensor(ranks):
    for r in ranks:
        assert r["gathered_equal"] == [True] * 8


def test_outboxes_grow_and_no_file_outlives_a_call(ranks):
    for r in ranks:
        assert r["generations"] >= 2  # messages grew past the first outbox
        assert r["files_left"] == 0 and r["files_after_close"] == 0


def test_a_message_over_the_bound_on_one_process_sends_everyone_through_gloo(ranks):
    fell = [[call["fell_back"] for call in r["fallback"]] for r in ranks]
    assert all(f == [True, False, True, False] for f in fell)
    assert all(call["equal"] and call["files"] == 0 for r in ranks for call in r["fallback"])
    # rows to gather, over the bound: gathered first, then through gloo
    assert all(r["fallback_gathered"] and r["fallback_gathered_fell"] == 3 for r in ranks)


def test_one_machine_is_agreed_by_every_process(ranks):
    assert all(r["one_machine"] for r in ranks)
    assert not any(r["one_machine_unusable_somewhere"] for r in ranks)


def test_bad_inputs_are_refused_with_what_was_given(ranks):
    for r in ranks:
        assert "do not fit 4 -> 3 elements" in r["bad_splits"]
        assert "torch.float32 -> torch.float64" in r["bad_dtype"]
        assert "in rows of (3,)" in r["bad_rows"]


def test_one_machine_says_no_where_a_processor_may_reorder_stores(ranks):
    # the counters rely on stores kept in order (x86-64): one aarch64 says no for all
    assert not any(r["one_machine_elsewhere"] for r in ranks)


def test_a_wait_gives_up_after_its_timeout_naming_the_process(ranks):
    assert "process 1 of the group" in ranks[0]["timed_out"]
    assert "has not reached step 1 in 0.5 s" in ranks[0]["timed_out"]


def test_a_process_that_exits_is_named_by_the_ones_waiting_for_it(results):
    assert "exited before reaching step 1" in results["peer_exited"]
    assert "process 1 of the group" in results["peer_exited"]
