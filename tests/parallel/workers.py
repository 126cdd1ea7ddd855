"""What each process of the data-parallel tests runs (spawned with gloo on the CPU).

One spawn of two processes computes every figure the tests check, so the processes' start-up
(importing PyTorch) is paid once; rank 0 writes them to a JSON file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

TINY = dict(vocab_size=32, d_model=16, n_heads=2, d_ff=32, n_layers=3,
            attn_layers=("lsh", "local", "full"), n_hashes=2, n_buckets=4, chunk_length=4,
            local_chunk_length=4, max_seq_len=64, hash_seed=0, init_std=0.1)
PER_RANK, LENGTH = 2, 24


def build(**overrides):
    from reformer import ReformerConfig, ReformerLM

    torch.manual_seed(0)
    return ReformerLM(ReformerConfig(**{**TINY, **overrides})).double().train()


def batch(world: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (PER_RANK * world, LENGTH),
                         generator=torch.Generator().manual_seed(1))


def relative_errors(model, reference) -> float:
    """The largest |g - g_ref| / |g_ref| over the parameters (sharded gradients gathered)."""
    worst = 0.0
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, float((g - q.grad).norm() / q.grad.norm()))
    return worst


def gradients(rank: int, world: int, how: str) -> float:
    """One step's gradients through ``how`` against one process on the whole batch."""
    from torch.nn.parallel import DistributedDataParallel

    from reformer.parallel import wrap

    ids = batch(world)
    reference = build()
    reference(ids, labels=ids, return_logits=False).loss.backward()
    model = build()
    wrapped = DistributedDataParallel(model, static_graph=True) if how == "ddp-static" \
        else wrap(model, how, torch.device("cpu"))
    mine = ids[rank * PER_RANK:(rank + 1) * PER_RANK]
    for _ in range(2):  # static_graph settles its schedule in the first iteration
        wrapped.zero_grad(set_to_none=True)
        wrapped(mine, labels=mine, return_logits=False).loss.backward()
    return relative_errors(model, reference)


def accumulated(rank: int, world: int, how: str) -> dict:
    """Two micro-batches, the first without gradient communication (the trainer's
    accumulation): is the first backward's gradient this process's own, and is the total that
    of one process on both whole micro-batches?"""
    from reformer.parallel import gradient_sync, wrap

    first, second = batch(world), batch(world).flip(0)
    reference = build()
    for ids in (first, second):
        (reference(ids, labels=ids, return_logits=False).loss / 2).backward()
    model = build()
    wrapped = wrap(model, how, torch.device("cpu"))
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = None
    for i, ids in enumerate((first, second)):
        with gradient_sync(wrapped, i == 1):
            (wrapped(ids[rows], labels=ids[rows], return_logits=False).loss / 2).backward()
        if i == 0 and how == "ddp":  # the same on every process only if it was all-reduced
            local = model.stack.blocks[0].g.ff.w_in.weight.grad.clone()
    mine = {"error": relative_errors(model, reference)}
    if local is not None:
        everyone = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(everyone, local)
        mine["first_was_local"] = not torch.equal(everyone[0], everyone[1])
    return mine


def identical_after_steps(rank: int, world: int, how: str) -> dict:
    """Dropout on, 3 AdamW steps: are the parameters bit-identical across the processes?"""
    from reformer.parallel import full_model_state, wrap

    model = build(dropout=0.1, attention_dropout=0.1)
    wrapped = wrap(model, how, torch.device("cpu"))
    torch.manual_seed(1000 + rank)  # per-process dropout masks, as the trainer's policy
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = batch(world)[rank * PER_RANK:(rank + 1) * PER_RANK]
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        wrapped(ids, labels=ids, return_logits=False).loss.backward()
        optimizer.step()
    flat = torch.cat([t.flatten() for t in full_model_state(wrapped).values()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    moved = not torch.equal(flat, torch.cat([t.flatten() for t in build().state_dict().values()]))
    return {"identical": all(torch.equal(everyone[0], e) for e in everyone), "moved": moved}


def shard_share(how: str) -> float:
    """This process's share of the parameters' elements (1/P when every block is sharded)."""
    from reformer.parallel import wrap

    model = build()
    total = sum(p.numel() for p in model.parameters())
    wrap(model, how, torch.device("cpu"))
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                for p in model.parameters())
    return local / total


def compute(rank: int, world: int) -> dict:
    results = {f"grad/{how}": gradients(rank, world, how)
               for how in ("ddp", "ddp-static", "fsdp")}
    results.update({f"steps/{how}": identical_after_steps(rank, world, how)
                    for how in ("ddp", "fsdp")})
    results.update({f"accum/{how}": accumulated(rank, world, how) for how in ("ddp", "fsdp")})
    results["share/fsdp"] = shard_share("fsdp")
    return results


if __name__ == "__main__":  # python workers.py RANK WORLD STORE OUT
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.parallel.launch import worker_main

    worker_main(compute)
