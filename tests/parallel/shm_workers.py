"""What each process of the shared-memory all_to_all tests runs (gloo on the CPU): every
exchange through reformer.parallel.shm against dist.all_to_all_single on the same inputs;
rank 0 writes what the processes saw to a JSON file."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

DTYPES = (torch.float32, torch.float64, torch.int64, torch.bfloat16)


def leftover(prefix: str) -> int:
    """Files of this transport left in /dev/shm."""
    from reformer.parallel import shm

    return len(list(shm.SHM.glob(prefix + "*")))


def exchange_both(transport, out_splits, in_splits, dtype, seed) -> tuple[bool, int]:
    """One exchange through ``transport`` and through gloo: (equal?, files left after it)."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = (torch.randn(sum(in_splits), generator=g) * 1000).to(dtype)
    want = torch.empty(sum(out_splits), dtype=dtype)
    dist.all_to_all_single(want, x, out_splits, in_splits)
    got = torch.full_like(want, -7)
    transport(got, x, out_splits, in_splits)
    dist.barrier()  # every process has finished the call
    return bool(torch.equal(got, want)), leftover(transport.prefix)


def gathered_both(transport, seed: int, dtype: torch.dtype, width: int,
                  largest: int = 300) -> bool:
    """Rows of an (N, width) tensor, picked by an index (repeats, any order), sent through
    ``transport`` with ``rows=`` and through gloo as the gathered tensor: equal?"""
    rank = dist.get_rank()
    out_rows, in_rows = splits_for(dist.get_world_size(), seed, largest)
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = (torch.randn(97, width, generator=g) * 1000).to(dtype)
    rows = torch.randint(0, 97, (sum(in_rows),), generator=g)
    out_splits, in_splits = [n * width for n in out_rows], [n * width for n in in_rows]
    want = torch.empty(sum(out_splits), dtype=dtype)
    dist.all_to_all_single(want, x.index_select(0, rows).view(-1), out_splits, in_splits)
    got = torch.full_like(want, -7)
    transport(got, x, out_splits, in_splits, rows=rows)
    return bool(torch.equal(got, want))


def splits_for(world: int, seed: int, largest: int) -> tuple[list[int], list[int]]:
    """Each process's sizes to every other (some zero), the same on every process: this
    process's (out_splits, in_splits)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, largest + 1, (world, world), generator=g)  # [src, dst]
    sizes[torch.rand(world, world, generator=g) < 0.2] = 0
    rank = dist.get_rank()
    return sizes[:, rank].tolist(), sizes[rank].tolist()


def compute(rank: int, world: int) -> dict:
    from reformer.parallel import shm

    out = {"one_machine": shm.one_machine(None),
           "one_machine_unusable_somewhere": shm.one_machine(None, usable=rank != 1)}
    transport = shm.SharedMemoryAllToAll()
    equal, files, gens = [], [], []
    for seed in range(24):  # growing and shrinking messages, every dtype, empty parts
        largest = [3, 40, 1000, 70000, 10, 0][seed % 6]
        out_splits, in_splits = splits_for(world, seed, largest)
        same, left = exchange_both(transport, out_splits, in_splits, DTYPES[seed % 4], seed)
        equal.append(same)
        files.append(left)
        gens.append(transport.gen)
    out.update(equal=all(equal), files_left=max(files), generations=max(gens),
               calls=transport.calls, fallbacks=transport.fallbacks)
    out["gathered_equal"] = [  # rows of a 2-D tensor, gathered as they are sent
        gathered_both(transport, seed, DTYPES[seed % 4], width)
        for seed, width in zip(range(200, 208), (3, 64, 1, 5, 3, 64, 1, 5), strict=True)]
    transport.close()
    dist.barrier()
    out["files_after_close"] = leftover(transport.prefix)

    # a message over max_bytes on one process only: every process falls back to gloo
    small = shm.SharedMemoryAllToAll(max_bytes=4096)
    fell = []
    for seed, big in ((100, rank == world - 1), (101, False), (102, True), (103, False)):
        in_splits = [600 if big else 5] * world  # float32: 600 * world * 4 > 4096 bytes
        every = [torch.tensor(in_splits) for _ in range(world)]
        dist.all_gather(every, torch.tensor(in_splits))
        out_splits = [int(t[rank]) for t in every]
        before = small.fallbacks
        same, left = exchange_both(small, out_splits, in_splits, torch.float32, seed)
        fell.append({"fell_back": small.fallbacks > before, "equal": same, "files": left})
    out["fallback_gathered"] = gathered_both(small, 104, torch.float32, 64, largest=40)
    out["fallback_gathered_fell"] = small.fallbacks  # 2 above, and this one
    out["fallback"] = fell
    small.close()
    try:
        transport_err = shm.SharedMemoryAllToAll()
        transport_err(torch.empty(3), torch.empty(4), [1] * world, [1] * world)
    except ValueError as err:
        out["bad_splits"] = str(err)
    try:
        transport_err(torch.empty(4, dtype=torch.float64), torch.empty(4), [1] * world,
                      [1] * world)
    except ValueError as err:
        out["bad_dtype"] = str(err)
    try:  # rows of 3 cannot be split 2 + 2
        transport_err(torch.empty(2 * world), torch.empty(5, 3), [2] * world, [2] * world,
                      rows=torch.zeros(2, dtype=torch.int64))
    except ValueError as err:
        out["bad_rows"] = str(err)
    transport_err.close()
    out["one_machine_elsewhere"] = one_machine_with_unordered_stores(rank == 1)
    out["timed_out"] = wait_past_timeout(rank)
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return {"ranks": gathered, "peer_exited": wait_for_an_exited_process(rank)}


def one_machine_with_unordered_stores(here: bool) -> bool:
    """one_machine when this process (``here``) says its processor is an aarch64."""
    from reformer.parallel import shm

    machine = shm.platform.machine
    if here:
        shm.platform.machine = lambda: "aarch64"
    try:
        return shm.one_machine(None)
    finally:
        shm.platform.machine = machine


def wait_past_timeout(rank: int) -> str | None:
    """Rank 0 calls a transport with a half-second timeout that rank 1 never calls (it waits
    for rank 0's error, then closes its end): rank 0's error."""
    from reformer.parallel import shm

    flag = Path(sys.argv[3]).with_name("timed-out")
    transport = shm.SharedMemoryAllToAll(timeout=0.5)
    err = None
    if rank == 0:
        try:
            transport(torch.empty(dist.get_world_size()), torch.ones(dist.get_world_size()),
                      [1] * dist.get_world_size(), [1] * dist.get_world_size())
        except RuntimeError as e:
            err = str(e)
        flag.touch()
    else:
        while not flag.exists():
            time.sleep(0.01)
    transport.close()
    dist.barrier()
    return err


def wait_for_an_exited_process(rank: int) -> str | None:
    """Every process but rank 0 exits without calling; rank 0's call: its error."""
    from reformer.parallel import shm

    transport = shm.SharedMemoryAllToAll(timeout=60)  # (a wait that missed the exit fails)
    if rank:
        os._exit(0)
    world = dist.get_world_size()
    try:
        transport(torch.empty(world), torch.ones(world), [1] * world, [1] * world)
    except RuntimeError as e:
        return str(e)
    return None


if __name__ == "__main__":  # python shm_workers.py RANK WORLD STORE OUT
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.parallel.launch import worker_main

    worker_main(compute)
