"""Intra-op threads for small work: one thread where a parallel region would cost more than
it saves.

Every parallel region waits for its slowest thread. On an idle machine that costs a few
microseconds; on a machine whose cores other jobs keep busy, a thread that is not running
holds the region up for a scheduler time slice (milliseconds). Work whose ops take
microseconds then runs many times slower with two threads than with one: one cached decoding
step of 2 LSH layers (d_model 256) opens 14 parallel regions (index_select, batched products,
softmax: PyTorch's ops parallelise them at these sizes), and beside two busy processes
decoding ran at 8.1 tokens/s with 2 threads against 378 with one (issue 20). Idle, two
threads gained 5% (470 against 447 tokens/s, medians of 3 on this 2-core machine).

So work below ``SMALL_FLOPS`` runs with one intra-op thread, set for the duration of the block
and restored after it. ``torch.set_num_threads`` is process-wide: a block must not yield to
code that may run in parallel with it (a generator's caller, another Python thread).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

SMALL_FLOPS = 2**25  # about 1 ms of one core's float32 products: a few regions' worth


@contextlib.contextmanager
def one_thread_if_small(flops: float) -> Iterator[None]:
    """Run the block with one intra-op thread if it does fewer than SMALL_FLOPS flops."""
    threads = torch.get_num_threads()
    if flops >= SMALL_FLOPS or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
