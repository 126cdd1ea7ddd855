"""Data parallelism for a ReformerLM: DistributedDataParallel, or FSDP2 one reversible block at
a time, and the model's and optimiser's state in the one-process format.

- ``ddp``: every process holds the whole model; gradients are all-reduced in buckets of one
  block's size, and live in those buckets (``gradient_as_bucket_view``: no second copy). The
  reversible stack is one autograd node per block (reformer.reversible), so a block's bucket
  goes out while the blocks below are still being recomputed (docs/distributed.md: 89% of
  the all-reduce time runs during the backward on 2 CPU processes).
- ``sequence``: every process holds the whole model and a slice of each sequence
  (reformer.parallel.sequence); its gradients are summed after the step's backward passes.
- ``fsdp``: ``fully_shard`` on every reversible block and on the model (embeddings, final norm,
  head). A block's parameters are gathered for its forward and again for its recomputing
  backward, and its gradients are reduce-scattered as soon as its backward is done, so a
  process holds 1/P of the weights, gradients and AdamW moments plus one gathered block.
  FSDP1 (``FullyShardedDataParallel``) is not supported.

Checkpoints keep the one-process format whatever the wrapping: :func:`full_model_state` and
:func:`full_optimizer_state` gather sharded tensors whole (every process must call them, in
the same order), and :func:`shard_optimizer_state` cuts a loaded one-process state back into
this process's shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from reformer.model import ReformerLM

PARALLEL = ("ddp", "fsdp", "sequence")  # TrainConfig.parallel


def wrap(model: ReformerLM, how: str, device: torch.device) -> nn.Module:
    """``model`` ready for data-parallel training; call in every process, after the weights
    are loaded (FSDP shards what the model holds then)."""
    if how not in PARALLEL:
        raise ValueError(f"parallel={how!r} is unknown; use one of {PARALLEL}")
    if how == "sequence":
        from reformer.parallel.sequence import SequenceParallelLM

        return SequenceParallelLM(model)
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=block_mib(model),
                                       gradient_as_bucket_view=True)
    from torch.distributed.fsdp import fully_shard

    for block in model.stack.blocks:
        fully_shard(block)
    fully_shard(model)
    model.stack.sharded = True  # gradient buffers one block at a time
    return model


def block_mib(model: ReformerLM) -> float:
    """DDP's bucket size: one reversible block's parameters, in MiB. A bucket is all-reduced
    once all its gradients are ready; with DDP's default 25 MiB a small model's gradients fill
    one or two buckets, the last holding the embeddings, whose gradients come last, so nothing
    could leave while the stack is still being recomputed (docs/distributed.md)."""
    sizes = [sum(p.numel() * p.element_size() for p in block.parameters())
             for block in model.stack.blocks]
    return max(sizes, default=1 << 20) / 2**20


def unwrap(model: nn.Module) -> ReformerLM:
    """The ReformerLM inside a DDP or sequence-parallel wrapper (FSDP2 shards the model in
    place)."""
    if hasattr(model, "no_sync"):
        return model.module
    return model.model if hasattr(model, "sync_gradients") else model


def finish_gradients(model: nn.Module) -> None:
    """After a step's backward passes: sequence parallelism sums the processes' gradients of
    the replicated weights (DDP and FSDP2 communicate during the backward)."""
    if hasattr(model, "sync_gradients"):
        model.sync_gradients()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Within the block, a backward all-reduces (or reduce-scatters) gradients only if
    ``sync``: micro-batches before the last of an accumulated step skip the communication."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _full(t: torch.Tensor) -> torch.Tensor:
    """A tensor on the CPU, gathered whole if it is a shard (a DTensor)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu")


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The one-process ``state_dict`` of the ReformerLM in ``model``, on the CPU."""
    return {k: _full(v).contiguous() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded moment gathered whole."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: _full(v) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a one-process state into an optimiser over sharded
    parameters: cut each whole moment into this process's shard, like its parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    optimizer.state[p][k] = distribute_tensor(v.to(p.dtype), p.device_mesh,
                                                              p.placements)
