"""Sequence parallelism on the CPU (issue 22): memory per process, weak scaling, and the
traffic and time of the all_to_all head exchanges of ``SequenceParallelLM``.

    python benchmarks/sequence.py                            # 1M on 1 and 2, 2M on 2 (~25 min)
    python benchmarks/sequence.py --configs 1x16K,2x16K,2x32K --no-save     # a minute

A configuration ``PxL`` is one training step of L tokens on P processes: forward, backward
and, on P > 1, ``sync_gradients`` (no optimizer step), batch 1, fp32, on random bytes drawn
with seed 0, each process 1 thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``,
``GOMP_SPINCOUNT=3000`` as ``reformer train`` sets). The model is the ``million`` sweep's
``ours`` (benchmarks/systems.py: d_model 256, 4 heads x 64, d_ff 1024, all-LSH, 4 hash
rounds, chunk 64, max_seq_len = L) with ``--layers`` (3) layers. P = 1 runs the plain
``ReformerLM``; P > 1 wraps it in ``SequenceParallelLM`` over gloo (``file://`` store), every
process given the whole ids, its exchanged rows moving as ``--transport`` says (shared memory
by default: reformer.parallel.shm; before that option, gloo's all_to_all). Each configuration
runs in fresh processes, one configuration at a time, one step (no warm-up, no median: a step
at 1M takes minutes).

Recorded per process: the resident memory before the model is built (imports and process
group) and the peak (``ru_maxrss``) after the step; forward / backward / sync times from a
barrier; and every exchange of rows (reformer.parallel.exchange's ``_all_to_all``, wrapped
in the worker; before the transport option, every ``dist.all_to_all_single`` call, which
also counted the split's small exchanges of counts): bytes it sends (all, and those that
leave the process), wall time inside it (transfer and waiting for the other process), tagged
forward, backward-recompute (the reversible backward replays the exchanges) or backward-grad.
After the step, the same all_to_all of one call's size alone from a barrier, through the same
transport (median of 5), gives the transfer rate. The step's time is the slowest process's.
A watchdog kills a configuration whose processes pass
``--max-gib`` together or run past ``--timeout``, and the rest when one fails.

One JSON line per configuration goes to ``benchmarks/results/sequence.jsonl`` with the CPU
model, torch version, OpenMP settings, commit, date and a run id; report.py renders the newest
run into docs/benchmarks.md with the verdicts and an on-paper estimate for GPUs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from distributed import omp_settings, peak_rss_bytes, rss_bytes
from results_io import cpu_model
from run_all import git_commit, parse_length, rss_gib
from systems import Shape, build

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sequence.jsonl"
RUN = time.strftime("%Y-%m-%dT%H:%M:%S")  # one id for every row of this invocation


# ---------------------------------------------------------------------------- workers
class AllToAllMeter:
    """Stands in for reformer.parallel.exchange's ``_all_to_all``, through which every
    exchange of rows goes (gloo's all_to_all or the shared-memory transport), and records,
    per call, (tag, bytes sent, bytes sent to other processes, seconds inside)."""

    def __init__(self, module, rank: int, world: int) -> None:
        self.module, self.rank, self.world = module, rank, world
        self.original = module._all_to_all
        self.calls: list[tuple[str, int, int, float]] = []
        self.phase = "forward"
        module._all_to_all = self

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None,
                 *args, **kwargs):
        t0 = time.perf_counter()
        work = self.original(output, input, output_split_sizes, input_split_sizes, *args,
                             **kwargs)
        seconds = time.perf_counter() - t0
        splits = input_split_sizes or [input.numel() // self.world] * self.world
        size = input.element_size()  # (the message: sum(splits), gathered from input or not)
        # reformer.parallel.exchange._exchange names its traffic: in the backward, values
        # (inputs and outputs) are the recomputation, gradients (of the inputs and outputs)
        # the backward's own
        what = sys._getframe(1).f_locals.get("what")
        tag = self.phase if self.phase == "forward" else \
            "backward-recompute" if what == "values" else "backward-grad"
        self.calls.append((tag, sum(splits) * size, (sum(splits) - splits[self.rank]) * size,
                           seconds))
        return work

    def remove(self) -> None:
        self.module._all_to_all = self.original

    def summary(self) -> dict:
        tags: dict[str, dict] = {}
        for tag, sent, out, seconds in self.calls:
            t = tags.setdefault(tag, {"calls": 0, "bytes": 0, "bytes_out": 0, "seconds": 0.0})
            t["calls"] += 1
            t["bytes"] += sent
            t["bytes_out"] += out
            t["seconds"] += seconds
        return tags


def alone_all_to_all(nbytes: int, world: int, transport, repeats: int = 5) -> list[float]:
    """Seconds of one all_to_all of ``nbytes`` (fp32, even splits) from a barrier, each time,
    through ``transport`` (shared memory) or gloo (None). ``nbytes`` is the largest over the
    processes (split by sorted slots, calls differ)."""
    size = torch.tensor([nbytes // (4 * world)])
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    x = torch.ones(int(size) * world)
    out = torch.empty_like(x)
    splits = [int(size)] * world
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if transport is None:
            dist.all_to_all_single(out, x)
        else:
            transport(out, x, splits, splits)
        times.append(time.perf_counter() - t0)
    return times


def worker(spec: dict, rank: int, world: int) -> dict:
    """One training step of ``spec`` on this process; its times, memory and traffic."""
    import reformer.parallel.exchange as exchange
    import reformer.parallel.sequence as sequence
    from reformer import _native

    gc.collect()
    base_rss, base_peak = rss_bytes(), peak_rss_bytes()
    shape = Shape(seq_len=spec["seq_len"], n_layers=spec["n_layers"],
                  n_hashes=spec["n_hashes"])
    torch.manual_seed(0)  # as train_step.py: the million sweep's weights and tokens
    model, _ = build("ours", shape)
    model.train()
    ids = torch.randint(0, shape.vocab_size, (1, shape.seq_len))
    lm = (sequence.SequenceParallelLM(model, lsh_split=spec["lsh_split"],
                                      transport=spec["transport"]) if world > 1 else model)
    meter = AllToAllMeter(exchange, rank, world) if world > 1 else None
    built_peak = peak_rss_bytes()

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    barrier()
    t0 = time.perf_counter()
    loss = lm(ids, labels=ids, return_logits=False).loss
    t1 = time.perf_counter()
    if meter is not None:
        meter.phase = "backward"
    loss.backward()
    t2 = time.perf_counter()
    if world > 1:
        lm.sync_gradients()
    t3 = time.perf_counter()
    peak = peak_rss_bytes()  # before the exchange measured alone below
    out = dict(rank=rank, base_rss=base_rss, base_peak=base_peak, built_peak=built_peak,
               peak_rss=peak, end_rss=rss_bytes(), loss=float(loss.detach()),
               forward_s=t1 - t0, backward_s=t2 - t1, sync_s=t3 - t2, step_s=t3 - t0,
               threads=torch.get_num_threads(), native=_native.available(),
               n_params=sum(p.numel() for p in model.parameters()))
    if meter is not None:
        meter.remove()
        largest = max(c[1] for c in meter.calls)
        out.update(all_to_all=meter.summary(), call_bytes=largest,
                   call_bytes_out=max(c[2] for c in meter.calls),
                   sync_bytes=4 * sum(p.numel() for p in model.parameters()
                                      if p.grad is not None),
                   alone_s=alone_all_to_all(largest, world, lm.shared),
                   transport=lm.transport)
    return out


def worker_main(args: argparse.Namespace) -> None:
    spec = json.loads(args.spec)
    torch.set_num_threads(1)
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank,
                                world_size=args.world,
                                timeout=dt.timedelta(seconds=spec["timeout"]))
    try:
        result = worker(spec, args.rank, args.world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver
def watch(procs: list[subprocess.Popen], timeout: float, max_gib: float) -> tuple[str, float]:
    """Wait for the processes; ('ok' | 'error' | 'timeout' | 'oom', their largest resident
    memory seen together, GiB). Kills them all on anything but 'ok'."""
    start, most = time.monotonic(), 0.0
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                return "ok", most
            most = max(most, sum(rss_gib(p.pid) for p in procs if p.poll() is None))
            if any(c not in (None, 0) for c in codes):
                return ("oom" if -9 in codes else "error"), most
            if most > max_gib:
                return "oom", most
            if time.monotonic() - start > timeout:
                return "timeout", most
            time.sleep(1.0)
    finally:  # also on Ctrl-C or SIGTERM: never leave a worker running
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def launch(spec: dict, world: int, max_gib: float) -> tuple[str, float, list[dict], str]:
    """Run ``spec`` on ``world`` fresh processes: (status, GiB seen, results, stderr tail)."""
    env = {**os.environ, **omp_settings(), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            with open(f"{tmp}/{rank}.err", "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--worker", "--rank", str(rank), "--world",
                     str(world), "--store", f"{tmp}/store", "--spec", json.dumps(spec),
                     "--out", f"{tmp}/{rank}.json"], env=env, stderr=err))
        status, seen = watch(procs, spec["timeout"], max_gib)
        results = [json.loads(Path(f"{tmp}/{r}.json").read_text()) for r in range(world)
                   if Path(f"{tmp}/{r}.json").exists()]
        errors = "".join(Path(f"{tmp}/{r}.err").read_text() for r in range(world))
    return status, seen, results, errors[-3000:]


def run_config(name: str, args: argparse.Namespace) -> dict:
    world, length = name.split("x")
    world, length = int(world), parse_length(length)
    spec = dict(seq_len=length, n_layers=args.layers, n_hashes=args.hashes,
                timeout=args.timeout, lsh_split=args.lsh_split, transport=args.transport)
    status, seen, ranks, errors = launch(spec, world, args.max_gib)
    row = dict(config=name, processes=world, threads=1, seq_len=length, status=status,
               n_layers=args.layers, n_hashes=args.hashes, optimizer=False,
               lsh_split=args.lsh_split if world > 1 else None,
               transport=None,
               watched_peak_gib=seen, max_gib=args.max_gib, timeout_s=args.timeout,
               per_rank=ranks,
               cpu=cpu_model(), cpus=os.cpu_count(), torch=torch.__version__,
               env={**omp_settings(), "OMP_NUM_THREADS": "1"}, commit=git_commit(),
               date=time.strftime("%Y-%m-%d %H:%M"), run=RUN)
    if status != "ok" or len(ranks) != world:
        row.update(status=status if status != "ok" else "error", stderr_tail=errors)
        return row
    row.update(step_s=max(r["step_s"] for r in ranks), loss=ranks[0]["loss"],
               peak_rss=max(r["peak_rss"] for r in ranks),
               base_rss=max(r["base_rss"] for r in ranks))
    if world > 1:
        row["transport"] = ranks[0]["transport"]
        tags = ranks[0]["all_to_all"]
        row.update(
            a2a_calls=sum(t["calls"] for t in tags.values()),
            a2a_bytes=sum(t["bytes"] for t in tags.values()),
            a2a_bytes_out=sum(t["bytes_out"] for t in tags.values()),
            a2a_share=max(sum(t["seconds"] for t in r["all_to_all"].values()) / r["step_s"]
                          for r in ranks),
            alone_s=statistics.median(max(ts) for ts in zip(*(r["alone_s"] for r in ranks),
                                                             strict=True)),
            call_bytes=ranks[0]["call_bytes"], call_bytes_out=ranks[0]["call_bytes_out"],
            sync_bytes=ranks[0]["sync_bytes"], sync_s=max(r["sync_s"] for r in ranks))
    return row


def summary(r: dict) -> str:
    gib = 2**30
    if r["status"] != "ok":
        return f"{r['config']}: {r['status'].upper()} ({r['watched_peak_gib']:.2f} GiB seen)"
    text = (f"{r['config']}: step {r['step_s']:.1f} s, peak {r['peak_rss'] / gib:.2f} GiB per "
            f"process (base {r['base_rss'] / gib:.2f}), loss {r['loss']:.4f}")
    if r["processes"] > 1:
        per_layer = r["a2a_bytes"] / r["n_layers"] / gib
        text += (f"; all_to_all {r['a2a_calls']} calls, {per_layer:.2f} GiB sent per layer "
                 f"per process, {r['a2a_share']:.1%} of the step; one call alone "
                 f"{r['alone_s']:.3f} s; sync_gradients {r['sync_bytes'] / 2**20:.1f} MiB in "
                 f"{r['sync_s']:.2f} s")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="1x1M,2x1M,2x2M",
                    help="PxL, comma-separated: P processes, L tokens (run in this order)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hashes", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds a configuration may run before it is killed")
    ap.add_argument("--max-gib", type=float, default=22.5,  # 2x2M peaks at ~20.4 together
                    help="kill a configuration whose processes hold more than this together")
    ap.add_argument("--lsh-split", choices=("rounds", "heads"), default="rounds",
                    help="how P > 1 splits the LSH layers: by sorted slots, round by round "
                         "(reformer.parallel.rounds), or by heads (the head exchange)")
    ap.add_argument("--transport", choices=("auto", "shared-memory", "collective"),
                    default="auto", help="how P > 1 moves exchanged rows: through /dev/shm "
                    "(reformer.parallel.shm) or gloo's all_to_all; auto: shared memory here")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--rank", "--world"):
        ap.add_argument(name, type=int, help=argparse.SUPPRESS)
    for name in ("--store", "--spec", "--out"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return
    for name in args.configs.split(","):
        row = run_config(name.strip(), args)
        if not args.no_save:
            RESULTS.parent.mkdir(exist_ok=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(summary(row), flush=True)


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so that the running workers are killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
