"""Execution plans: how the model's work is cut into pieces on a device (DESIGN.md 3.2).

What the model computes (DESIGN.md section 1) does not depend on the device; how it is cut
into work does. The plan is chosen once per call from the input's device:

- **cpu**: cache-sized pieces. Heads in slices of ``attn_head_chunk_size``, position-wise work
  in blocks of ``ff_chunk_size`` / ``loss_chunk_size`` / 4,096 rows, attention cores through
  the blockwise kernels and their C++ versions (attention/_sorted.py, _chunked.py).
- **cuda**: few, large kernels. A GPU step is bound by kernel launches (~7 us each) long
  before it is bound by arithmetic, so every head of a layer goes at once, position-wise work
  runs in blocks of at least 64K rows, hashing in one piece, and the attention cores go
  through one FlexAttention call each (attention/_banded.py): no Python loop whose length
  grows with L up to 64K positions, and no host sync inside the layers. Beyond 64K tokens
  the heads go in smaller slices (one at a time from 256K), since each holds its rows
  sorted for all rounds: the work per launch is then large anyway.

The number of operators a layer issues is then the same at every length up to 64K tokens
(counted on the CPU by forcing the cuda plan, :func:`forced`, with :func:`count_kernel_ops`:
230 for the benchmark shape at 4K, 16K and 64K; tests/test_plan.py holds 4K = 16K).

Decision: the plan is a module-level choice by device, not a config field: a checkpoint
trained on a GPU computes the same function on the CPU, only cut differently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """How one device cuts the work (see the module docstring)."""

    name: str
    min_rows: int  # position-wise blocks hold at least this many rows (0: the config's)
    head_positions: int  # a head slice holds up to this many heads x positions (0: config's)
    banded: bool  # attention cores through attention/_banded.py (FlexAttention)

    def heads_per_slice(self, n_heads: int, length: int) -> int | None:
        """Heads attended at once over ``length`` positions (None: ``attn_head_chunk_size``):
        every head up to 64K tokens, fewer beyond, so that a slice's sorted rows (R*L*E per
        head) stay near 256 MiB in float32 at 4 rounds of 64."""
        if not self.head_positions:
            return None
        return max(1, min(n_heads, self.head_positions // max(length, 1)))

    def rows(self, configured: int, width: int = 1) -> int:
        """Rows per block of position-wise work whose widest temporary has ``width``
        columns, given the config's block size: at least ``min_rows`` unless that would
        make a temporary of more than ``BLOCK_ELEMENTS``."""
        return max(configured, min(self.min_rows, BLOCK_ELEMENTS // width))


BLOCK_ELEMENTS = 1 << 26  # the cuda plan's largest position-wise temporary (256 MiB fp32)
CPU = Plan("cpu", min_rows=0, head_positions=0, banded=False)
CUDA = Plan("cuda", min_rows=1 << 16, head_positions=1 << 18, banded=True)
PLANS = {"cpu": CPU, "cuda": CUDA}
# Ops that only make views or allocate: no kernel runs for them on a GPU.
_NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t",
    "aten::transpose", "aten::permute", "aten::expand", "aten::slice", "aten::select",
    "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::detach", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::lift_fresh", "aten::_unsafe_view",
    "aten::unflatten", "aten::flatten", "aten::split", "aten::split_with_sizes", "aten::chunk",
    "aten::unbind", "aten::numpy_T", "aten::resolve_conj", "aten::resolve_neg",
    "aten::result_type", "aten::is_nonzero", "aten::_has_compatible_shallow_copy_type",
    "aten::view_as", "aten::expand_as", "aten::narrow", "aten::set_", "aten::to",
    "aten::_to_copy", "aten::detach_", "aten::requires_grad_", "aten::contiguous",
    "aten::resize_", "aten::promote_types", "aten::real", "aten::zeros", "aten::zeros_like",
    "aten::ones", "aten::full", "aten::new_empty", "aten::new_zeros", "aten::clone",
}
_forced: Plan | None = None


def plan_for(device: torch.device) -> Plan:
    """The plan for work on ``device``: cuda's on a CUDA device, else the CPU's (unless a
    plan is :func:`forced`)."""
    if _forced is not None:
        return _forced
    return CUDA if torch.device(device).type == "cuda" else CPU


@contextlib.contextmanager
def forced(name: str) -> Iterator[Plan]:
    """Use plan ``name`` on every device inside the block (tests and benchmarks: the cuda
    plan's operator count is measured on the CPU this way). A step's forward and backward
    must both run inside it: the backward recomputes the forward's head slices."""
    global _forced
    if name not in PLANS:
        raise ValueError(f"plan {name!r} is not one of {sorted(PLANS)}; pass 'cpu' or 'cuda'")
    before, _forced = _forced, PLANS[name]
    try:
        yield _forced
    finally:
        _forced = before


def count_cuda_launches(fn: Callable[[], object]) -> int:
    """Kernel launches (``cudaLaunchKernel`` and the driver's ``cuLaunchKernel`` calls) of one
    call of ``fn``, profiled after a warm-up call (which compiles what it compiles)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    return sum(1 for event in prof.events() if "LaunchKernel" in event.name)


def count_kernel_ops(fn: Callable[[], object]) -> dict[str, int]:
    """Run ``fn`` under torch.profiler and count the operators that would launch a kernel:
    ATen operators with no such operator inside them, where operators that only make views,
    allocate or resize launch none. Returns {operator name: calls}."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    def launches(event) -> bool:  # a kernel inside it, or it is one
        inner = [launches(child) for child in event.cpu_children]  # (all: no short cut)
        if any(inner):
            return True
        if event.name.startswith("aten::") and event.name not in _NO_KERNEL:
            counts[event.name] = counts.get(event.name, 0) + 1
            return True
        return False

    counts: dict[str, int] = {}
    for event in prof.events():
        if event.cpu_parent is None:
            launches(event)
    return counts
