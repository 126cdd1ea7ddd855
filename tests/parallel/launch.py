"""Start a worker script on several gloo processes and read what rank 0 wrote.

Each worker runs ``python WORKER RANK WORLD STORE OUT``: it joins the group through the
``file://`` STORE (no ports), and rank 0 writes its results as JSON to OUT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def run_workers(worker: Path, world: int, tmp: Path) -> dict:
    """Run ``worker`` on ``world`` processes; rank 0's JSON results (fails with every log)."""
    out, store = tmp / "results.json", tmp / "store"
    procs = [subprocess.Popen([sys.executable, str(worker), str(rank), str(world), str(store),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(world)]
    logs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return json.loads(out.read_text())


def worker_main(compute: Callable[[int, int], dict]) -> None:
    """A worker's entry point: join the group, ``compute(rank, world)`` on one thread, rank 0
    writes the result."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.getcwd())
    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = compute(rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps(results), encoding="utf-8")
    finally:
        dist.destroy_process_group()
