"""Keeping freed memory for reuse on CPU (_memory.py) and the caching CPU allocator
(csrc/cpu_allocator.cpp)."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import signal
import sys
import time

import pytest
import torch

from conftest import needs_compiler
from reformer import _memory, _native

MIB = 1 << 20
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_training_step_keeps_freed_memory(make_model, ids, monkeypatch):
    # The first reversible step on CPU sets glibc's thresholds and installs the cache, once.
    calls = []
    monkeypatch.delenv(_memory.ENV, raising=False)
    monkeypatch.setattr(_memory, "_mallopt", lambda: lambda p, v: calls.append((p, v)) or 1)
    modes = []
    monkeypatch.setattr(_memory, "_cache_allocations", lambda: modes.append(1) or True)
    _memory.keep_freed_memory.cache_clear()
    try:
        model = make_model(n_layers=2)
        tokens = ids(2, 24)
        with torch.no_grad():
            model(tokens)  # inference leaves the allocators alone
        assert calls == [] and modes == []
        for _ in range(2):
            model(tokens, labels=tokens, return_logits=False).loss.backward()
        assert sorted(calls) == [(_memory.M_MMAP_THRESHOLD, 32 << 20),
                                 (_memory.M_TRIM_THRESHOLD, 2**31 - 1)]
        assert modes == [1]
        assert _memory.keep_freed_memory() == "cache"
    finally:
        _memory.keep_freed_memory.cache_clear()


@pytest.mark.parametrize("setting, cache_builds, glibc, mode", [
    ("cache", True, True, "cache"),
    ("cache", True, False, "cache"),
    ("cache", False, True, "reuse"),  # no native kernels: glibc's thresholds only
    ("cache", False, False, None),
    ("reuse", True, True, "reuse"),
    ("reuse", True, False, None),
    ("default", True, True, None),
])
def test_keep_freed_memory_obeys_the_environment(monkeypatch, setting, cache_builds, glibc,
                                                 mode):
    monkeypatch.setattr(_memory, "_mallopt", lambda: (lambda p, v: 1) if glibc else None)
    monkeypatch.setattr(_memory, "_cache_allocations", lambda: cache_builds)
    monkeypatch.setenv(_memory.ENV, setting)
    assert _memory.keep_freed_memory.__wrapped__() == mode


def test_a_bad_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv(_memory.ENV, "jemalloc")
    with pytest.raises(ValueError, match="REFORMER_MALLOC='jemalloc'.*'cache'.*'reuse'"):
        _memory.keep_freed_memory.__wrapped__()


def test_reuse_works_exactly_where_glibc_is(monkeypatch):
    monkeypatch.setenv(_memory.ENV, "reuse")
    assert (_memory.keep_freed_memory.__wrapped__() == "reuse") is GLIBC


@pytest.fixture
def cache(monkeypatch):
    """The caching allocator, installed, with an empty cache; ``cache.limit(n)`` sets the cap
    for one test. Garbage collection waits, so that nothing else frees blocks meanwhile."""
    monkeypatch.setenv(_native.ENV, "on")
    if not _memory._cache_allocations():
        pytest.fail("the caching CPU allocator did not install")
    ops = torch.ops.reformer
    gc.collect()
    gc.disable()
    ops.release_cached_cpu_blocks()

    class Cache:
        @staticmethod
        def stats() -> dict:
            names = ("live", "cached", "mapped", "maps", "hits")
            return dict(zip(names, ops.cpu_cache_stats(), strict=True))

        @staticmethod
        def limit(n: int) -> None:
            ops.cache_cpu_allocations(_memory.CACHE_MIN_BYTES, _memory.CACHE_MAX_BYTES, n)

    try:
        yield Cache
    finally:
        gc.enable()
        _memory._cache_allocations()  # the default sizes again


def floats(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes // 4, dtype=torch.float32)


# Sizes no other test allocates (whole pages plus a few), so the cache's lists start empty.
A, B = 3 * MIB + 7 * 4096, 5 * MIB + 3 * 4096


@needs_compiler
def test_a_freed_block_serves_the_next_request_of_its_size(cache):
    before = cache.stats()
    t = floats(A)
    t.fill_(2.0)
    address = t.data_ptr()
    assert address % 4096 == 0
    after_map = cache.stats()
    assert after_map["live"] - before["live"] == A and after_map["maps"] == before["maps"] + 1
    del t
    assert cache.stats()["cached"] == A
    again = floats(A)  # the same size: the same pages, no new mapping
    assert again.data_ptr() == address
    s = cache.stats()
    assert (s["maps"], s["hits"], s["cached"]) == (before["maps"] + 1, before["hits"] + 1, 0)
    again.copy_(torch.arange(again.numel(), dtype=torch.float32))  # fully usable memory
    assert again[-1].item() == again.numel() - 1


@needs_compiler
def test_requests_are_rounded_to_pages_and_small_ones_pass_through(cache):
    before = cache.stats()
    small = floats(_memory.CACHE_MIN_BYTES - 4)  # below the minimum: PyTorch's allocator
    large = floats(_memory.CACHE_MAX_BYTES + 4096)  # above the maximum: the same
    assert cache.stats() == before
    odd = floats(A - 4096 + 4)  # rounded up to A
    assert cache.stats()["live"] - before["live"] == A
    del small, large, odd
    assert cache.stats()["cached"] == A


@needs_compiler
def test_the_cap_unmaps_what_it_cannot_keep(cache):
    cache.limit(A + MIB)  # room for one A block
    base = cache.stats()
    first, second = floats(A), floats(A)
    del first, second
    s = cache.stats()
    assert s["cached"] == A and s["mapped"] - base["mapped"] == A  # the second was unmapped
    third = floats(B)  # a miss with the cache full: the A block goes first
    s = cache.stats()
    assert s["cached"] == 0 and s["mapped"] - base["mapped"] == B
    del third  # over the cap on its own: unmapped
    s = cache.stats()
    assert s["cached"] == 0 and s["mapped"] == base["mapped"]


@needs_compiler
def test_release_hands_every_cached_block_back(cache):
    blocks = [floats(A), floats(B)]
    del blocks
    assert cache.stats()["cached"] == A + B
    assert torch.ops.reformer.release_cached_cpu_blocks() == A + B
    s = cache.stats()
    assert s["cached"] == 0 and s["mapped"] == s["live"]


@needs_compiler
def test_the_profiler_sees_cached_allocations(cache):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t = floats(B)
        t.zero_()
        del t
    assert max(e.cpu_memory_usage for e in prof.events()) >= B


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_can_allocate(cache):
    # The fork handlers must leave the child's lock free: a child that inherits it locked
    # hangs at its first large allocation (killed here after 60 s).
    pid = os.fork()
    if pid == 0:  # child: allocate, write, free, reuse; exit 0 only if all of it worked
        code = 1
        with contextlib.suppress(BaseException):
            t = floats(B)
            t[:4] = 1.0
            del t
            floats(B).zero_()
            code = 0
        os._exit(code)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung allocating")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@needs_compiler
def test_training_runs_on_the_cache(make_model, ids, monkeypatch):
    # After a training step the allocator serves large temporaries from its lists.
    monkeypatch.delenv(_memory.ENV, raising=False)
    _memory.keep_freed_memory.cache_clear()
    model = make_model(n_layers=2, d_model=64, d_ff=1024, max_seq_len=512)
    tokens = ids(2, 512)
    model(tokens, labels=tokens, return_logits=False).loss.backward()
    assert torch.ops.reformer.cpu_cache_installed()
    before = torch.ops.reformer.cpu_cache_stats()
    model(tokens, labels=tokens, return_logits=False).loss.backward()
    after = torch.ops.reformer.cpu_cache_stats()
    assert after[4] > before[4]  # hits


@needs_compiler
@pytest.mark.parametrize("n", [64, 1024])  # both take oneDNN scratch (n = 16 takes none)
def test_raw_allocations_are_freed_through_it(cache, n):
    # oneDNN's bf16 matmul takes scratch through PyTorch's raw_allocate / raw_deallocate,
    # which need data == context and a raw deleter (without, these matmuls abort).
    a = torch.randn(n, n).bfloat16()
    out = torch.empty(2 * n, n, dtype=torch.bfloat16)
    before = cache.stats()["live"]
    torch.mm(a, a, out=out[:n])
    assert torch.allclose(out[:n].float(), a.float() @ a.float(), rtol=0.02, atol=0.05 * n**0.5)
    assert cache.stats()["live"] == before  # the scratch was given back


@needs_compiler
def test_release_cached_blocks_empties_the_cache_and_says_how_much(cache):
    # reformer.parallel.rounds calls it after each pass, whose temporaries' sizes do not recur
    blocks = [floats(A), floats(B)]
    del blocks
    assert _memory.release_cached_blocks() == A + B
    assert cache.stats()["cached"] == 0
    assert _memory.release_cached_blocks() == 0
