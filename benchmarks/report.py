"""Write docs/benchmarks.md and its log-log plots from run_all.py's JSON lines.

    python benchmarks/report.py benchmarks/results/full.jsonl [--out docs/benchmarks.md]
    python benchmarks/report.py benchmarks/results/gpu.jsonl --out docs/benchmarks-gpu.md

The page holds the machine (recorded by the matmul point of the run), the library versions
(recorded by every point), the dates, one table per sweep, the speed and memory ratios of ours
against the other systems, the issue-3 target checklist evaluated from the data (targets.py),
and two plots: step time and peak memory against sequence length. When
``results/contention.jsonl`` exists (benchmarks/contention.py), the page ends with its newest
run per OpenMP setting: speed idle and beside two busy processes, ours against plain PyTorch.
Records tagged as smoke data (run_all.py --smoke) are marked as such on every table row they
fill. For points run on a GPU (run_all.py --device cuda) memory is the GPU's peak allocated
memory, the plots are named after the page (benchmarks-gpu_time.png) and there is no target
checklist: the targets are for the CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from flops import train_step_flops
from gpu_targets import GPU_TARGETS
from results_io import BUSY_SHARE, Results, cell, length_label, memory_gib, ok, table
from targets import evaluate, matmul_fraction, speedup

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEM_ORDER = ("ours", "hf", "lucidrains", "sdpa", "sdpa-ckpt")
SMOKE = " (smoke)"


def row_label(text: str, records: list[dict | None]) -> str:
    return text + (SMOKE if any(r and r.get("smoke") for r in records) else "")


def lengths_section(res: Results, stem: str) -> list[str]:
    points = res.sweep("lengths")
    if not points:
        return []
    systems = [s for s in SYSTEM_ORDER if any(r["system"] == s for r in points)]
    systems += sorted({r["system"] for r in points} - set(systems))
    lengths = sorted({r["length"] for r in points})
    rows = []
    for length in lengths:
        recs = [res.get("lengths", s, length) for s in systems]
        rows.append([row_label(length_label(length), recs)] + [cell(r) for r in recs])
    out = ["## Train step vs sequence length", "",
           "Forward + backward + AdamW step, batch 1, 6 layers, 4 hash rounds: median step time "
           f"/ {memory_text(res)}. — : not run (a system is not run after its first failure).",
           "", table(["L", *systems], rows), ""]
    others = [s for s in systems if s != "ours"]
    if "ours" in systems and others:
        rows = []
        for length in lengths:
            ours = res.get("lengths", "ours", length)
            row = [row_label(length_label(length), [ours])]
            row += [ratio_text(res, o, length) for o in others]
            if any(busy(res.get("lengths", s, length)) for s in systems):
                row[0] += " ⚠"
            hf = res.get("lengths", "hf", length)
            row.append(f"{memory_gib(ours) / memory_gib(hf):.2f}"
                       if ok(ours) and ok(hf) else "—")
            rows.append(row)
        out += ["Speed-up of ours (their step time / ours; >= when they were stopped for "
                "being slow) and our peak memory as a fraction of HF's:", "",
                table(["L", *[f"vs {o}" for o in others], "memory ours/hf"], rows), "",
                f"![step time vs length]({stem}_time.png)",
                f"![peak memory vs length]({stem}_memory.png)", ""]
    return out


def memory_text(res: Results) -> str:
    return ("peak allocated GPU memory (torch.cuda.max_memory_allocated)" if res.on_gpu()
            else "peak resident memory of the process")


def busy(r: dict | None) -> bool:
    return ok(r) and r.get("cpu_share", 1.0) < BUSY_SHARE


def ratio_text(res: Results, other: str, length: int) -> str:
    """'3.20x', '>= 5.1x' (they were stopped for being slow) or why there is no ratio."""
    ratio, note = speedup(res, other, length)
    if ratio is None:
        return "—"
    return f"{'' if ok(res.get('lengths', other, length)) else '>= '}{ratio:.2f}x"


def simple_section(res: Results, sweep: str, title: str, first: str, value) -> list[str]:
    points = sorted(res.sweep(sweep), key=lambda r: (r["length"], r["n_layers"], r["n_hashes"],
                                                     r["system"]))
    if not points:
        return []
    rows = [[row_label(str(value(r)), [r]), length_label(r["length"]), r["system"], cell(r),
             f"{r['final_loss']:.3f}" if ok(r) else "—"] for r in points]
    return [f"## {title}", "", table([first, "L", "system", "step / peak", "final loss"], rows),
            ""]


def bf16_section(res: Results) -> list[str]:
    rows = []
    for length in sorted({r["length"] for r in res.sweep("bf16")}):
        fp32, bf16 = res.get("bf16", "ours", length), res.get("bf16", "ours-bf16", length)
        speed = f"{fp32['step_seconds'] / bf16['step_seconds']:.2f}x" if ok(fp32) and ok(bf16) \
            else "—"
        losses = [f"{r['losses'][0]:.4f}" if ok(r) else "—" for r in (fp32, bf16)]
        rows.append([row_label(length_label(length), [fp32, bf16]), cell(fp32), cell(bf16),
                     speed, *losses])
    if not rows:
        return []
    return ["## fp32 vs bf16 autocast (ours)", "", table(
        ["L", "fp32", "bf16", "bf16 speed-up", "first-step loss fp32", "bf16"], rows), ""]


def launches_section(res: Results) -> list[str]:
    points = sorted(res.sweep("launches"), key=lambda r: r["length"])
    rows = [[length_label(r["length"]), str(r["per_layer"]) if ok(r) else r["status"],
             r.get("counted", "—"), "yes" if r.get("flex") else "no"] for r in points]
    if not rows:
        return []
    return ["## Launches per layer (ours, cuda plan)", "",
            "One training step (forward + recomputing backward) of one LSH layer of the "
            "benchmark shape: a 2-layer model's count less a 1-layer model's. Target: at most "
            "300, the same at every length.", "",
            table(["L", "per layer", "counted", "FlexAttention"], rows), ""]


def flops_section(res: Results) -> list[str]:
    m = res.matmul
    if m is None:
        return []
    out = ["## Arithmetic rate", "",
           f"Measured matmul rate ({m['size']}x{m['size']} torch.mm, median of 5): "
           f"fp32 {m['fp32_gflops']:.0f} GFLOP/s, bf16 {m['bf16_gflops']:.0f} GFLOP/s.", ""]
    rows = []
    for r in sorted(res.sweep("lengths"), key=lambda r: r["length"]):
        if r["system"] == "ours" and ok(r):
            tflop = train_step_flops(r["length"], n_layers=r["n_layers"]) / 1e12
            rows.append([row_label(length_label(r["length"]), [r]), f"{tflop:.3g}",
                         f"{r['step_seconds']:.3g}", f"{tflop * 1e3 / r['step_seconds']:.0f}",
                         f"{100 * matmul_fraction(res, r['length']):.0f}%"])
    if rows:
        out += ["Our step's analytic FLOPs (benchmarks/README.md gives the formula) over its "
                "time, as a fraction of the fp32 rate:", "",
                table(["L", "TFLOP/step", "step s", "GFLOP/s", "of fp32 matmul"], rows), ""]
    return out


def header(res: Results) -> list[str]:
    m = (res.matmul or {}).get("machine", {})
    dates = sorted(r["date"] for r in res.records if "date" in r)
    versions = {}
    for r in res.records:
        if r.get("version") and r.get("base") in ("ours", "hf", "lucidrains"):
            versions[r["base"]] = r["version"]
        versions.setdefault("torch", r.get("torch"))
    names = {"ours": "reformer (ours)", "hf": "transformers", "lucidrains": "reformer-pytorch",
             "torch": "torch"}
    commits = sorted({r["commit"] for r in res.records if "commit" in r})
    out = ["# Benchmarks" + (" on a GPU" if res.on_gpu() else ""), "",
           f"Generated by `benchmarks/report.py` on {dt.date.today()} from "
           + ", ".join(f"`{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}`"
                       for p in res.paths) + "; how to reproduce: `benchmarks/README.md`.", ""]
    if res.any_smoke():
        out += ["> **Smoke data.** Rows marked (smoke) come from short runs at small lengths "
                "that prove the pipeline; target verdicts drawn from them are provisional. The "
                "machine was shared with other jobs while they were measured.", ""]
    n_busy = sum(busy(r) for r in res.points.values())
    if n_busy:
        out += [f"> ⚠ marks {n_busy} point(s), and the ratios built on them, whose process got "
                f"less than {BUSY_SHARE:.0%} of its CPUs during its steps (other jobs were "
                "running): their times are not comparable with the others.", ""]
    if m.get("gpu"):
        out += [f"- GPU: {m['gpu']}; memory below is its peak allocated memory "
                "(`torch.cuda.max_memory_allocated`), the host's RSS is in the JSON lines"]
    out += [f"- {'Host' if m.get('gpu') else 'Machine'}: {m.get('cpu', 'unknown CPU')}, "
            f"{m.get('cpus', '?')} logical CPUs, "
            f"{m.get('ram_gib', 0):.1f} GiB RAM; bf16 matmul features: "
            f"{', '.join(m.get('bf16_features', [])) or 'none (bf16 is emulated)'}",
            "- Versions: " + ", ".join(f"{names[k]} {v}" for k, v in versions.items() if v),
            f"- Commit of this repository: {', '.join(commits) or 'unknown'}",
            f"- Measured: {dates[0] if dates else '?'} to {dates[-1] if dates else '?'}", ""]
    return out


def checklist(res: Results) -> list[str]:
    """The issue's targets: issue 3's on the CPU, issue 23's on a GPU."""
    title, rows = (("Targets (issue 23)", evaluate(res, GPU_TARGETS)) if res.on_gpu() else
                   ("Targets (issue 3)", evaluate(res)))
    rows = [[name, f"**{v}**", notes] for name, v, notes in rows]
    return [f"## {title}", "", table(["target", "verdict", "numbers"], rows), ""]


def plots(res: Results, out_dir: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lengths = sorted({r["length"] for r in res.sweep("lengths")})
    memory = "peak GPU memory, GiB" if res.on_gpu() else "peak resident memory, GiB"
    for value, ylabel, name in ((lambda r: r["step_seconds"], "seconds per train step", "time"),
                                (memory_gib, memory, "memory")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for system in SYSTEM_ORDER:
            pts = sorted((r["length"], value(r)) for r in res.sweep("lengths")
                         if r["system"] == system and ok(r))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=system)
        ax.set(xscale="log", yscale="log", xlabel="sequence length L (tokens)", ylabel=ylabel,
               title=f"Train step {name} (6 layers, 4 hash rounds)"
               + (f", {res.matmul['machine']['gpu']}" if res.on_gpu() and res.matmul else "")
               + (", smoke data" if res.any_smoke() else ""))
        ax.set_xticks(lengths, [length_label(n) for n in lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_{name}.png", dpi=110)
        plt.close(fig)


def contention_section(path: Path) -> list[str]:
    """The newest run of benchmarks/contention.py for each OpenMP setting it was run with."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    newest: dict[str, str] = {}
    for r in rows:  # run ids are start times: the last seen per setting is the newest
        newest[json.dumps(r.get("env", {}), sort_keys=True)] = r.get("run", r["date"])
    out = ["## On a busy machine (issue 20)", "",
           "Each workload idle and beside two processes spinning on the two cores "
           "(`benchmarks/contention.py`); ours and plain PyTorch alternate call by call, so both "
           "see the same load. Loaded/idle is the slowdown; the target is ours <= 1.5x plain "
           "PyTorch's. The OpenMP setting applies to both (one process); `reformer` commands "
           "set GOMP_SPINCOUNT=3000 unless the user set a policy (`src/reformer/cli/__init__.py`"
           "), and cached decoding steps run on one thread (`src/reformer/_threads.py`) in "
           "every run below.", ""]
    for env, run in newest.items():
        part = [r for r in rows if r.get("run", r["date"]) == run]
        first = part[0]
        setting = ", ".join(f"{k}={v}" for k, v in json.loads(env).items()) or "OpenMP defaults"
        out += [f"{first['date']}, {first['cpu']}, {first['threads']} threads, {setting}, "
                f"medians of {first['repeats']}:", ""]
        table_rows = []
        for r in part:
            plain = next((p for p in part if p["workload"] == r["workload"]
                          and p["system"] == "plain"), None)
            rel = (f"{r['ratio'] / plain['ratio']:.2f}x" if plain and r["system"] == "ours"
                   else "")
            table_rows.append([r["workload"], r["system"], f"{r['units_per_s_idle']:,.0f}",
                               f"{r['units_per_s_loaded']:,.0f}", f"{r['ratio']:.2f}x", rel])
        out += [table(["workload", "system", "idle tok/s", "loaded tok/s", "loaded/idle",
                       "ours / plain"], table_rows), ""]
    return out


# The O(L/P) memory of sequence parallelism: x1, x2 and their gradients, fp32, d_model 256.
STREAM_BYTES = 4 * 256 * 4
# One head's whole-length working set in a head-parallel backward: qk, v, the core's output,
# dL/do and the gradients of qk and v, fp32, d_head 64 (reformer/parallel/exchange.py).
HEAD_BYTES = 6 * 64 * 4
# Assumed links for the on-paper estimate: bytes per second per direction per GPU.
LINKS = {8: ("NVLink", 450e9), 64: ("InfiniBand (400 Gb/s)", 50e9)}
SPLITS = {"rounds": "LSH split by sorted slots (rounds.py, the default)",
          "heads": "head exchange for every layer (exchange.py, `lsh_split=\"heads\"`)"}


TRANSPORTS = {"shared-memory": "rows through shared memory (shm.py)",
              "collective": "rows through gloo's all_to_all"}


def _variant(r: dict) -> tuple[str, str] | None:
    """A row's (LSH split, transport): None on one process; rows from before the options
    were the head exchange and gloo."""
    if r["processes"] == 1:
        return None
    return r.get("lsh_split") or "heads", r.get("transport") or "collective"


def sequence_runs(rows: list[dict]) -> dict[tuple[str, str], tuple[dict, dict | None,
                                                                   dict | None]]:
    """Per (LSH split, transport), from the newest run that has 2-process rows of it: (its
    one-process row, 2 processes at that length, 2 processes at twice it), each the run's last
    record of its configuration (an earlier failed attempt is superseded)."""
    out = {}
    for variant in ((s, t) for s in SPLITS for t in TRANSPORTS):
        runs = [r["run"] for r in rows if _variant(r) == variant]
        if not runs:
            continue
        run = [r for r in rows if r["run"] == max(runs)]
        newest = {r["config"]: r for r in run}
        one = next((r for r in newest.values() if r["processes"] == 1 and ok(r)), None)
        if one is None:
            continue
        L = one["seq_len"]
        out[variant] = (one, *(newest.get(f"2x{length_label(n)}") for n in (L, 2 * L)))
    return out


def sequence_section(path: Path, gpu_step: dict | None) -> list[str]:
    """The newest runs of benchmarks/sequence.py (issue 22), one per LSH split: sequence
    parallelism on 2 processes against one at the same length (memory) and at twice it (weak
    scaling), each against the one-process row of its own run, the all_to_all traffic, and
    an estimate for GPUs from those figures (and ``gpu_step``, the million-token step
    measured on a GPU, for the compute time)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    runs = sequence_runs(rows)
    if not runs:
        return []
    gib = 2**30
    out = ["## Sequence parallelism (issue 22)", "",
           "`benchmarks/sequence.py`: the million sweep's model with 3 layers, fp32, batch 1, "
           "one step (forward + backward, + `sync_gradients` on 2 processes; no optimizer "
           "step) per configuration, each in fresh processes of 1 thread (GOMP_SPINCOUNT="
           "3000); one step each, no medians. Memory: peak resident memory of each process "
           "(the largest), and that minus its resident memory before the model was built "
           "(imports, process group). Each split is compared with the one-process row of its "
           "own run (the same machine and session).", ""]
    for (split, transport), (one, sp, weak) in runs.items():
        run = [r for r in (one, sp, weak) if r is not None]
        out += [f"### {SPLITS[split]}, {TRANSPORTS[transport]}", "",
                f"Run {one['run']} ({one['date']} to {max(r['date'] for r in run)}), "
                f"{one['cpu']}, commit {', '.join(sorted({r['commit'] for r in run}))}, torch "
                f"{one['torch']}.", ""]
        out += [table(["processes x L", "tokens / process", "step", "peak GiB / above base",
                       "time in all_to_all", "loss"], [
            [r["config"], length_label(r["seq_len"] // r["processes"]),
             f"{r['step_s']:.0f} s" if ok(r) else r["status"],
             f"{r['peak_rss'] / gib:.2f} / {(r['peak_rss'] - r['base_rss']) / gib:.2f}"
             if ok(r) else "—", f"{r['a2a_share']:.1%}" if "a2a_share" in r else "",
             f"{r['loss']:.4f}" if ok(r) else "—"] for r in run]), ""]
        if not (ok(sp) and ok(weak)):
            out += ["The 2-process runs at L and 2L are missing or failed: no verdicts.", ""]
            continue
        checks = [("per-process peak <= 0.6x one process's (1M)", sp, "peak_rss", 0.6),
                  ("2M on 2: peak <= 1M on 1 + 15%", weak, "peak_rss", 1.15),
                  ("2M on 2: step <= 1.3x 1M on 1 (1 thread)", weak, "step_s", 1.3)]
        unit = {"peak_rss": (gib, "GiB"), "step_s": (1, "s")}
        out += [table(["target", "verdict", "numbers"], [
            [name, f"**{'PASS' if r[k] / one[k] <= limit else 'FAIL'}**",
             f"{r[k] / unit[k][0]:.2f} / {one[k] / unit[k][0]:.2f} {unit[k][1]} = "
             f"{r[k] / one[k]:.2f}x (need <= {limit}x)"] for name, r, k, limit in checks]),
            ""]
        rest = weak["step_s"] * (1 - weak["a2a_share"])
        out += [f"Without its time inside all_to_all the 2-process {weak['config']} step "
                f"would take {rest:.0f} s, {rest / one['step_s']:.2f}x the one-process "
                f"{one['config']} step; {sp['config']} was {one['step_s'] / sp['step_s']:.2f}x "
                f"faster than {one['config']} (2 processes of 1 thread against 1).", ""]
        out += sequence_traffic(sp, weak, transport)
        tags = sp["per_rank"][0]["all_to_all"]
        extra = (tags["backward-recompute"]["calls"] - tags["forward"]["calls"]) // sp["n_layers"]
        if split == "rounds" and extra > 0:
            out += ["In this run the backward's gradient pass tagged its own sends (qk, v and "
                    "dL/do out again) as the recomputation's, so the middle count holds the "
                    f"recomputation's {tags['forward']['calls'] // sp['n_layers']} calls (as "
                    "many as the forward's) and the gradient pass's other "
                    f"{extra}; later runs tag them as gradients.", ""]
        if (split, transport) == ("rounds", "collective"):
            out += ["Why the split is slower here (the time target fails), from cProfile of "
                    "one process at 2x128K on 2026-12-06 (one pass per round, before the "
                    "passes and the cache release): the step took 44.6 s against 27.7 s with "
                    "the head exchange. The extra 17 s: 4.6 s more inside all_to_all (about "
                    "5x the bytes: each position's rows travel once per hash round), 4.1 s "
                    "more in the attention itself (the span runs the blockwise kernel in "
                    "PyTorch ops, about 12 s of products, softmax and row gathers, where the "
                    "head exchange runs the whole-length core in the fused C++ kernel, 8.2 s), "
                    "about 3 s of other row gathers (index_select) and about 2.5 s of routing, "
                    "index arithmetic, zero-filled buffers and the fold. A C++ kernel over a "
                    "received span "
                    "(rows gathered through a slot map, masks by whole-sequence positions, "
                    "only the owned chunks as queries) would remove the second; the traffic "
                    "is the design's, small on NVLink or InfiniBand (below) but not over "
                    "gloo on one 2-core machine.", ""]
            out += ["Where the time went at 2x256K (py-spy at 50 Hz on rank 0, 2026-12-06, "
                    "commit e2947bb, gloo; time blocked inside gloo is not sampled): the step "
                    "took 107 s against 54 s for 1x128K, 1.99x, 20.9% of it inside "
                    "all_to_all. Of rank 0's 87 s of sampled CPU time: feed-forward 24.5%, "
                    "the span's attention in PyTorch ops 23.6%, projections and W_o 10.8%, "
                    "gathering the rows to send 8.7%, zero-filled span buffers and the "
                    "gathers of outputs to return 8.3%, folding the rounds 5.3%, the loss "
                    "2.9%, hashing 2.7%, releasing the allocator's free blocks after every "
                    "pass 2.4%, routing 1.9%, the rest 8.9%. The release after every pass "
                    "also made each pass fault its memory in again: the two processes of a "
                    "2x256K step spent 47 s in the kernel (system time), one process of "
                    "1x128K 2 s.", "",
                    "What changed since, measured the same way (one step each, one after "
                    "another on the idle machine, 2026-12-06 15:46 to 15:52, against 1x128K "
                    "at commit e2947bb: 50.1 s): the commit's 2x256K step took 99.1 s (1.98x, "
                    "47 s system time, peak 1.37 GiB per process); with grow-only pass "
                    "buffers, one release per call and the spans in the C++ kernel, 79.6 s "
                    "(1.59x, 20 s system time, 1.44 GiB); with the rows through shared memory "
                    "too, 73.0 s (1.46x, 14 s, 1.46 GiB), 13.3% of it still inside the "
                    "exchanges (the copies, two small gloo collectives per call, and waiting "
                    "for the other process): one call of the largest size alone took 6 ms "
                    "through shared memory against 7 ms through gloo, so the transport is not "
                    "where most of that time goes.", ""]
        if (split, transport) == ("rounds", "shared-memory") \
                and one["run"] == "2026-12-06T17:12:40":
            out += ["What made this run faster than the one before it (2026-12-06 16:01, "
                    "commit fa90018: 2x2M 691 s against 1x1M 508 s, 1.36x; 2x1M 335 s), each "
                    "change measured at 2x256K against 1x128K (48.5 s), one step each on the "
                    "idle machine:", "",
                    "- The processes keep step through counters in a shared control block "
                    "(shm.py) instead of two gloo collectives per call: at commit 5386f9b "
                    "those averaged 1.8 ms (the all-gather of each call's sizes) and 1.3 ms "
                    "(the barrier), waiting included, 5 s of the 68.6 s step. With the "
                    "counters the step took 63.2 s, 6.9% of it inside the exchanges instead "
                    "of 13.1%.",
                    "- The rows to send are gathered straight into the outbox (and a "
                    "process's own part into its output), not into a buffer that was then "
                    "copied there: 62.3 s, peak 1.41 GiB instead of 1.44.",
                    "- After this run (commit 7b15631, not in the table above): the returned "
                    "rows are folded in one native pass, and the gradients sent back added "
                    "with the native row add. Interleaved with the previous commit, two "
                    "steps each on a busier machine: 63.8 and 61.6 s against 67.1 and "
                    "70.2 s, peak 1.37 GiB instead of 1.41.", "",
                    "Where the rest of the time goes at 2x256K (py-spy at 50 Hz on both "
                    "processes, commit e439103, the counters in): of the split's sampled "
                    "time, 47% was the attention kernel over the spans, 18% the exchanges, "
                    "11% gathering the rows to send, 10% folding the rounds, 3% adding the "
                    "gradients back, 3% the slots of the sorted order; routing was under 1%.",
                    ""]
        if (split, transport) == ("heads", "collective"):
            w = HEAD_BYTES
            out += ["Why the head exchange cannot meet the memory targets at this width, however "
                    "lean: one process holds the streams (s = "
                    f"{STREAM_BYTES:,} bytes per local token) and one head's whole-length "
                    f"working set (w = {w:,} bytes per token at d_head 64: qk, v, output, dL/do "
                    "and the gradients of qk and v), so the per-process peak on 2 is at least "
                    f"(s/2 + w) / (s + w) = {(STREAM_BYTES / 2 + w) / (STREAM_BYTES + w):.2f}x"
                    " one process's at the same L (target 0.6x), and at twice the length at "
                    f"least (s + 2w) / (s + w) = {(STREAM_BYTES + 2 * w) / (STREAM_BYTES + w):.2f}"
                    "x (target 1.15x). It also stops at P = n_heads.", ""]
    for variant in (("rounds", "shared-memory"), ("rounds", "collective")):
        if variant in runs and all(ok(r) for r in runs[variant]):
            out += sequence_estimate(*runs[variant], gpu_step)
            break
    return out


def sequence_traffic(sp: dict, weak: dict, transport: str = "collective") -> list[str]:
    """The all_to_all and sync_gradients traffic of the 2-process runs."""
    via = "shared memory" if transport == "shared-memory" else "gloo"
    rows = []
    for r in (sp, weak):
        layers, local = r["n_layers"], r["seq_len"] // r["processes"]
        tags = r["per_rank"][0]["all_to_all"]
        calls = " + ".join(str(tags[t]["calls"] // layers) for t in
                           ("forward", "backward-recompute", "backward-grad") if t in tags)
        in_a2a, alone = r["a2a_share"] * r["step_s"], r["a2a_calls"] * r["alone_s"]
        rows.append([r["config"], calls, f"{r['a2a_bytes'] / layers / 1e9:.2f} "
                     f"({r['a2a_bytes_out'] / layers / 1e9:.2f})",
                     f"{r['a2a_bytes'] / layers / local:,.0f}",
                     f"{in_a2a:.1f} s ({r['a2a_share']:.1%})",
                     f"{r['call_bytes_out'] / r['alone_s'] / 1e9:.2f} GB/s ({alone:.1f} s)",
                     f"{r['sync_bytes'] / 1e6:.1f} MB, {r['sync_s']:.2f} s"])
    return ["all_to_all per layer and process: calls (forward + replayed in the reversible "
            "backward + gradients), GB sent (of which to the other process), bytes per local "
            "token; then the wall time inside all_to_all over the step (transfer and waiting "
            "for the other process; share of the slower process's step), the rate of the "
            f"step's largest call alone from a barrier (bytes leaving a process / time, {via} "
            "on one machine; in brackets every call of the step at that time each: an upper "
            "bound where calls are smaller), and the all-reduce of `sync_gradients` (fp32 "
            "gradients of every weight):", "",
            table(["processes x L", "calls / layer", "GB / layer", "bytes / token / layer",
                   "in all_to_all", "one call alone", "sync_gradients"], rows), ""]


def sequence_estimate(one: dict, sp: dict, weak: dict, gpu_step: dict | None) -> list[str]:
    """Per-device memory, bytes and time at 8M and 64M tokens on 8 and 64 GPUs, on paper,
    for the LSH split by sorted slots (every term O(L/P))."""
    L, layers, gib = one["seq_len"], one["n_layers"], 2**30
    local = L // 2
    per_token = sp["a2a_bytes"] / layers / local  # sent per local token and layer
    # memory above base = (STREAM_BYTES + a) * L/P, a from L on 2 processes
    a = (sp["peak_rss"] - sp["base_rss"]) / local - STREAM_BYTES
    predicted, measured = 2 * local * (STREAM_BYTES + a), weak["peak_rss"] - weak["base_rss"]
    compute = (gpu_step["step_seconds"] / gpu_step["length"] if ok(gpu_step)
               and gpu_step["n_layers"] == layers else None)  # seconds per token on a device
    rows = []
    for length, P in ((2**23, 8), (2**23, 64), (2**26, 8), (2**26, 64)):
        share, (link, rate) = length // P, LINKS[P]
        sent = per_token * share * (P - 1) / P * layers  # bytes leaving a device per step
        row = [length_label(length), str(P), length_label(share),
               f"{(STREAM_BYTES + a) * share / gib:.1f}", f"{sent / 1e9:.0f}",
               f"{sent / rate:.2f} s ({link})"]
        if compute:
            row.append(f"{compute * share:.0f} s ({sent / rate / (compute * share):.1%})")
        rows.append(row)
    gpu = (f"; compute: the {gpu_step.get('gpu', 'GPU')}'s measured {layers}-layer "
           f"{length_label(gpu_step['length'])} step ({gpu_step['step_seconds']:.1f} s, "
           "docs/benchmarks-gpu.md) scaled by the tokens per device (that step is "
           "launch-bound; faster kernels raise the communication's share)") if compute else ""
    return [
        "### On paper (an estimate, not measured): the split by sorted slots on GPUs", "",
        "Memory per device = (s + a) x L/P: s = "
        f"{STREAM_BYTES:,} bytes per local token (the two streams and their gradients, fp32, "
        f"d_model 256), a = {a:,.0f} bytes per local token for everything else, from 1M on "
        "2 (one head slice's projections, dL/do, the rounds' folded output, the received "
        "span of a pass and its gradients, the allocator's cached blocks; only the ids and "
        "targets, 16 bytes per token, and with padding a key mask, 1 byte per token and "
        "head, stay O(L); they are counted in a). It predicts "
        f"{predicted / gib:.2f} GiB above base for 2M on 2 (measured {measured / gib:.2f}); "
        "GPU memory taken equal to these bytes. Traffic: "
        f"{per_token:,.0f} bytes per local token and layer (measured at 1M on 2: per hash "
        "round and head, the rows of qk and v out and the output back, twice (forward and "
        "the reversible backward's recomputation), then qk, v, dL/do out and the gradients "
        "of qk and v back: about 11 x R x H x E x 4 bytes), (P-1)/P of it leaving the "
        "device, at " + ", ".join(f"{name} {rate / 1e9:.0f} GB/s per direction per GPU for "
                                  f"{P} GPUs" for P, (name, rate) in LINKS.items())
        + " (64 GPUs span 8 nodes: all traffic counted at the slower link)" + gpu + ".", "",
        table(["L", "GPUs", "tokens / GPU", "memory / GPU GiB", "all_to_all GB / GPU / step",
               "its time / step"] + (["compute / step (comm share)"] if compute else []),
              rows), "",
        "- **P is not bounded by n_heads**: a process owns runs of sorted chunks, so P can "
        "grow until a round has fewer than P x (1 + the window's neighbours) chunks (Lp/M >= "
        "2P for causal LSH: 8,192 processes at 1M tokens and chunks of 64). Layers that are "
        "not LSH (local, full) still exchange heads, and need P to divide n_heads.",
        "- **Every term is O(L/P)** (head parallelism's c x L term, one head's whole-length "
        "working set on every process, is gone): memory per device is set by the tokens per "
        "device, so 64M tokens on 64 GPUs take about what 1M takes on one.",
        "- **The price is traffic**: each position's rows travel once per hash round, about "
        "R times head parallelism's bytes (4 rounds here), which on this machine's gloo "
        "costs step time (the verdicts above); on NVLink or InfiniBand the table's times "
        "are small next to the compute.", ""]


def gpu_million() -> dict | None:
    """The million-token step measured on a GPU (results/gpu.jsonl), if there is one."""
    path = HERE / "results" / "gpu.jsonl"
    if not path.exists():
        return None
    return Results([path]).get("million", "ours", 2**20, 3)


def render(res: Results, stem: str) -> str:
    parts = header(res) + checklist(res) + lengths_section(res, stem)
    parts += simple_section(res, "depth", "Depth sweep (ours)", "layers", lambda r: r["n_layers"])
    parts += simple_section(res, "hashes", "Hash-round sweep (ours)", "hash rounds",
                            lambda r: r["n_hashes"])
    parts += bf16_section(res) + flops_section(res) + launches_section(res)
    parts += simple_section(res, "million", "One million tokens (ours)", "layers",
                            lambda r: r["n_layers"])
    if not res.on_gpu():
        parts += contention_section(HERE / "results" / "contention.jsonl")
        parts += sequence_section(HERE / "results" / "sequence.jsonl", gpu_million())
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", type=Path,
                   default=[HERE / "results" / "full.jsonl"], help="JSONL files from run_all.py")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    missing = [str(path) for path in args.results if not path.exists()]
    if missing:
        print(f"report: {', '.join(missing)} not found; run benchmarks/run_all.py first",
              file=sys.stderr)
        return 2
    res = Results([path.resolve() for path in args.results])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(res, args.out.stem))
    if res.sweep("lengths"):
        plots(res, args.out.parent, args.out.stem)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
