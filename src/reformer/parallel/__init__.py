"""torch.distributed for the Reformer (DESIGN.md 3.1): process groups under ``torchrun``, data
parallelism with DDP or FSDP2 per reversible block, and sequence parallelism.

The model never imports this package: it offers what the wiring needs (one autograd node per
reversible block, ``ReversibleStack.sharded``) and this package uses it.
"""

from reformer.parallel.data_parallel import (
    PARALLEL,
    finish_gradients,
    full_model_state,
    full_optimizer_state,
    gradient_sync,
    shard_optimizer_state,
    unwrap,
    wrap,
)
from reformer.parallel.world import World, close_world, init_world, launched_by_torchrun

__all__ = [
    "PARALLEL",
    "World",
    "close_world",
    "finish_gradients",
    "full_model_state",
    "full_optimizer_state",
    "gradient_sync",
    "init_world",
    "launched_by_torchrun",
    "shard_optimizer_state",
    "unwrap",
    "wrap",
]
