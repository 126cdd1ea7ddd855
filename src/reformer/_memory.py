"""Keeping freed memory for reuse during training on CPU.

A training step allocates and frees the same temporaries over and over: per block of rows
(the feed-forward's (rows, d_ff) activations), per block of sorted chunks, per head slice.
By default glibc serves large requests with fresh ``mmap`` pages and hands freed memory back
to the kernel, so every reallocation page-faults its memory in again and the kernel zeroes
it: a 2-layer 64K step took 328K page faults and 0.9 s of system time, and a 12-layer one
2.6M faults and 6.0 s.

:func:`keep_freed_memory` changes that, for the whole process, at the first reversible
training step on CPU. ``REFORMER_MALLOC`` chooses how:

- ``cache`` (the default): PyTorch's CPU allocator is replaced, for requests from
  ``CACHE_MIN_BYTES`` to ``CACHE_MAX_BYTES``, by a cache of page-aligned mappings kept by
  exact size (``csrc/cpu_allocator.cpp``). A freed block waits for the next request of its
  size, whose pages are then already resident: no faults. Each block is its own mapping, so
  nothing fragments. In the benchmark's depth sweep at 64K, 2 / 6 / 12 layers peaked at
  0.97 / 1.03 / 1.12 GiB (``reuse``: 1.03 / 1.15 / 1.30), and the million-token step at
  6.50 GiB (6.68). The 6-layer 64K step took as long as with ``reuse`` within this machine's
  noise (interleaved medians 20.3 and 27.4 s against 20.3 and 20.4). It needs the native
  kernels (``_native.py``); without them it falls back to ``reuse``.
- ``reuse``: glibc's mmap threshold is raised to its largest value (32 MiB) and its trim
  threshold to 2 GiB, so that temporaries come from the heap and their pages are reused.
  The heap fragments, though: long-lived tensors land between temporaries, and free chunks
  that no later request fits stay resident. At 64K the 12-layer step's resident memory after
  each attention half grew from 0.87 to 1.12 GiB over its first step, and 12 layers peaked
  at 1.27 to 1.42 GiB in different runs against 1.03 to 1.05 for 2.
- ``default``: leave both allocators alone.

Decisions:
- glibc's thresholds are raised in ``cache`` mode too: requests under ``CACHE_MIN_BYTES``
  and memory allocated outside PyTorch's allocator (BLAS buffers) still come from the heap.
- The reversible backward allocates all parameter gradients before its first layer, so
  that in ``reuse`` mode they do not sit between the temporaries of later layers.
- Requests over ``CACHE_MAX_BYTES`` (whole (L, d_model) tensors beyond L = 32K at d_model 256)
  still go to glibc, which maps them and unmaps them when freed: cached, the million-token
  step's 1 GiB tensors would be held between uses. Cached free blocks are capped at
  ``CACHE_LIMIT_BYTES`` (a 64K step caches about 0.2 GiB); a block freed over the cap is
  unmapped, and a miss with a full cache unmaps other sizes' blocks first, so that training
  on changing lengths cannot pile up blocks no request fits.
- Trimming the heap between half-layers (``malloc_trim`` once the resident free heap grew by
  128 MiB, commit 6c7ea12, then opt-in as ``REFORMER_MALLOC=trim``) was replaced by the
  cache: it peaked at 1.01 / 1.08 / 1.14 GiB with 2 / 6 / 12 layers but made the 6-layer
  step 7% slower, since the next half-layer faulted the trimmed pages in again. Its depth
  rows are in ``benchmarks/results/depth-trim.jsonl``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

from reformer import _native

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int
CACHE_MIN_BYTES = 1 << 20  # smaller requests go to PyTorch's own allocator (malloc)
CACHE_MAX_BYTES = MMAP_THRESHOLD  # larger requests too (glibc maps them)
CACHE_LIMIT_BYTES = 1 << 30  # most bytes of free blocks the cache keeps
ENV = "REFORMER_MALLOC"
SETTINGS = ("cache", "reuse", "default")


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt():
    return getattr(_libc(), "mallopt", None)  # None off glibc (e.g. musl)


def _setting() -> str:
    setting = os.environ.get(ENV, "cache")
    if setting not in SETTINGS:
        raise ValueError(f"{ENV}={setting!r} is not understood; use 'cache' (the default: "
                         "reuse large blocks through a caching CPU allocator), 'reuse' (only "
                         "raise glibc's thresholds) or 'default' (leave allocators alone)")
    return setting


def _cache_allocations() -> bool:
    """Install the caching CPU allocator; False where the native kernels are unavailable."""
    if not _native.available():
        return False
    return bool(torch.ops.reformer.cache_cpu_allocations(CACHE_MIN_BYTES, CACHE_MAX_BYTES,
                                                         CACHE_LIMIT_BYTES))


@functools.cache
def keep_freed_memory() -> str | None:
    """Make the process keep freed memory for reuse (see the module docstring), once.

    Returns the mode in effect: ``"cache"``, ``"reuse"`` (glibc's thresholds only: no native
    kernels), or None (``REFORMER_MALLOC=default``, or neither applies: off glibc without
    the native kernels).
    """
    setting = _setting()
    if setting == "default":
        return None
    mallopt = _mallopt()
    # mallopt returns 1 on success; both calls must take effect for the reuse to hold
    tuned = mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if setting == "cache" and _cache_allocations():
        return "cache"
    return "reuse" if tuned else None


def release_cached_blocks() -> int:
    """Unmap the free blocks the cache keeps (``cache`` mode; 0 otherwise): for work whose
    temporaries take sizes that do not recur (reformer.parallel.rounds: index tensors sized
    by how many items each process sends), which would otherwise fill the cache with blocks
    no later request fits, up to ``CACHE_LIMIT_BYTES``. Returns the bytes released."""
    if not _native.available() or not torch.ops.reformer.cpu_cache_installed():
        return 0
    return int(torch.ops.reformer.release_cached_cpu_blocks())
