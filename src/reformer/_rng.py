"""Recording and replaying the RNG state, so that a recomputation draws the same dropout masks.

Used by the reversible backward (each half-block) and by the chunk-window attention kernel
(its backward recomputes attention-dropout masks block by block).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def capture_rng(device: torch.device) -> tuple:
    """The CPU RNG state and, on CUDA, the device's RNG state."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def replay_rng(state: tuple | None, device: torch.device) -> Iterator[None]:
    """Run the block with the RNG in ``state`` (no-op for None); restore the RNG afterwards."""
    if state is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type):
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], device)
        yield
