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
first layer. The heap still fragments, layer after layer: free chunks that no later request
fits stay resident. At 64K (benchmark shape) the heap held 0.15 GiB free at the 2-layer
step's peak and 0.25 GiB at the 12-layer one's, and the 12-layer step's resident memory after
each attention half grew from 0.87 to 1.12 GiB over its first step's layers.

``REFORMER_MALLOC=trim`` trades speed for that memory: :func:`release_fragments`, called by
the reversible stack after each half-layer, then hands the free pages back (``malloc_trim``)
once the memory resident beyond what malloc has handed out has grown by ``FRAGMENT_BYTES``
since its lowest reading. The benchmark's depth sweep at 64K peaked at 1.01 / 1.08 / 1.14 GiB
with 2 / 6 / 12 layers with it (1.03 / 1.15 / 1.30 without, in an earlier run), but the
6-layer step was 7% slower (medians 25.4 and 25.5 s against 23.5 and 23.8, interleaved),
since each trim's pages are faulted in again by the next half-layer.

Decisions:
- It changes the allocator of the whole process, once, at the first reversible training
  step on CPU (nothing changes for inference, on GPUs, or off glibc). ``REFORMER_MALLOC=
  default`` leaves glibc's settings alone; ``reuse`` (the default) raises the thresholds;
  ``trim`` also trims.
- Trimming is not the default: speed is (the issue's speed targets have thin margins). Two
  other policies were measured and dropped: trimming when mallinfo2 counted over 64 MiB free
  (it counts pages already given back too, so it trimmed at 92 of 96 half-layers; 6 layers
  took 27.6 s against 25.8, one pair), and measuring growth from the level refilled after
  each trim (fewer trims, but 12 layers still peaked at 1.26 GiB against 1.00 for 2).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
FRAGMENT_BYTES = 128 << 20  # resident free heap tolerated before release_fragments trims
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int
ENV = "REFORMER_MALLOC"
SETTINGS = ("reuse", "trim", "default")


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


class _MallInfo2(ctypes.Structure):  # struct mallinfo2 (malloc.h, glibc >= 2.33)
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.cache
def _trim_functions():
    """(mallinfo2, malloc_trim), or None where glibc lacks them."""
    libc = _libc()
    mallinfo2, trim = (getattr(libc, name, None) for name in ("mallinfo2", "malloc_trim"))
    if mallinfo2 is None or trim is None:
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2, trim


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_lowest_unallocated = [None]  # the lowest (resident - handed out by malloc) seen


def release_fragments() -> bool:
    """Give the heap's free pages back to the kernel when they have piled up (see the module
    docstring); a no-op unless ``REFORMER_MALLOC=trim`` and :func:`keep_freed_memory` changed
    the settings. Returns whether it trimmed."""
    fns = _trim_functions() if keep_freed_memory() and _setting() == "trim" else None
    if fns is None:
        return False
    mallinfo2, trim = fns
    info = mallinfo2()
    # resident memory that no live allocation holds: libraries, interpreter, free heap pages
    unallocated = _resident_bytes() - info.uordblks - info.hblkhd
    lowest = _lowest_unallocated[0]
    if lowest is None or unallocated < lowest:
        _lowest_unallocated[0] = lowest = unallocated
    if unallocated - lowest <= FRAGMENT_BYTES:
        return False
    trim(0)
    return True


def _setting() -> str:
    setting = os.environ.get(ENV, "reuse")
    if setting not in SETTINGS:
        raise ValueError(f"{ENV}={setting!r} is not understood; use 'reuse' (the default), "
                         "'trim' (also give fragments back between layers: less memory, "
                         "slower) or 'default' (leave glibc's allocator settings alone)")
    return setting


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring), once per process.

    Returns whether the settings were changed: False off glibc or with ``REFORMER_MALLOC=
    default`` in the environment.
    """
    setting = _setting()
    mallopt = _mallopt()
    if setting == "default" or mallopt is None:
        return False
    # mallopt returns 1 on success; both calls must take effect for the reuse to hold
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
