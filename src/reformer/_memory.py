"""Keeping freed heap memory for reuse during training on CPU (glibc).

A training step allocates and frees the same temporaries over and over: per block of rows
(the feed-forward's (rows, d_ff) activations), per block of sorted chunks, per head slice.
By default glibc serves large requests with fresh ``mmap`` pages and hands freed memory back
to the kernel, so every reallocation page-faults its memory in again and the kernel zeroes
it: a 2-layer 64K step took 328K page faults and 0.9 s of system time, and a 12-layer one
2.6M faults and 6.0 s. :func:`keep_freed_memory` raises glibc's mmap threshold to its largest
value (32 MiB) and its trim threshold to 2 GiB, so that those temporaries come from the heap
and their pages are reused. With both thresholds raised through GLIBC_TUNABLES (the mmap
threshold to 1 GiB) a 2-layer 64K step took 14 faults and 13.3 s against 15.4 s. Larger
requests (whole (L, E) tensors from L = 128K at E = 64) are still mapped and returned when
freed.

Resident memory then stays at the step's high-water mark between steps instead of being
returned and faulted back. Within a step the heap grows where long-lived allocations land
between temporaries, so the reversible backward allocates all parameter gradients before its
first layer. The benchmark's depth sweep at 64K then peaked at 0.84 GiB with 2 layers and
1.03 with 12 (docs/benchmarks.md).

Decisions:
- It changes the allocator of the whole process, once, at the first reversible training
  step on CPU (nothing changes for inference, on GPUs, or off glibc). ``REFORMER_MALLOC=
  default`` leaves glibc's settings alone.
- No ``malloc_trim`` between layers: it made resident memory flat with depth only by giving
  every layer's pages back to be faulted in again by the next.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int
ENV = "REFORMER_MALLOC"


@functools.cache
def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring), once per process.

    Returns whether the settings were changed: False off glibc or with ``REFORMER_MALLOC=
    default`` in the environment.
    """
    setting = os.environ.get(ENV, "reuse")
    if setting not in ("reuse", "default"):
        raise ValueError(f"{ENV}={setting!r} is not understood; use 'reuse' (the default) or "
                         "'default' (leave glibc's allocator settings alone)")
    mallopt = _mallopt()
    if setting == "default" or mallopt is None:
        return False
    # mallopt returns 1 on success; both calls must take effect for the reuse to hold
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
