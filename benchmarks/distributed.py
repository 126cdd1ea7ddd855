"""Data parallelism on the CPU (issue 21): throughput of 2 processes against 1, how much of
DDP's all-reduce the reversible backward hides, and FSDP2's memory per process against DDP's.

    python benchmarks/distributed.py                       # all three parts, ~3.5 minutes
    python benchmarks/distributed.py --parts overlap --overlap-len 512
    python benchmarks/distributed.py --parts memory --memory-len 4096 --no-save

Every process is started by this script (gloo over a ``file://`` store) with the threads
stated and ``GOMP_SPINCOUNT=3000`` (what ``reformer train`` sets) unless OpenMP's settings
are in the environment. Parts:

- ``throughput``: the ``shakespeare`` preset's model (4 layers local/LSH, d_model 128) at
  16,384 tokens. ``2x1``: 2 processes x 1 thread, DDP (``reformer.parallel.wrap``), batch 1
  each (global batch 2). ``1x2``: 1 process x 2 threads, batch 2 in one step;
  ``1x2-accum``: batch 1, 2 accumulated micro-batches. A step is forward, backward and AdamW,
  timed from a barrier; its time is the slower process's; medians of ``--repeats`` steps
  after one warm-up step.
- ``overlap``: the same preset with 12 layers at ``--overlap-len`` tokens, 2 x 1 thread, DDP.
  T_sync = backward under DDP, T_nosync = backward inside ``no_sync()`` (both from a barrier
  after the forward; the slower process's time), T_comm = ``dist.all_reduce`` of flat
  buffers of the sizes of DDP's buckets (read by a comm hook on a copy of the model), one
  after another, alone, from a barrier. The three are measured in turn, ``--overlap-repeats``
  times, so that they see the same conditions. hidden = (T_nosync + T_comm - T_sync) /
  T_comm from the medians, and "paired" from the median of T_sync - T_nosync over
  neighbouring steps. Once with DDP's default buckets (25 MiB, the first 1 MiB) and once
  with ``wrap``'s DDP, whose buckets hold one reversible block's parameters.
- ``memory``: a model whose weights and AdamW state dominate (the preset with d_model 1024,
  d_ff 4096, 8 heads, 12 layers: 146M parameters) at ``--memory-len`` tokens, 2 x 1 thread:
  one step (forward, backward, AdamW) under ``wrap(model, "ddp")`` and ``wrap(model,
  "fsdp")``. Per process: peak resident memory (``ru_maxrss``), and that minus the resident
  memory just before the model is built (imports and process group: the runtime's share).

Results are appended to ``benchmarks/results/distributed.jsonl``, one JSON line per
configuration (per-step times, per-process memory), with the CPU model, torch version,
threads, OpenMP settings, commit and date; a summary goes to stdout. docs/distributed.md holds
the recorded run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from results_io import cpu_model
from run_all import git_commit

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "distributed.jsonl"
SPIN_COUNT = "3000"  # what `reformer train` sets (reformer.cli._brief_spin_wait)
MEMORY_MODEL = dict(d_model=1024, d_ff=4096, n_heads=8, n_layers=12)
RUN = time.strftime("%Y-%m-%dT%H:%M:%S")  # one id for every row of this invocation


def rss_bytes() -> int:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------------------- workers
def build(seq_len: int, **overrides):
    """The ``shakespeare`` preset's model at ``seq_len`` with ``overrides``, seeded."""
    from reformer import ReformerLM
    from reformer.presets import get_preset, with_seq_len

    config = with_seq_len(get_preset("shakespeare").model, seq_len)
    if overrides:
        config = config.replace(**overrides)
    torch.manual_seed(0)
    return ReformerLM(config).train()


def describe(model) -> dict:
    c = model.config
    return dict(n_layers=c.n_layers, d_model=c.d_model, d_ff=c.d_ff, n_heads=c.n_heads,
                attn_layers=list(c.attn_layers), n_params=sum(p.numel() for p in
                                                                model.parameters()))


def tokens(model, batch: int, seq_len: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rank)  # each process its own batch
    return torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def throughput_worker(spec: dict, rank: int, world: int) -> dict:
    """Step times (forward, backward over ``accum`` micro-batches, AdamW) from a barrier."""
    from reformer.parallel import gradient_sync, wrap

    model = build(spec["seq_len"])
    wrapped = wrap(model, "ddp", torch.device("cpu")) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = tokens(model, spec["batch"], spec["seq_len"], rank)
    times = []
    for _ in range(spec["warmup"] + spec["steps"]):
        barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for i in range(spec["accum"]):
            with gradient_sync(wrapped, i == spec["accum"] - 1):
                loss = wrapped(ids, labels=ids, return_logits=False).loss
                (loss / spec["accum"]).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return dict(model=describe(model), warmup_s=times[:spec["warmup"]],
                steps_s=times[spec["warmup"]:])


def ddp_bucket_numels(make_ddp, seq_len: int, n_layers: int) -> list[int]:
    """The sizes in elements of the buckets that ``make_ddp(model)`` all-reduces, read by a
    comm hook on a copy of the model (a hook cannot be removed, so not on the measured one)
    over two short steps: DDP rebuilds its buckets in gradient-ready order after the first."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    model = build(seq_len, n_layers=n_layers)
    ddp, seen = make_ddp(model), []

    def hook(state, bucket):
        seen.append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    ids = torch.zeros(1, 2 * model.config.chunk_length, dtype=torch.long)
    for _ in range(2):
        seen.clear()
        ddp(ids, labels=ids, return_logits=False).loss.backward()
    return seen


def timeline_overlap(make_ddp, spec: dict, rank: int) -> list[float]:
    """Per backward: the share of the buckets' all-reduce time (launch to completion, read by a
    comm hook) that falls before the backward's compute ends (the embeddings' gradient, the
    last one, is accumulated). Another copy of the model, as in :func:`ddp_bucket_numels`."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    model = build(spec["seq_len"], n_layers=spec["n_layers"])
    ddp, spans, end = make_ddp(model), [], [0.0]

    def hook(state, bucket):
        span = [time.perf_counter(), 0.0]
        spans.append(span)

        def done(fut):
            span[1] = time.perf_counter()
            return fut.value()[0]

        return allreduce_hook(state, bucket).then(done)

    ddp.register_comm_hook(None, hook)
    model.embed.weight.register_post_accumulate_grad_hook(
        lambda p: end.__setitem__(0, time.perf_counter()))
    ids = tokens(model, 1, spec["seq_len"], rank)
    shares = []
    for i in range(2 + spec["repeats"] // 3):  # DDP rebuilds its buckets after the first
        model.zero_grad(set_to_none=True)
        spans.clear()
        loss = ddp(ids, labels=ids, return_logits=False).loss
        barrier()
        loss.backward()
        total = sum(b - a for a, b in spans)
        hidden = sum(max(0.0, min(b, end[0]) - a) for a, b in spans)
        if i >= 2:
            shares.append(hidden / total)
    return shares


def overlap_worker(spec: dict, rank: int, world: int) -> dict:
    """Per repeat: backward time with and without DDP's all-reduce, and the all-reduce alone."""
    from torch.nn.parallel import DistributedDataParallel

    from reformer.parallel import gradient_sync, wrap

    model = build(spec["seq_len"], n_layers=spec["n_layers"])
    cap = spec["bucket_cap_mb"]  # None: wrap's DDP (one block's buckets); 25: DDP's default

    def make_ddp(m):
        return wrap(m, "ddp", torch.device("cpu")) if cap is None \
            else DistributedDataParallel(m, bucket_cap_mb=cap)

    sizes = ddp_bucket_numels(make_ddp, spec["seq_len"], spec["n_layers"])
    timeline = timeline_overlap(make_ddp, spec, rank)
    ddp = make_ddp(model)
    ids = tokens(model, 1, spec["seq_len"], rank)
    buckets = [torch.ones(n) for n in sizes]  # DDP's, in the order it all-reduces them

    def backward_s(sync: bool) -> float:
        model.zero_grad(set_to_none=True)
        with gradient_sync(ddp, sync):
            loss = ddp(ids, labels=ids, return_logits=False).loss
            barrier()
            t0 = time.perf_counter()
            loss.backward()  # under DDP it returns once every bucket is all-reduced
            return time.perf_counter() - t0

    def comm_s() -> float:
        barrier()
        t0 = time.perf_counter()
        for b in buckets:
            dist.all_reduce(b)
        return time.perf_counter() - t0

    for sync in (True, True, False):  # DDP rebuilds its buckets after the first step
        backward_s(sync)
    comm_s()
    out: dict[str, list[float]] = {"sync_s": [], "nosync_s": [], "comm_s": []}
    for _ in range(spec["repeats"]):
        out["sync_s"].append(backward_s(True))
        out["nosync_s"].append(backward_s(False))
        out["comm_s"].append(comm_s())
    return dict(model=describe(model), bucket_cap_mb=cap,
                buckets_mib=[round(b.numel() * 4 / 2**20, 3) for b in buckets],
                timeline_hidden=timeline, **out)


def memory_worker(spec: dict, rank: int, world: int) -> dict:
    """One step under ``spec["how"]``; resident memory before, after building, and at peak."""
    from reformer.parallel import wrap

    gc.collect()
    base, base_peak = rss_bytes(), peak_rss_bytes()
    model = build(spec["seq_len"], **MEMORY_MODEL)
    info = describe(model)
    wrapped = wrap(model, spec["how"], torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = tokens(model, 1, spec["seq_len"], rank)
    built_peak = peak_rss_bytes()
    barrier()
    t0 = time.perf_counter()
    wrapped(ids, labels=ids, return_logits=False).loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                for p in model.parameters())
    return dict(model=info, local_params=local, base_rss=base, base_peak=base_peak,
                built_peak=built_peak, peak_rss=peak_rss_bytes(), end_rss=rss_bytes(),
                step_s=seconds)


WORKERS = {"throughput": throughput_worker, "overlap": overlap_worker,
           "memory": memory_worker}


def worker_main(args: argparse.Namespace) -> None:
    spec = json.loads(args.spec)
    torch.set_num_threads(spec["threads"])
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank,
                                world_size=args.world)
    try:
        result = WORKERS[args.worker](spec, args.rank, args.world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver
def omp_settings() -> dict[str, str]:
    """The OpenMP settings the workers get (besides their thread count)."""
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    return env or {"GOMP_SPINCOUNT": SPIN_COUNT}


def launch(part: str, spec: dict, world: int) -> list[dict]:
    """Run ``part`` in ``world`` fresh processes of ``spec["threads"]`` threads each; their
    results in rank order."""
    env = {**os.environ, **omp_settings(), "OMP_NUM_THREADS": str(spec["threads"])}
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", part, "--rank",
                                   str(rank), "--world", str(world), "--store", f"{tmp}/store",
                                   "--spec", json.dumps(spec), "--out", f"{tmp}/{rank}.json"],
                                  env=env) for rank in range(world)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"{part} {spec}: worker exit codes {codes}")
        return [json.loads(Path(f"{tmp}/{rank}.json").read_text()) for rank in range(world)]


def slowest(results: list[dict], key: str) -> list[float]:
    """Per step, the slowest process's time."""
    return [max(times) for times in zip(*(r[key] for r in results), strict=True)]


def record(part: str, name: str, processes: int, threads: int, **fields) -> dict:
    return dict(part=part, config=name, processes=processes, threads=threads, **fields,
                cpu=cpu_model(), cpus=os.cpu_count(), torch=torch.__version__,
                env=omp_settings(), commit=git_commit(),
                date=time.strftime("%Y-%m-%d %H:%M"), run=RUN)


def throughput_part(args: argparse.Namespace) -> list[dict]:
    L, rows = args.throughput_len, []
    for name, world, threads, batch, accum in (("1x2", 1, 2, 2, 1), ("2x1", 2, 1, 1, 1),
                                               ("1x2-accum", 1, 2, 1, 2)):
        spec = dict(seq_len=L, batch=batch, accum=accum, threads=threads, warmup=1,
                    steps=args.repeats)
        results = launch("throughput", spec, world)
        steps = slowest(results, "steps_s")
        global_tokens = world * batch * accum * L
        rows.append(record("throughput", name, world, threads, seq_len=L, batch=batch,
                           grad_accum=accum, global_tokens=global_tokens, steps_s=steps,
                           step_s=statistics.median(steps),
                           tokens_per_s=global_tokens / statistics.median(steps),
                           model=results[0]["model"]))
    two = rows[1]["tokens_per_s"]
    for row in rows:
        row["ratio_2x1"] = two / row["tokens_per_s"]  # 2x1's tokens/s over this one's
    return rows


def overlap_part(args: argparse.Namespace) -> list[dict]:
    rows = []
    for cap in (25.0, None):
        spec = dict(seq_len=args.overlap_len, n_layers=12, bucket_cap_mb=cap, threads=1,
                    repeats=args.overlap_repeats)
        results = launch("overlap", spec, 2)
        t = {k: slowest(results, k) for k in ("sync_s", "nosync_s", "comm_s")}
        sync, nosync, comm = (statistics.median(t[k]) for k in ("sync_s", "nosync_s", "comm_s"))
        # the same from the differences of neighbouring steps, which drifts do not bias
        exposed = statistics.median(a - b for a, b in zip(t["sync_s"], t["nosync_s"],
                                                          strict=True))
        rows.append(record("overlap", "ddp-25mb" if cap else "wrap-block", 2, 1,
                           seq_len=args.overlap_len, bucket_cap_mb=results[0]["bucket_cap_mb"],
                           buckets_mib=results[0]["buckets_mib"], **t, sync_med_s=sync,
                           nosync_med_s=nosync, comm_med_s=comm,
                           hidden=(nosync + comm - sync) / comm, exposed_paired_s=exposed,
                           hidden_paired=1 - exposed / comm,
                           timeline_hidden=statistics.median(
                               x for r in results for x in r["timeline_hidden"]),
                           model=results[0]["model"]))
    return rows


def memory_part(args: argparse.Namespace) -> list[dict]:
    rows = []
    for how in ("ddp", "fsdp"):
        results = launch("memory", dict(how=how, seq_len=args.memory_len, threads=1), 2)
        n = results[0]["model"]["n_params"]
        state = n * 4 * 4  # params, gradients, 2 AdamW moments in fp32
        rows.append(record("memory", how, 2, 1, seq_len=args.memory_len,
                           model=results[0]["model"], per_rank=results,
                           expected_state_bytes=state if how == "ddp" else state // 2,
                           peak_rss=max(r["peak_rss"] for r in results),
                           peak_above_base=max(r["peak_rss"] - r["base_rss"] for r in results)))
    for row in rows:
        for key in ("peak_rss", "peak_above_base"):
            row[f"{key}_vs_ddp"] = row[key] / rows[0][key]
    return rows


def summary(rows: list[dict]) -> None:
    gib = 2**30
    for r in rows:
        if r["part"] == "throughput":
            print(f"throughput {r['config']:10s} batch {r['batch']} x accum {r['grad_accum']}: "
                  f"{r['tokens_per_s']:,.0f} tok/s (step {r['step_s']:.2f} s); "
                  f"2x1 / this = {r['ratio_2x1']:.2f}")
        elif r["part"] == "overlap":
            print(f"overlap {r['config']:10s} buckets {r['buckets_mib']} MiB: T_sync "
                  f"{r['sync_med_s']:.3f} s, T_nosync {r['nosync_med_s']:.3f} s, T_comm "
                  f"{r['comm_med_s']:.3f} s; hidden {r['hidden']:.0%} (paired "
                  f"{r['hidden_paired']:.0%}); in time, {r['timeline_hidden']:.0%} of the "
                  "all-reduces run before the backward's compute ends")
        else:
            print(f"memory {r['config']:5s}: peak {r['peak_rss'] / gib:.2f} GiB "
                  f"({r['peak_rss_vs_ddp']:.2f}x DDP), above base "
                  f"{r['peak_above_base'] / gib:.2f} GiB ({r['peak_above_base_vs_ddp']:.2f}x); "
                  f"params+grads+moments {r['expected_state_bytes'] / gib:.2f} GiB; step "
                  f"{max(x['step_s'] for x in r['per_rank']):.1f} s")


PARTS = {"throughput": throughput_part, "overlap": overlap_part, "memory": memory_part}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per throughput "
                    "configuration")
    ap.add_argument("--overlap-repeats", type=int, default=31, help="timed backward pairs")
    ap.add_argument("--throughput-len", type=int, default=16384)
    ap.add_argument("--overlap-len", type=int, default=1024)
    ap.add_argument("--memory-len", type=int, default=2048)
    ap.add_argument("--no-save", action="store_true")
    for name in ("--worker", "--rank", "--world", "--store", "--spec", "--out"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.rank, args.world = int(args.rank), int(args.world)
        worker_main(args)
        return
    for part in args.parts:
        rows = PARTS[part](args)
        if not args.no_save:
            RESULTS.parent.mkdir(exist_ok=True)
            with RESULTS.open("a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        summary(rows)


if __name__ == "__main__":
    main()
