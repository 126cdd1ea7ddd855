"""Time one training step of one system at one length, in this (fresh) process.

    python benchmarks/train_step.py --system ours --length 4096 [--layers 6 --hashes 4]
    python benchmarks/train_step.py --mode matmul
    python benchmarks/train_step.py --system ours --length 65536 --device cuda
    python benchmarks/train_step.py --mode launches --length 16384 --device cuda

A step is forward + backward + AdamW step at batch 1 on random bytes (seed 0, so every
system sees the same tokens). One warm-up step, then ``--steps`` timed steps (fewer when they
would not fit in ``--budget-seconds``); the median is the result. Peak memory is this process's
peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux), so each point
must run in a fresh process: run_all.py starts one per point.

Prints JSON lines on stdout: ``{"event": "step", ...}`` as each step ends (the driver's
watchdog), then one ``{"event": "result", ...}``. ``--mode matmul`` measures the machine's
fp32 and bf16 torch.mm rate instead. ``--mode launches`` counts what one layer of ours issues
in a training step (forward + recomputing backward; a 2-layer model's count less a 1-layer
model's): kernel launches on a GPU (the profiler's ``cudaLaunchKernel`` calls, after a
warm-up step that compiles the FlexAttention kernels), and on the CPU the operators of the
cuda plan run there (``reformer.plan.count_kernel_ops``: an upper bound, since the CPU runs
the banded attention with tensor operators where a GPU runs one kernel).

``--device cuda`` runs the same step on a GPU: the timers wait for the device
(``torch.cuda.synchronize``) and the record adds the GPU's peak allocated memory
(``peak_device_gib``, ``torch.cuda.max_memory_allocated``), which is the number that matters
there; ``peak_rss_gib`` stays the host process's.

Decisions:
- A step slower than ``--max-seconds`` ends the point with status ``too_slow`` (the issue's
  stopping rule); the driver also kills a step that runs past it.
- bf16 is ``torch.autocast(device, torch.bfloat16)`` around the forward; weights, gradients
  and AdamW state stay fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
from systems import SYSTEMS, Shape, build, split_system

KIB_PER_GIB = 2**20
# CPU flags that give fast bf16 matmuls; without them bf16 is emulated (slower than fp32).
BF16_FEATURES = {"avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_GIB


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def library_version(system: str) -> str:
    """The version of the package that implements ``system`` (base name)."""
    from importlib.metadata import PackageNotFoundError, version

    package = {"ours": "reformer", "hf": "transformers", "lucidrains": "reformer-pytorch"}
    try:
        return version(package.get(system, "torch"))
    except PackageNotFoundError:  # ours, run from a source tree (PYTHONPATH=src)
        if system == "ours":
            import reformer

            return reformer.__version__
        return "unknown"


def device_memory(device: torch.device) -> dict:
    """The GPU's peak allocated and reserved memory so far, GiB ({} on the CPU)."""
    if device.type != "cuda":
        return {}
    return {"peak_device_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def wait(device: torch.device) -> float:
    """perf_counter() once the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_steps(args: argparse.Namespace) -> dict:
    """Build the system, run warm-up and timed steps, return the result record."""
    base, bf16 = split_system(args.system)
    device = torch.device(args.device)
    shape = Shape(seq_len=args.length, n_layers=args.layers, n_hashes=args.hashes)
    torch.manual_seed(args.seed)
    model, loss_fn = build(base, shape)
    model.to(device).train()
    optimizer = None if args.no_optimizer else torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, shape.vocab_size, (1, shape.seq_len)).to(device)
    rss_built = peak_rss_gib()

    def step() -> tuple[float, float, float, float]:
        c0, t0 = time.process_time(), wait(device)
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
               else contextlib.nullcontext())
        with ctx:
            loss = loss_fn(ids)
        t1 = wait(device)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        t2 = wait(device)
        # The share of its threads' CPUs the process got: low when the machine was busy.
        share = (time.process_time() - c0) / ((t2 - t0) * torch.get_num_threads())
        return t1 - t0, t2 - t1, float(loss.detach()), share

    record = {
        "event": "result", "mode": "step", "system": args.system, "base": base, "bf16": bf16,
        "length": shape.seq_len, "n_layers": shape.n_layers, "n_hashes": shape.n_hashes,
        "shape": shape.__dict__, "optimizer": optimizer is not None,
        "n_params": sum(p.numel() for p in model.parameters()),
        "version": library_version(base), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "rss_built_gib": rss_built,
        "device": device.type, **gpu_name(device),
    }
    fwd, bwd, total, losses, shares = [], [], [], [], []
    n_timed = args.steps
    for i in range(args.warmup + args.steps):
        if i >= args.warmup + n_timed:
            break
        try:
            f, b, loss, share = step()
        except torch.OutOfMemoryError:  # the GPU's memory (the host's ends in the watchdog)
            record.update(status="oom", losses=losses, peak_rss_gib=peak_rss_gib(),
                          **device_memory(device))
            return record
        losses.append(loss)
        emit({"event": "step", "index": i, "seconds": f + b, "loss": loss})
        if f + b > args.max_seconds:
            record.update(status="too_slow", step_seconds=f + b, losses=losses,
                          peak_rss_gib=peak_rss_gib(), **device_memory(device))
            return record
        if i < args.warmup:
            record["warmup_seconds"] = f + b
            # Fewer timed steps when they would not fit in the budget (at least one).
            n_timed = max(1, min(args.steps, int(args.budget_seconds // max(f + b, 1e-9)) - 1))
            continue
        fwd.append(f)
        bwd.append(b)
        shares.append(share)
        total.append(f + b)
    record.update(
        status="ok", steps=total, step_seconds=statistics.median(total),
        fwd_seconds=statistics.median(fwd), bwd_seconds=statistics.median(bwd),
        load_avg=os.getloadavg(),
        losses=losses, final_loss=losses[-1], peak_rss_gib=peak_rss_gib(),
        **device_memory(device))
    if device.type == "cpu":  # a GPU step's host threads mostly wait: no busy-machine signal
        record["cpu_share"] = statistics.median(shares)
    return record


def run_launches(args: argparse.Namespace) -> dict:
    """Kernel launches (CUDA) or cuda-plan operators (CPU) per layer of one training step."""
    from reformer.attention._banded import flex_available
    from reformer.plan import count_cuda_launches, count_kernel_ops, forced

    device = torch.device(args.device)
    counts, t0 = [], time.perf_counter()
    for layers in (1, 2):
        shape = Shape(seq_len=args.length, n_layers=layers, n_hashes=args.hashes)
        torch.manual_seed(args.seed)
        model, loss_fn = build("ours", shape)
        model.to(device).train()
        ids = torch.randint(0, shape.vocab_size, (1, shape.seq_len)).to(device)

        def step(loss_fn=loss_fn, ids=ids) -> None:
            loss_fn(ids).backward()
            wait(device)

        if device.type == "cuda":
            counts.append(count_cuda_launches(step))
        else:
            with forced("cuda"):
                counts.append(sum(count_kernel_ops(step).values()))
    return {"event": "result", "mode": "launches", "status": "ok", "system": "ours",
            "length": args.length, "n_hashes": args.hashes, "device": device.type,
            "counted": "kernel launches" if device.type == "cuda" else "cuda-plan operators",
            "flex": flex_available(device), "one_layer_step": counts[0],
            "two_layer_step": counts[1], "per_layer": counts[1] - counts[0],
            "seconds": time.perf_counter() - t0, "torch": torch.__version__,
            "peak_rss_gib": peak_rss_gib(), **gpu_name(device)}


def gpu_name(device: torch.device) -> dict:
    return {"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}


def matmul_rate(size: int, dtype: torch.dtype, repeats: int, device: torch.device) -> float:
    """Median GFLOP/s of a (size x size) @ (size x size) torch.mm in ``dtype``."""
    a = torch.randn(size, size).to(device, dtype)
    b = torch.randn(size, size).to(device, dtype)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = wait(device)
        torch.mm(a, b)
        times.append(wait(device) - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def machine() -> dict:
    """CPU model, logical CPUs, RAM and the CPU's bf16 matmul features (Linux)."""
    info = {"cpu": platform.processor() or "unknown", "cpus": os.cpu_count(), "ram_gib": 0.0,
            "bf16_features": []}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu"] = value.strip()
            elif key.strip() == "flags":
                info["bf16_features"] = sorted(set(value.split()) & BF16_FEATURES)
                break
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kib = next((int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:")), 0)
        info["ram_gib"] = kib / KIB_PER_GIB
    return info


def run_matmul(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)

    def rate(dtype: torch.dtype) -> float:
        return matmul_rate(args.matmul_size, dtype, args.matmul_repeats, device)

    return {
        "machine": {**machine(), **gpu_name(device)}, "device": device.type,
        "event": "result", "mode": "matmul", "status": "ok", "size": args.matmul_size,
        "fp32_gflops": rate(torch.float32), "bf16_gflops": rate(torch.bfloat16),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "peak_rss_gib": peak_rss_gib(), "python": platform.python_version(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("step", "matmul", "launches"), default="step")
    p.add_argument("--system", default="ours",
                   help=f"one of {SYSTEMS}, optionally with a -bf16 suffix")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hashes", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="a step slower than this ends the point as too_slow")
    p.add_argument("--budget-seconds", type=float, default=900.0,
                   help="time the timed steps may take; fewer steps (>= 1) when exceeded")
    p.add_argument("--no-optimizer", action="store_true", help="forward + backward only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--matmul-size", type=int, default=4096)
    p.add_argument("--matmul-repeats", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.mode == "step":
            split_system(args.system)
        runs = {"matmul": run_matmul, "launches": run_launches, "step": run_steps}
        record = runs[args.mode](args)
    except ValueError as err:
        print(f"train_step: {err}", file=sys.stderr)
        return 2
    emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
